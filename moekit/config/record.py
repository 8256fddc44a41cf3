"""`MoeRecord`: the typed form of a moekit model's `config.moekit`, the one place that record is read and written.

The record says everything needed to rebuild the MoE layout from the dense family's config (which layers, how
many experts, the FFN layout it was made from) plus the spec and sources it was made with. It is stored in
`config.json` under the key `moekit`, as JSON; `MoeRecord.of(config)` reads it back (older records included)
and `record.to_json()` is what goes into the config.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import Field

from moekit._version import __version__
from moekit.config.base import StrictModel, parse_config

RECORD_FORMAT = 1
PREFIX = "moekit_"  # moekit's model types: `moekit_<dense model type>`, refused by stock transformers
AutoKind = Literal["image-text-to-text", "causal-lm"]


class FfnRecord(StrictModel):
    """Names of one dense FFN's projections (see `moekit.arch.FfnLayout`)."""

    kind: Literal["gated", "fused", "plain"]
    up: str
    down: str
    gate: str | None = None
    act: str = "act_fn"
    act_fn: str | None = None  # an activation transformers knows by name, when the FFN has no activation module
    gate_first: bool = True  # fused: whether the gate half of the up matrix comes first
    transposed: bool = False  # weights stored [in, out] (GPT-2's Conv1D)


class ArchRecord(StrictModel):
    """Where the decoder layers and their FFNs are, and the visual special tokens."""

    layers: str
    mlp: str  # the layer attribute that holds the MoE block (and the dense FFN, unless `inline`)
    ffn: FfnRecord
    inline: bool = False  # the dense FFN's projections are the layer's own children (OPT's fc1 / fc2)
    image_token_ids: list[int] = []
    video_token_ids: list[int] = []


class MoeRecord(StrictModel):
    """`config.moekit` of a moekit MoE model."""

    format: int = RECORD_FORMAT
    moekit_version: str = Field(__version__, validation_alias=pydantic.AliasChoices("moekit_version", "version"))
    base_model_type: str
    auto: AutoKind = "image-text-to-text"
    num_layers: int
    hidden_size: int
    intermediate_size: int
    biased: bool
    layers: list[int] = Field(min_length=1)
    arch: ArchRecord
    spec: dict[str, Any] = Field(description="the UpcycleSpec the model was made with, as JSON")
    experts: list[str]
    model_class: str | None = Field(None, description="the dense transformers class the model was made from")
    sources: dict[str, Any] = {}
    router_calibration: dict[str, Any] | None = None

    @classmethod
    def of(cls, config: Any) -> MoeRecord | None:
        """The record of a transformers config (or of a model's), or None for a dense model."""
        config = getattr(config, "config", config)
        data = getattr(config, "moekit", None)
        if data is None:
            return None
        return data if isinstance(data, MoeRecord) else cls.parse(data, source="config.json: moekit")

    @classmethod
    def parse(cls, data: Any, source: str = "moekit record") -> MoeRecord:
        return parse_config(cls, data, source=source)

    def to_json(self) -> dict[str, Any]:
        """The JSON form kept in `config.moekit` (with the running moekit's version)."""
        return {**self.model_dump(mode="json", exclude_none=True), "moekit_version": __version__}

    # Typed views of the spec the model was made with (older records carry only what their spec had).

    @property
    def num_experts(self) -> int:
        return int(self.spec["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.spec["top_k"])

    @property
    def shared_expert(self) -> bool:
        return bool(self.spec.get("shared_expert", False))

    @property
    def balance_loss(self) -> str:
        return str(self.spec.get("balance_loss", "switch"))

    @property
    def aux_loss_coef(self) -> float:
        return float(self.spec.get("aux_loss_coef", 0.0))

    @property
    def z_loss_coef(self) -> float:
        return float(self.spec.get("z_loss_coef", 0.0))

    @property
    def expert_modalities(self) -> list[str | None]:
        """Each expert's modality (for prototype routers), None where it has none."""
        return [e.get("modality") for e in self.spec.get("experts", [])] or [None] * len(self.experts)

    @property
    def prototype_scale(self) -> float:
        return float((self.spec.get("router") or {}).get("prototype_scale", 1.0))


def dense_model_type(config: Any) -> str:
    """The dense family of a config or model: `qwen2_5_vl` for a moekit MoE model made from one."""
    config = getattr(config, "config", config)
    record = MoeRecord.of(config)
    if record is not None:
        return record.base_model_type
    return str(config.model_type).removeprefix(PREFIX)
