"""Tiny random teacher checkpoints in the real on-disk formats, for smoke tests and the CPU pipeline.

The weights are random, so the features are those of a random network of the real architecture: they still
depend deterministically on the input frames, which is all a distillation smoke test or the tiny PolyV run
needs. Real runs point `checkpoint` at the released weights instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit_plugins.teachers.vggt.config import VGGTArch

TINY_VGGT = VGGTArch.tiny()


def tiny_vjepa2_config():
    import transformers

    return transformers.VJEPA2Config(
        patch_size=4,
        crop_size=16,
        frames_per_clip=4,
        tubelet_size=2,
        hidden_size=24,
        num_attention_heads=2,
        num_hidden_layers=2,
        mlp_ratio=2.0,
        num_pooler_layers=1,
        pred_hidden_size=12,
        pred_num_attention_heads=2,
        pred_num_hidden_layers=1,
        pred_num_mask_tokens=2,
    )


def write_tiny_vjepa2(out: str | Path, seed: int = 0) -> Path:
    """A tiny `VJEPA2Model` saved with `save_pretrained` (config.json + safetensors) in the folder `out`."""
    import transformers

    torch.manual_seed(seed)
    transformers.VJEPA2Model(tiny_vjepa2_config()).save_pretrained(out)
    return Path(out)


def random_aggregator(arch: VGGTArch = TINY_VGGT, seed: int = 0):
    """An aggregator whose every tensor is random (std 0.3), so each block visibly changes its input."""
    from moekit_plugins.teachers.vggt.aggregator import Aggregator

    torch.manual_seed(seed)
    model = Aggregator(arch)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.normal_(0.0, 0.3)
    return model.eval()


def write_tiny_vggt(out: str | Path, seed: int = 0) -> Path:
    """A tiny aggregator in the released checkpoint's key layout, as `out/model.safetensors`. Build the teacher
    with `arch` = `VGGTArch.tiny()` (img_size 28, patch 7, embed 16, depth 2, heads 2, 2 registers, DINO depth
    1 with 2 heads)."""
    from safetensors.torch import save_file

    from moekit_plugins.teachers.vggt.checkpoint import aggregator_state

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(aggregator_state(random_aggregator(TINY_VGGT, seed)), str(out / "model.safetensors"))
    return out


def tiny_siglip_config(hidden_size: int = 32):
    import transformers

    return transformers.SiglipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )


def write_tiny_siglip(out: str | Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A tiny `SiglipVisionModel` (16 px, 8 px patches: 4 tokens a frame, 32 wide like the tiny VGGT's `concat`
    features, so L_sc can join them) saved with `save_pretrained` (safetensors), beside its image processor."""
    import transformers

    torch.manual_seed(seed)
    transformers.SiglipVisionModel(tiny_siglip_config(hidden_size)).save_pretrained(out)
    transformers.SiglipImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(out)
    return Path(out)
