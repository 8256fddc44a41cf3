"""Where each supported Hugging Face family keeps its decoder layers (the vision side is never listed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AutoKind = Literal["image-text-to-text", "causal-lm"]


VisualLayout = Literal["merged_patches", "pooled_frames"]


@dataclass(frozen=True)
class VisualSite:
    """Where a family's visual tokens come out in LLM space, and how they map to the pixels the encoder saw.

    `owner` is the module (relative to the top-level model; the model itself when absent) whose `image` /
    `video` methods return those tokens (transformers' `get_image_features` / `get_video_features`, after the
    vision tower and projector/merger). `layout` says which pixels a token covers (see moekit.arch.visual):
    `merged_patches` (Qwen-VL: patch P, M x M spatial merge, T frames per temporal patch) or `pooled_frames`
    (LLaVA-OneVision video: per-frame patch grid pooled 2x bilinearly, then one newline token per video).
    """

    layout: VisualLayout
    owner: str = "model"
    image: str | None = "get_image_features"
    video: str | None = "get_video_features"


@dataclass(frozen=True)
class Family:
    """Facts about one transformers `model_type`."""

    layers: str  # dotted module path of the decoder's ModuleList
    mlp: str = "mlp"  # attribute of each decoder layer holding the FFN
    auto: AutoKind = "image-text-to-text"
    video: bool = False  # whether the family takes video input
    native_moe: str | None = None  # transformers' stock MoE twin, if any (see moekit export --native)
    visual: VisualSite | None = None  # where visual tokens enter LLM space (position encoders), if known
    vision: str | None = None  # module path of the vision tower (trainable group `vision_tower`)
    projector: tuple[str, ...] = ()  # module/parameter paths of the vision-language projector (group `projector`)


_VLM = "model.language_model.layers"
_QWEN = dict(video=True, vision="model.visual", projector=("model.visual.merger",), visual=VisualSite("merged_patches"))
_TOWER = dict(vision="model.vision_tower", projector=("model.multi_modal_projector",))
_IDEFICS = dict(vision="model.vision_model", projector=("model.connector",))

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(_VLM, **_QWEN),
    "qwen2_5_vl": Family(_VLM, **_QWEN),
    "qwen3_vl": Family(
        _VLM,
        **{**_QWEN, "projector": ("model.visual.merger", "model.visual.deepstack_merger_list")},
        native_moe="qwen3_vl_moe",
    ),
    "llava": Family(_VLM, **_TOWER),
    "llava_onevision": Family(
        _VLM,
        video=True,
        vision="model.vision_tower",
        projector=("model.multi_modal_projector", "model.image_newline"),
        visual=VisualSite("pooled_frames"),
    ),
    "idefics3": Family("model.text_model.layers", **_IDEFICS),
    "smolvlm": Family("model.text_model.layers", **_IDEFICS),
    "gemma3": Family(_VLM, **_TOWER),
    "internvl": Family(_VLM, **_TOWER),
    "mistral3": Family(_VLM, **_TOWER),
    "paligemma": Family(_VLM, **_TOWER),
    "qwen2": Family("model.layers", auto="causal-lm"),
    "qwen3": Family("model.layers", auto="causal-lm", native_moe="qwen3_moe"),
    "llama": Family("model.layers", auto="causal-lm", native_moe="mixtral"),
    "mistral": Family("model.layers", auto="causal-lm", native_moe="mixtral"),
    "phi3": Family("model.layers", auto="causal-lm"),  # fused gate_up_proj
    "phi": Family("model.layers", auto="causal-lm"),  # plain fc1 -> GELU -> fc2 with biases
}

IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")
VIDEO_TOKEN_KEYS = ("video_token_id", "video_token_index")


def family_for(model_type: str) -> Family | None:
    """The built-in family, else one a plug-in adds through `moekit_arch_adapters`, else None."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    from moekit.registry import registry

    return registry().families().get(model_type)


def known_families() -> list[str]:
    """Every model type moekit can resolve: the built-in table plus plug-in families."""
    from moekit.registry import registry

    return sorted({*FAMILIES, *registry().families()})
