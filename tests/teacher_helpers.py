"""Tiny teacher checkpoints and frame folders for the teacher tests (random weights, real layouts)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from moekit_plugins.teachers.tiny import TINY_VGGT, random_aggregator, tiny_vjepa2_config, write_tiny_vjepa2  # noqa: F401
from moekit_plugins.teachers.vggt.checkpoint import aggregator_state
from moekit_plugins.teachers.vggt.config import VGGTArch

TINY_VGGT_PARAMS = {"arch": TINY_VGGT.model_dump(), "image_size": 28, "num_frames": 4}


def vggt_checkpoint(
    path: Path, arch: VGGTArch = TINY_VGGT, seed: int = 0, heads: bool = True, drop=(), add=None
) -> Path:
    """Write a tiny aggregator in the released checkpoint's key layout (.safetensors, or torch.save for .pt),
    with a few head tensors beside it as in the full model file."""
    state = aggregator_state(random_aggregator(arch, seed))
    if heads:
        state["camera_head.trunk.0.norm1.weight"] = torch.ones(2 * arch.embed_dim)
        state["depth_head.projects.0.weight"] = torch.zeros(4, 2 * arch.embed_dim, 1, 1)
        state["track_head.feature_extractor.norm.weight"] = torch.ones(3)
    for key in drop:
        del state[key]
    state.update(add or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def vjepa2_checkpoint(path: Path, seed: int = 0) -> Path:
    return write_tiny_vjepa2(path, seed)


def write_frames(folder: Path, count: int, size: tuple[int, int] = (20, 30), seed: int = 0) -> list[Path]:
    """`count` random RGB PNG frames named 1.png, 2.png, ... 10.png (natural order differs from text order)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(1, count + 1):
        pixels = torch.randint(0, 256, (size[0], size[1], 3), generator=gen, dtype=torch.uint8).numpy()
        path = folder / f"{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
