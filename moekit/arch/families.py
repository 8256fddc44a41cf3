"""The facts about families that structure cannot give: where the vision tower, projector and visual tokens are,
and the stock MoE twin. Data only; `moekit.arch.lookup` merges it with the families plug-ins add. Decoder layers
and FFNs are found by structure for every family (`moekit.arch.detect`)."""

from __future__ import annotations

from moekit.plugins.family import Family, VisualSite

_QWEN = dict(video=True, vision="model.visual", projector=("model.visual.merger",), visual=VisualSite("merged_patches"))
_TOWER = dict(vision="model.vision_tower", projector=("model.multi_modal_projector",))
_IDEFICS = dict(vision="model.vision_model", projector=("model.connector",))

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(**_QWEN),
    "qwen2_5_vl": Family(**_QWEN),
    "qwen3_vl": Family(
        **{**_QWEN, "projector": ("model.visual.merger", "model.visual.deepstack_merger_list")},
        native_moe="qwen3_vl_moe",
    ),
    "llava": Family(**_TOWER),
    "llava_onevision": Family(
        video=True,
        vision="model.vision_tower",
        projector=("model.multi_modal_projector", "model.image_newline"),
        visual=VisualSite("pooled_frames"),
    ),
    "idefics3": Family(**_IDEFICS),
    "smolvlm": Family(**_IDEFICS),
    "gemma3": Family(**_TOWER),
    "internvl": Family(**_TOWER),
    "mistral3": Family(**_TOWER),
    "paligemma": Family(**_TOWER),
    "qwen3": Family(native_moe="qwen3_moe"),
    "llama": Family(native_moe="mixtral"),
    "mistral": Family(native_moe="mixtral"),
}

IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")
VIDEO_TOKEN_KEYS = ("video_token_id", "video_token_index")
