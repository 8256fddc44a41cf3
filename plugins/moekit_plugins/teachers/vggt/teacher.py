"""VGGT teacher: multi-view 3D features from VGGT's aggregator.

Frames are sampled uniformly down to `num_frames` (all when None), resized as VGGT's own loader does (`crop`:
width to `image_size`, height scaled to a multiple of the patch and centre-cropped to at most `image_size`;
`pad`: the longer side to `image_size`, then padded with white to a square) and run through the aggregator.

Features are the tokens of one aggregator layer (`layer`, default the last). `output` picks `concat` (frame-wise
and global block outputs side by side, 2 x embed_dim = 2048 wide: what VGGT's heads read), `global` or `frame`
(embed_dim wide). `tokens: patch` (default) keeps each frame's patch tokens, N = frames x rows x cols in frame,
then row-major order; `all` also keeps each frame's camera and register tokens in front of its patches.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
import torch.nn.functional as F

from moekit.attach.teachers.interface import TeacherBatch, TeacherOutput
from moekit_plugins.teachers.common import TeacherParams, at_most, center_crop, pool, resize
from moekit_plugins.teachers.vggt.config import VGGTArch


class VGGTParams(TeacherParams):
    """`checkpoint`: the released VGGT checkpoint file (model.pt or model.safetensors) or a folder holding it."""

    arch: VGGTArch = VGGTArch()
    num_frames: int | None = pydantic.Field(default=32, ge=1)
    image_size: int = pydantic.Field(default=518, ge=1)
    resize: Literal["crop", "pad"] = "crop"
    layer: int = -1
    output: Literal["concat", "global", "frame"] = "concat"
    tokens: Literal["patch", "all"] = "patch"

    @pydantic.model_validator(mode="after")
    def _sizes(self) -> VGGTParams:
        if self.image_size % self.arch.patch_size:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of arch.patch_size={self.arch.patch_size}"
            )
        depth = self.arch.depth
        if not -depth <= self.layer < depth:
            raise ValueError(
                f"layer={self.layer} does not exist: the aggregator has {depth} (valid -{depth}..{depth - 1})"
            )
        return self


def _multiple(value: float, step: int) -> int:
    return max(step, round(value / step) * step)


class VGGTTeacher:
    name = "vggt"

    def __init__(self, params: VGGTParams):
        from moekit_plugins.teachers.vggt.checkpoint import load_aggregator

        self.params = params
        self.device = params.torch_device()
        self.model = load_aggregator(params.checkpoint, params.arch, params.torch_dtype(), self.device)
        self.num_frames: int | None = params.num_frames
        self.dim: int = params.arch.embed_dim * (2 if params.output == "concat" else 1)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """`[B, S, 3, H, W]` in [0, 1] -> `[B, S, 3, H', W']` with H', W' multiples of the patch size."""
        size, patch = self.params.image_size, self.params.arch.patch_size
        height, width = frames.shape[-2:]
        if self.params.resize == "crop":
            frames = resize(frames, (_multiple(height * size / width, patch), size), mode="bicubic")
            return center_crop(frames, min(frames.shape[-2], size), size)
        if width >= height:
            new = (_multiple(height * size / width, patch), size)
        else:
            new = (size, _multiple(width * size / height, patch))
        frames = resize(frames, new, mode="bicubic")
        top, left = (size - new[0]) // 2, (size - new[1]) // 2
        return F.pad(frames, (left, size - new[1] - left, top, size - new[0] - top), value=1.0)

    def features(self, batch: TeacherBatch) -> TeacherOutput:
        clip = batch.clip()
        indices = at_most(clip.shape[1], self.params.num_frames)
        images = self.preprocess(clip[:, indices].to(self.device, torch.float32)).to(self.params.torch_dtype())
        with torch.no_grad():
            outputs, (rows, cols) = self.model(images, [self.params.layer])
        frame_out, global_out = outputs[self.params.layer]
        picked = {"frame": frame_out, "global": global_out}.get(self.params.output)
        tokens = picked if picked is not None else torch.cat([frame_out, global_out], dim=-1)
        if self.params.tokens == "patch":
            tokens = tokens[:, :, self.params.arch.special_tokens :]
        features = pool(tokens.flatten(1, 2), self.params.pooling, self.params.pool_tokens)
        extra = {"special_tokens_per_frame": self.params.arch.special_tokens if self.params.tokens == "all" else 0}
        return TeacherOutput(
            features, self.name, (len(indices), rows, cols), tuple(indices), self.params.pooling_name(), extra
        )
