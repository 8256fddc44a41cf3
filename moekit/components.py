"""Plug-in components named in specs and recipes: `{name: ..., params: {...}}`, checked against the registry.

A recipe field typed `SynergyHeadRef` (or any other `ComponentRef`) accepts `name` or `{name, params}`; while the
YAML is parsed the name is looked up among the installed plug-ins and `params` validated against the
component's own pydantic model, so `stages[2].synergy.params.num_tokens: ...` points at the bad key.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, ValidationInfo, field_validator, model_validator

from moekit.config import StrictModel
from moekit.hooks import Kind


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
    def _known(cls, name: str) -> str:
        from moekit.registry import registry

        registry().get(cls.kind, name)
        return name

    @field_validator("params")
    @classmethod
    def _valid(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from moekit.registry import registry

        if "name" in info.data:  # else the name was already refused
            registry().params_for(cls.kind, info.data["name"], params)  # ConfigError: nested under `params`
        return params

    def build(self, **context: Any) -> Any:
        """Build the component from the validated parameters (`context` as its hook documents)."""
        from moekit.registry import registry

        component, params = registry().validate(self.kind, self.name, self.params)
        return component.build(params, **context)


class TeacherRef(ComponentRef):
    kind: ClassVar[Kind] = "teacher"


class PositionEncoderRef(ComponentRef):
    kind: ClassVar[Kind] = "position_encoder"


class SynergyHeadRef(ComponentRef):
    kind: ClassVar[Kind] = "synergy_head"


class ExpertInitRef(ComponentRef):
    kind: ClassVar[Kind] = "expert_init"
