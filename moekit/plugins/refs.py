"""References to plug-in components in specs and recipes: `name` or `{name, params}`, checked while the YAML is
parsed.

A field typed `SynergyHeadRef` (or any other `ComponentRef`) looks the name up among the installed plug-ins and
validates `params` against the component's own pydantic model, so a bad key is reported with its whole YAML path
(`stages[2].losses.synergy[0].params.num_tokens: ...`). Two parse-context keys (`moekit.config.parse_config(...,
context=...)`) change the checks: `components: False` skips them (`moekit validate --no-components`, or a recipe
read on a machine without its plug-ins), and `pending_paths` lists folders a pipeline's prepare steps will create,
which path checks in component params accept.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, ValidationInfo, field_validator, model_validator

from moekit.config import StrictModel
from moekit.plugins import registry as plugin_registry
from moekit.plugins.hooks import Kind


def checks_components(context: dict[str, Any] | None) -> bool:
    """Whether component names and params are checked in this parse (see the module docstring)."""
    return (context or {}).get("components", True)


class ComponentRef(StrictModel):
    """A component of kind `kind` provided by some plug-in, with its parameters."""

    kind: ClassVar[Kind]
    name: str = Field(description="component name, as `moekit plugins` lists it")
    params: dict[str, Any] = Field(
        default_factory=dict, validate_default=True, description="the component's own parameters"
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @field_validator("name")
    @classmethod
    def _known(cls, name: str, info: ValidationInfo) -> str:
        if checks_components(info.context):
            plugin_registry.registry().get(cls.kind, name)
        return name

    @field_validator("params")
    @classmethod
    def _valid(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "name" in info.data and checks_components(info.context):  # else the name was already refused
            plugin_registry.registry().params_for(cls.kind, info.data["name"], params, context=info.context)
        return params

    def check(self, context: dict[str, Any] | None = None) -> None:
        """Validate the params again with `context` (e.g. with paths checked: `{"pending_paths": [...]}`)."""
        plugin_registry.registry().params_for(self.kind, self.name, self.params, context=context)

    def build(self, where: str = "", **context: Any) -> Any:
        """Build the component from its parameters (`context` as its hook documents); errors name `where`."""
        return plugin_registry.registry().build(self.kind, self.name, self.params, where=where, **context)

    def as_dict(self) -> dict[str, Any]:
        """`{name, params}`, the form a checkpoint's `moekit.json` keeps."""
        return {"name": self.name, "params": dict(self.params)}


class TeacherRef(ComponentRef):
    kind: ClassVar[Kind] = "teacher"


class PositionEncoderRef(ComponentRef):
    kind: ClassVar[Kind] = "position_encoder"


class SynergyHeadRef(ComponentRef):
    kind: ClassVar[Kind] = "synergy_head"


class ExpertInitRef(ComponentRef):
    kind: ClassVar[Kind] = "expert_init"


class BatchSourceRef(ComponentRef):
    kind: ClassVar[Kind] = "batch_source"
