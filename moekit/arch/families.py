"""The table of families moekit knows: where each keeps its decoder layers, vision tower, projector and visual
tokens, and its stock MoE twin. Data only; `moekit.arch.lookup` merges it with the families plug-ins add."""

from __future__ import annotations

from moekit.plugins.family import Family, VisualSite

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
