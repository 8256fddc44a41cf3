"""Tiny random models built from real transformers configs, for the demo, tests and benchmarks.

Every family moekit supports has a builder here: hidden size 32, two to four decoder layers, a small
vocabulary whose top ids are the model's special image/video tokens. Weights are random; nothing is
downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

VOCAB = 320
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 310, 311, 312, 313
BOI_ID, EOI_ID, PAD_ID = 314, 315, 0

_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=PAD_ID,
)
_CLIP = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,
    projection_dim=32,
)
_SIGLIP = dict(_CLIP, model_type="siglip_vision_model")
_QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32)


def _qwen2_vl() -> transformers.PreTrainedConfig:
    text = dict(_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2)
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_ids())


def _qwen2_5_vl() -> transformers.PreTrainedConfig:
    text = dict(_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4})
    vision = dict(_QWEN_VISION, fullatt_block_indexes=[0], window_size=28)
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_ids())


def _qwen3_vl() -> transformers.PreTrainedConfig:
    text = dict(
        _TEXT,
        head_dim=8,
        rope_parameters={
            "rope_type": "default",
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
            "rope_theta": 1e4,
        },
    )
    vision = dict(_QWEN_VISION, deepstack_visual_indexes=[0], num_position_embeddings=16, patch_size=14)
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids())


def _qwen_ids() -> dict[str, int]:
    return dict(
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )


def _llava() -> transformers.PreTrainedConfig:
    return transformers.LlavaConfig(
        text_config=dict(_TEXT, model_type="llama"), vision_config=_CLIP, image_token_index=IMAGE_ID
    )


def _llava_onevision() -> transformers.PreTrainedConfig:
    return transformers.LlavaOnevisionConfig(
        text_config=dict(_TEXT, model_type="qwen2"),
        vision_config=_SIGLIP,
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        image_grid_pinpoints=[[28, 28]],
        vision_feature_layer=-1,
    )


def _idefics3(cls=transformers.Idefics3Config) -> transformers.PreTrainedConfig:
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14
    )
    return cls(
        text_config=dict(_TEXT, model_type="llama"), vision_config=vision, image_token_id=IMAGE_ID, scale_factor=1
    )


def _smolvlm() -> transformers.PreTrainedConfig:
    return _idefics3(transformers.SmolVLMConfig)


def _gemma3() -> transformers.PreTrainedConfig:
    text = dict(_TEXT, head_dim=8, sliding_window=16)
    return transformers.Gemma3Config(
        text_config=text,
        vision_config=_SIGLIP,
        mm_tokens_per_image=4,
        image_token_index=IMAGE_ID,
        boi_token_index=BOI_ID,
        eoi_token_index=EOI_ID,
    )


def _internvl() -> transformers.PreTrainedConfig:
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=[28, 28],
        patch_size=[14, 14],
    )
    return transformers.InternVLConfig(
        text_config=dict(_TEXT, model_type="qwen2"), vision_config=vision, image_token_id=IMAGE_ID, downsample_ratio=1.0
    )


def _mistral3() -> transformers.PreTrainedConfig:
    vision = dict(
        model_type="pixtral",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        head_dim=8,
    )
    return transformers.Mistral3Config(
        text_config=dict(_TEXT, model_type="mistral", head_dim=8),
        vision_config=vision,
        image_token_index=IMAGE_ID,
        spatial_merge_size=1,
    )


def _paligemma() -> transformers.PreTrainedConfig:
    return transformers.PaliGemmaConfig(
        text_config=dict(_TEXT, model_type="gemma", head_dim=8),
        vision_config=dict(_SIGLIP, projection_dim=32),
        image_token_index=IMAGE_ID,
        projection_dim=32,
    )


def _text(model_type: str) -> transformers.PreTrainedConfig:
    extra = {"head_dim": 8} if model_type in ("qwen3", "mistral") else {}
    if model_type == "phi":
        extra = {"partial_rotary_factor": 0.5}
    return transformers.AutoConfig.for_model(model_type, **_TEXT, **extra)


FAMILIES: dict[str, Any] = {
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "llava": _llava,
    "llava_onevision": _llava_onevision,
    "idefics3": _idefics3,
    "smolvlm": _smolvlm,
    "gemma3": _gemma3,
    "internvl": _internvl,
    "mistral3": _mistral3,
    "paligemma": _paligemma,
    "qwen2": lambda: _text("qwen2"),
    "qwen3": lambda: _text("qwen3"),
    "llama": lambda: _text("llama"),
    "mistral": lambda: _text("mistral"),
    "phi3": lambda: _text("phi3"),
    "phi": lambda: _text("phi"),
}


def tiny_config(family: str) -> transformers.PreTrainedConfig:
    """Config of a tiny random model of `family` (one of `FAMILIES`)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family]()


def tiny_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random fp32 model of `family`, in eval mode."""
    config = tiny_config(family)
    torch.manual_seed(seed)
    auto = (
        transformers.AutoModelForImageTextToText
        if hasattr(config, "vision_config")
        else transformers.AutoModelForCausalLM
    )
    return auto.from_config(config, dtype=torch.float32).eval()


VIDEO_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"})


def _qwen_patches(grid: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    t, h, w = grid
    return torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=generator)


def visual_inputs(family: str, kind: str, generator: torch.Generator) -> tuple[dict[str, Any], int, int]:
    """Pixel inputs for one image or video of a tiny model: (kwargs, number of visual tokens, token id)."""
    if kind == "video" and family not in VIDEO_FAMILIES:
        raise ValueError(f"tiny family {family!r} takes no video; video families: {sorted(VIDEO_FAMILIES)}")
    pix = torch.randn(1, 3, 28, 28, generator=generator)
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        if kind == "video":
            grid = (2, 4, 4)
            kw = {"pixel_values_videos": _qwen_patches(grid, generator), "video_grid_thw": torch.tensor([grid])}
            return kw, 2 * 4 * 4 // 4, VIDEO_ID
        grid = (1, 4, 4)
        return {"pixel_values": _qwen_patches(grid, generator), "image_grid_thw": torch.tensor([grid])}, 4, IMAGE_ID
    if family == "llava_onevision":
        if kind == "video":
            frames = torch.randn(1, 2, 3, 28, 28, generator=generator)
            return {"pixel_values_videos": frames}, 3, VIDEO_ID
        return (
            {"pixel_values": pix[:, None].expand(1, 2, 3, 28, 28).clone(), "image_sizes": torch.tensor([[28, 28]])},
            10,
            IMAGE_ID,
        )
    if family in ("idefics3", "smolvlm"):
        return {"pixel_values": pix[:, None]}, 4, IMAGE_ID
    if family == "mistral3":
        return {"pixel_values": pix, "image_sizes": torch.tensor([[28, 28]])}, 4, IMAGE_ID
    if family in ("llava", "gemma3", "internvl", "paligemma"):
        return {"pixel_values": pix}, 4, IMAGE_ID
    raise ValueError(f"tiny family {family!r} has no {kind} input")


def tiny_inputs(family: str, kind: str = "text", seed: int = 0, text_len: int = 12) -> dict[str, Any]:
    """A one-sample batch for a tiny `family` model: plain text, or text around one image or video."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, IMAGE_ID - 10, (text_len,), generator=generator)
    if kind == "text":
        ids, kwargs = text, {}
    else:
        kwargs, n_visual, token_id = visual_inputs(family, kind, generator)
        visual = torch.full((n_visual,), token_id)
        if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            # Qwen3-VL wraps every temporal patch of a video in its own start/end pair.
            chunks = 2 if family == "qwen3_vl" and kind == "video" else 1
            wrap = [torch.tensor([VISION_START_ID]), visual[: n_visual // chunks], torch.tensor([VISION_END_ID])]
            visual = torch.cat(wrap * chunks)
        half = text_len // 2
        ids = torch.cat([text[:half], visual, text[half:]])
    batch = {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long), **kwargs}
    if family in ("qwen2_vl", "qwen3_vl", "qwen2_5_vl"):
        batch["mm_token_type_ids"] = ((ids == IMAGE_ID).long() + 2 * (ids == VIDEO_ID).long())[None]
    if family in ("gemma3", "paligemma"):
        batch["token_type_ids"] = (ids == IMAGE_ID).long()[None]
    return batch


def write_tiny_checkpoint(
    out: str | Path, family: str = "qwen2_5_vl", specialists: list[str] = (), seed: int = 0, shift: float = 0.02
) -> dict[str, Path]:
    """Write a tiny random dense checkpoint to `out/base` and, for each name in `specialists`, an FFN-only
    checkpoint `out/<name>` that stands in for a stage 1-2 specialist (the base FFNs plus a small random shift
    of relative size `shift`), keyed exactly as the dense checkpoint names them. Returns the folders."""
    from safetensors.torch import save_file

    from moekit.arch import ffn_state_keys, resolve_arch
    from moekit.io.names import KeyNames

    out = Path(out)
    model = tiny_model(family, seed=seed)
    paths = {"base": out / "base"}
    model.save_pretrained(paths["base"])
    adapter = resolve_arch(model)
    names = KeyNames(model)
    state = model.state_dict()
    generator = torch.Generator().manual_seed(seed + 1)
    for name in specialists:
        tensors = {}
        for layer in range(adapter.num_layers):
            for keys in ffn_state_keys(adapter.ffn, adapter.ffn_prefix(layer)).values():
                for key in keys:
                    if key in state:
                        w = state[key]
                        noise = torch.randn(w.shape, generator=generator) * shift * w.std()
                        tensors[names.saved(key)] = (w + noise).contiguous()
        paths[name] = out / name
        paths[name].mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(paths[name] / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(paths[name])
    return paths
