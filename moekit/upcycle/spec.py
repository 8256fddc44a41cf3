"""`UpcycleSpec`: the one description of an upcycling, shared by the Python API, YAML and the CLI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from moekit.config import StrictModel, apply_overrides, load_yaml, parse_config
from moekit.plugins.refs import ExpertInitRef
from moekit.upcycle.layout import check_layout

Modality = Literal["text", "image", "video", "3d"]
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class ExpertSpec(StrictModel):
    """Where one expert's FFN weights come from and how they are perturbed."""

    name: str
    source: str = Field(
        "base", description="'base' (copy of the base FFN), a checkpoint directory, or the name of an in-memory source"
    )
    modality: Modality | None = Field(
        None, description="modality the expert specialises in (prototype router init, reports)"
    )
    noise_scale: float = Field(
        0.0, ge=0.0, description="Gaussian noise with std = noise_scale * std(weight) added to the copy"
    )
    reinit_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="Drop-Upcycling: share of intermediate units re-initialised"
    )
    seed: int | None = Field(
        None, description="seed of this expert's noise and re-init (default: spec seed + expert index)"
    )
    lora_scale: float = Field(1.0, description="scale of a LoRA delta when the source is a peft adapter")
    init: ExpertInitRef | None = Field(
        None, description="plug-in expert initialiser applied after the copy: {name: ..., params: {...}}"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("expert names use letters, digits, '_', '-', '.' (e.g. image, video, 3d, base)")
        return value

    @model_validator(mode="after")
    def _default_modality(self) -> ExpertSpec:
        if self.modality is None and self.name in ("text", "image", "video", "3d"):
            object.__setattr__(self, "modality", self.name)
        return self


ROUTER_INITS = ("normal", "zeros", "prototype")


class RouterSpec(StrictModel):
    """How the router weights start: a built-in init or a plug-in router initialiser (with its `params`)."""

    init: str = Field("normal", description=f"one of {', '.join(ROUTER_INITS)}, or a plug-in router initialiser")
    std: float = Field(0.02, gt=0.0, description="std of the normal init (also used for experts without a prototype)")
    prototype_scale: float = Field(1.0, gt=0.0, description="length of each prototype row of the router")
    params: dict[str, Any] = Field(
        default_factory=dict, validate_default=True, description="parameters of a plug-in router initialiser"
    )

    @field_validator("init")
    @classmethod
    def _known_init(cls, init: str) -> str:
        if init not in ROUTER_INITS:
            from moekit.plugins.registry import registry

            reg = registry()
            if init not in reg.components("router_init"):
                raise ValueError(reg.unknown_message("router_init", init, ROUTER_INITS))
        return init

    @field_validator("params")
    @classmethod
    def _plugin_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        init = info.data.get("init")
        if init in ROUTER_INITS and params:
            raise ValueError(f"the built-in router init {init!r} takes no params (they are for plug-in initialisers)")
        if init is not None and init not in ROUTER_INITS:
            from moekit.plugins.registry import registry

            registry().params_for("router_init", init, params)
        return params


class ArchOverride(StrictModel):
    """Paths for a model moekit does not know, or to override what it detects."""

    layers: str = Field(description="dotted path of the decoder's ModuleList, e.g. model.language_model.layers")
    mlp: str = "mlp"
    kind: Literal["gated", "fused", "plain"] | None = None
    gate: str | None = None
    up: str | None = None
    down: str | None = None
    act: str | None = None
    image_token_ids: list[int] = []
    video_token_ids: list[int] = []


class UpcycleSpec(StrictModel):
    """Which layers become MoE, with how many experts, initialised from where.

    `moekit.upcycle(model, UpcycleSpec(layers="interval:4", num_experts=4, top_k=2))` is the Python API;
    `moekit upcycle spec.yaml` reads the same fields from YAML.
    """

    base: str | None = Field(None, description="base checkpoint directory (CLI / streaming conversion)")
    layers: str | list[int] = "interval:4"
    num_experts: int | None = Field(None, ge=2, description="experts per MoE layer (M); default: len(experts), else 4")
    top_k: int = Field(2, ge=1, description="experts each token is routed to (k)")
    experts: list[ExpertSpec] = Field(
        default_factory=list, description="one entry per expert; default: all copies of the base FFN"
    )
    router: RouterSpec = Field(default_factory=RouterSpec)
    shared_expert: bool = False
    balance_loss: Literal["switch", "switch_topk"] = "switch"
    aux_loss_coef: float = Field(0.01, ge=0.0, description="alpha of L_aux, recorded for the trainer")
    z_loss_coef: float = Field(0.0, ge=0.0)
    non_expert: Literal["base", "average"] = Field(
        "base", description="where attention/embeddings come from (streaming)"
    )
    seed: int = 0
    arch: ArchOverride | None = None

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: str | list[int]) -> str | list[int]:
        return check_layout(value)

    @model_validator(mode="after")
    def _experts(self) -> UpcycleSpec:
        if self.num_experts is None:
            object.__setattr__(self, "num_experts", len(self.experts) or 4)
        if self.num_experts < 2:
            raise ValueError(f"num_experts={self.num_experts}: an MoE layer needs at least 2 experts")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} is larger than num_experts={self.num_experts}; top_k must be 1..{self.num_experts}"
            )
        if not self.experts:
            object.__setattr__(self, "experts", [ExpertSpec(name=f"expert_{i}") for i in range(self.num_experts)])
        elif len(self.experts) != self.num_experts:
            names = [e.name for e in self.experts]
            raise ValueError(
                f"num_experts={self.num_experts} but {len(self.experts)} experts are listed ({names}); make them agree"
            )
        names = [e.name for e in self.experts]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"expert names must be unique; repeated: {duplicated}")
        return self

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def input_paths(self) -> dict[str, str]:
        """The checkpoint folders this spec reads, by label (for `moekit.io.overlap.check_apart`)."""
        paths = {"the base": self.base} if isinstance(self.base, str) else {}
        for e in self.experts:
            if isinstance(e.source, str) and e.source != "base":
                paths[f"expert {e.name!r}"] = e.source
        return paths

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = ()) -> UpcycleSpec:
        """Read a spec from YAML, applying `--set key=value` overrides first."""
        data = load_yaml(path)
        if isinstance(data, dict) and "upcycle" in data and len(data) == 1:
            data = data["upcycle"]
        return parse_config(cls, apply_overrides(data, overrides), source=str(path))
