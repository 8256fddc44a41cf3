"""The family facts a plug-in can add through `moekit_arch_adapters`: `Family` and where its visual tokens come out.

These are the types of the plug-in contract, so they live beside the hookspecs; moekit's own table of families
(`moekit.arch.families`) is written with them too.
"""

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
    vision tower and projector/merger). `layout` says which pixels a token covers (see moekit.attach.visual):
    `merged_patches` (Qwen-VL: patch P, M x M spatial merge, T frames per temporal patch) or `pooled_frames`
    (LLaVA-OneVision video: per-frame patch grid pooled 2x bilinearly, then one newline token per video).
    """

    layout: VisualLayout
    owner: str = "model"
    image: str | None = "get_image_features"
    video: str | None = "get_video_features"


@dataclass(frozen=True)
class Family:
    """Facts about one transformers `model_type` that structure cannot give. moekit finds every family's decoder
    layers and FFNs by structure; `layers` / `mlp` only pin them where a family wants to (a dotted module path of
    the decoder's ModuleList, the layer attribute holding the FFN)."""

    layers: str | None = None
    mlp: str = "mlp"
    auto: AutoKind | None = None  # unused since 0.2: the model's own class decides (kept for plug-ins)
    video: bool = False  # whether the family takes video input
    native_moe: str | None = None  # transformers' stock MoE twin, if any (see moekit export --native)
    visual: VisualSite | None = None  # where visual tokens enter LLM space (position encoders), if known
    vision: str | None = None  # module path of the vision tower (trainable group `vision_tower`)
    projector: tuple[str, ...] = ()  # module/parameter paths of the vision-language projector (group `projector`)
