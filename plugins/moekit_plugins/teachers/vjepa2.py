"""V-JEPA 2 teacher: video features from transformers' `VJEPA2Model` encoder (tubelet 2x16x16, 3D RoPE).

Frames are sampled uniformly to exactly `num_frames` (a single image, or a shorter clip, repeats frames), resized
to the model's square crop (`crop`: shortest edge to crop*256/224 then a centre crop, like the stock video
processor; `squash`: straight to crop x crop), normalised with the checkpoint's mean/std (ImageNet when it ships
no preprocessor config) and encoded; the predictor is never run. Features are the encoder's `last_hidden_state`
`[B, (num_frames/2) * (crop/16)^2, hidden]`, optionally pooled. The crop must match the config: V-JEPA 2's RoPE
derives token positions from `config.crop_size`, so any other input size would be encoded with wrong positions.
"""

from __future__ import annotations

import json
from typing import Literal

import pydantic
import torch

from moekit.attach.teachers.interface import TeacherBatch, TeacherOutput
from moekit_plugins.teachers.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TeacherParams,
    center_crop,
    normalize,
    pool,
    resize,
    stretch_indices,
)

PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


class VJEPA2Params(TeacherParams):
    """`checkpoint`: a local folder saved by `save_pretrained` (config.json + weights)."""

    num_frames: int = pydantic.Field(default=16, ge=1)
    resize: Literal["crop", "squash"] = "crop"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


def _mean_std(folder) -> tuple[tuple[float, ...], tuple[float, ...]]:
    for name in PREPROCESSOR_FILES:
        file = folder / name
        if file.is_file():
            data = json.loads(file.read_text())
            if "image_mean" in data and "image_std" in data:
                return tuple(data["image_mean"]), tuple(data["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


def _load(params: VJEPA2Params):
    from transformers import VJEPA2Model

    folder = params.checkpoint
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        raise FileNotFoundError(f"{folder}: a V-JEPA 2 checkpoint is a folder with config.json and weights")
    model, info = VJEPA2Model.from_pretrained(
        folder,
        local_files_only=True,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # so that wrong shapes come back in `info` and are named below
        dtype=params.torch_dtype(),
        attn_implementation=params.attn_implementation,
    )
    # The predictor is never run, so its keys may be absent (e.g. an encoder-only export); the encoder's may not.
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("predictor."))
    unexpected = sorted(k for k in info["unexpected_keys"] if k.startswith(("encoder.", "predictor.")))
    mismatched = sorted(
        f"{k[0]} (checkpoint {list(k[1])}, model {list(k[2])})" if isinstance(k, tuple) else str(k)
        for k in info["mismatched_keys"]
    )
    labels = ("missing keys", "unexpected keys", "shape mismatches")
    problems = [f"{label}: {', '.join(keys)}" for label, keys in zip(labels, (missing, unexpected, mismatched)) if keys]
    if problems:
        raise ValueError(f"{folder}: not a matching V-JEPA 2 checkpoint; " + "; ".join(problems))
    return model


class VJEPA2Teacher:
    name = "vjepa2"

    def __init__(self, params: VJEPA2Params):
        self.params = params
        self.device = params.torch_device()
        self.model = _load(params).to(self.device).eval().requires_grad_(False)
        config = self.model.config
        if params.num_frames % config.tubelet_size:
            raise ValueError(
                f"num_frames={params.num_frames} must be a multiple of the tubelet size {config.tubelet_size}"
            )
        self.num_frames: int | None = params.num_frames
        self.dim: int = config.hidden_size
        self.crop: int = config.crop_size
        self.grid = (
            params.num_frames // config.tubelet_size,
            self.crop // config.patch_size,
            self.crop // config.patch_size,
        )
        self.mean, self.std = _mean_std(params.checkpoint)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """`[B, T, 3, H, W]` in [0, 1] -> normalised `[B, T, 3, crop, crop]`."""
        if self.params.resize == "squash":
            frames = resize(frames, (self.crop, self.crop))
        else:
            short = int(self.crop * 256 / 224)
            height, width = frames.shape[-2:]
            scale = short / min(height, width)
            size = (max(self.crop, round(height * scale)), max(self.crop, round(width * scale)))
            frames = center_crop(resize(frames, size), self.crop, self.crop)
        return normalize(frames, self.mean, self.std)

    def features(self, batch: TeacherBatch) -> TeacherOutput:
        clip = batch.clip()
        indices = stretch_indices(clip.shape[1], self.params.num_frames)
        clip = self.preprocess(clip[:, indices].to(self.device, torch.float32)).to(self.params.torch_dtype())
        with torch.no_grad():
            hidden = self.model(pixel_values_videos=clip, skip_predictor=True).last_hidden_state
        features = pool(hidden, self.params.pooling, self.params.pool_tokens)
        return TeacherOutput(features, self.name, self.grid, tuple(indices), self.params.pooling_name())
