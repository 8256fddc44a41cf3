"""Where each supported Hugging Face family keeps its decoder layers (the vision side is never listed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AutoKind = Literal["image-text-to-text", "causal-lm"]


@dataclass(frozen=True)
class Family:
    """Facts about one transformers `model_type`."""

    layers: str  # dotted module path of the decoder's ModuleList
    mlp: str = "mlp"  # attribute of each decoder layer holding the FFN
    auto: AutoKind = "image-text-to-text"
    video: bool = False  # whether the family takes video input
    native_moe: str | None = None  # transformers' stock MoE twin, if any (see moekit export --native)


_VLM = "model.language_model.layers"

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(_VLM, video=True),
    "qwen2_5_vl": Family(_VLM, video=True),
    "qwen3_vl": Family(_VLM, video=True, native_moe="qwen3_vl_moe"),
    "llava": Family(_VLM),
    "llava_onevision": Family(_VLM, video=True),
    "idefics3": Family("model.text_model.layers"),
    "smolvlm": Family("model.text_model.layers"),
    "gemma3": Family(_VLM),
    "internvl": Family(_VLM),
    "mistral3": Family(_VLM),
    "paligemma": Family(_VLM),
    "qwen2": Family("model.layers", auto="causal-lm"),
    "qwen3": Family("model.layers", auto="causal-lm", native_moe="qwen3_moe"),
    "llama": Family("model.layers", auto="causal-lm", native_moe="mixtral"),
    "mistral": Family("model.layers", auto="causal-lm", native_moe="mixtral"),
    "phi3": Family("model.layers", auto="causal-lm"),  # fused gate_up_proj
    "phi": Family("model.layers", auto="causal-lm"),  # plain fc1 -> GELU -> fc2 with biases
}

IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")
VIDEO_TOKEN_KEYS = ("video_token_id", "video_token_index")
