"""The transformers config classes of moekit's Qwen2 and Qwen2.5-VL MoE checkpoints, for the serving process.

They are Qwen2's and Qwen2.5-VL's configs under moekit's model types (vLLM's Qwen2.5-VL processing checks
`isinstance` against `Qwen2_5_VLConfig`); they read the `moekit` record of config.json into a small typed
`MoeLayout` that the language model's layers find on their text config. Written here rather than imported from
moekit: moekit pins a transformers version that vLLM's environment does not have.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from transformers import Qwen2_5_VLConfig, Qwen2Config

FORMAT = 1  # the moekit record's `format` this plug-in reads


@dataclass(frozen=True)
class MoeLayout:
    """Which decoder layers are MoE and how they route (from config.json's `moekit` record)."""

    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    intermediate_size: int
    shared_expert: bool

    @classmethod
    def of(cls, text_config: Any) -> MoeLayout | None:
        """The layout a text config carries (None for a dense one)."""
        data = getattr(text_config, "moekit_layout", None)
        return None if not data else cls(**{**data, "layers": tuple(data["layers"])})

    @classmethod
    def from_record(cls, record: dict[str, Any], where: str = "config.json") -> MoeLayout:
        if record.get("format", FORMAT) != FORMAT:
            raise ValueError(f"{where}: moekit.format {record.get('format')!r}; this plug-in reads format {FORMAT}")
        spec = record.get("spec") or {}
        missing = [f"moekit.{k}" for k in ("layers", "intermediate_size") if k not in record]
        missing += [f"moekit.spec.{k}" for k in ("num_experts", "top_k") if k not in spec]
        if missing:
            raise ValueError(f"{where}: the moekit record lacks {', '.join(missing)}")
        ffn = (record.get("arch") or {}).get("ffn") or {}
        if ffn.get("kind", "gated") != "gated" or record.get("biased"):
            raise ValueError(
                f"{where}: moekit.arch.ffn is {ffn.get('kind')!r} with biases={record.get('biased')}; vLLM's fused "
                "MoE serves bias-free gated (SwiGLU) experts"
            )
        return cls(
            layers=tuple(int(i) for i in record["layers"]),
            num_experts=int(spec["num_experts"]),
            top_k=int(spec["top_k"]),
            intermediate_size=int(record["intermediate_size"]),
            shared_expert=bool(spec.get("shared_expert", False)),
        )


def _attach(config: Any, moekit: dict[str, Any] | None) -> None:
    """Keep the record and give the text config the layout its layers read (checked here, at config load)."""
    config.moekit = moekit or {}
    if not moekit:
        return
    text = config.get_text_config()
    act = getattr(text, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act {act!r}; vLLM's Qwen2 layers take silu only")
    text.moekit_layout = asdict(MoeLayout.from_record(moekit))


class MoekitQwen2Config(Qwen2Config):
    """Qwen2's config with moekit's MoE layout (moekit's Qwen2 / Qwen2.5 text checkpoints)."""

    model_type = "moekit_qwen2"

    def __init__(self, moekit: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        _attach(self, moekit)


class MoekitQwen2_5_VLConfig(Qwen2_5_VLConfig):
    """Qwen2.5-VL's config with moekit's MoE layout; `text_config.moekit_layout` (a plain dict, so the config stays
    serialisable) is what the layers read, through `MoeLayout.of`."""

    model_type = "moekit_qwen2_5_vl"

    def __init__(self, moekit: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        _attach(self, moekit)


CONFIGS = {c.model_type: c for c in (MoekitQwen2Config, MoekitQwen2_5_VLConfig)}
