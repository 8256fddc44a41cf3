"""Qwen-VL pixel preprocessing (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): resize to multiples of patch*merge, patchify.

Written here rather than taken from transformers because the stock Qwen-VL *processors* need torchvision for
their video slot, and torchvision does not import beside the pinned torch (see ENV.md). For images the output is
identical to `transformers.Qwen2VLImageProcessorPil` (same PIL bicubic resize, same float64 rescale then float32
normalisation, same patch order); a test holds us to that. Video frames go through the same per-frame path, are
padded to a multiple of the temporal patch by repeating the last frame, and are grouped `temporal_patch_size`
frames per patch, in the stock video processor's patch order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class QwenPixelConfig:
    """The numbers a Qwen-VL vision tower expects; read from `preprocessor_config.json` when a model has one."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 28 * 28 * 768
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    fps: float = 2.0  # frame rate assumed for frame folders (seconds per temporal patch = temporal / fps)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def to_json(self) -> dict:
        """`preprocessor_config.json` content that both moekit and the stock image processor read."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
            "resample": 3,
            "moekit_video": {"min_pixels": self.video_min_pixels, "max_pixels": self.video_max_pixels, "fps": self.fps},
        }

    @classmethod
    def from_dir(cls, path: str | Path, vision_config: object | None = None) -> QwenPixelConfig:
        """Read `preprocessor_config.json` in `path`; missing keys fall back to the vision config, then defaults."""
        kwargs: dict = {}
        if vision_config is not None:
            kwargs["patch_size"] = getattr(vision_config, "patch_size", 14)
            kwargs["temporal_patch_size"] = getattr(vision_config, "temporal_patch_size", 2)
            kwargs["merge_size"] = getattr(vision_config, "spatial_merge_size", 2)
        file = Path(path) / "preprocessor_config.json"
        if file.is_file():
            data = json.loads(file.read_text())
            for key in ("patch_size", "temporal_patch_size", "merge_size"):
                if key in data:
                    kwargs[key] = int(data[key])
            size = data.get("size") or {}
            if "shortest_edge" in size:
                kwargs["min_pixels"] = int(size["shortest_edge"])
            if "longest_edge" in size:
                kwargs["max_pixels"] = int(size["longest_edge"])
            for key in ("min_pixels", "max_pixels"):
                if key in data:
                    kwargs[key] = int(data[key])
            if "image_mean" in data:
                kwargs["image_mean"] = tuple(float(v) for v in data["image_mean"])
                kwargs["image_std"] = tuple(float(v) for v in data["image_std"])
            video = data.get("moekit_video") or {}
            if "min_pixels" in video:
                kwargs["video_min_pixels"] = int(video["min_pixels"])
            if "max_pixels" in video:
                kwargs["video_max_pixels"] = int(video["max_pixels"])
            if "fps" in video:
                kwargs["fps"] = float(video["fps"])
        return cls(**kwargs)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above 200 ({width}x{height})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _normalise(frame: Image.Image, size: tuple[int, int], cfg: QwenPixelConfig) -> np.ndarray:
    """One RGB frame -> float32 [3, H, W], the stock processor's arithmetic step for step."""
    height, width = size
    if frame.mode != "RGB":
        frame = frame.convert("RGB")
    if (frame.height, frame.width) != (height, width):
        frame = frame.resize((width, height), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(frame).transpose(2, 0, 1)
    pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    return ((pixels.T - mean) / std).T


def _patchify(frames: np.ndarray, cfg: QwenPixelConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[T, C, H, W] (T a multiple of the temporal patch) -> ([t*h*w, C*tp*p*p], (t, h, w))."""
    t_all, channels, height, width = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    grid_t, grid_h, grid_w = t_all // tp, height // p, width // p
    patches = frames.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = np.ascontiguousarray(patches).reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
    return torch.from_numpy(flat), (grid_t, grid_h, grid_w)


def image_patches(image: Image.Image, cfg: QwenPixelConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """`pixel_values` rows and `(1, h, w)` grid for one image (a single frame repeated over the temporal patch)."""
    size = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    frame = _normalise(image, size, cfg)
    return _patchify(np.repeat(frame[None], cfg.temporal_patch_size, axis=0), cfg)


def video_size(height: int, width: int, cfg: QwenPixelConfig) -> tuple[int, int]:
    """The (height, width) every frame of a video of this size is resized to."""
    return smart_resize(height, width, cfg.factor, cfg.video_min_pixels, cfg.video_max_pixels)


def video_patches(frames: list[Image.Image], cfg: QwenPixelConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """`pixel_values_videos` rows and `(t, h, w)` grid for ordered frames of one video (all the same size)."""
    if not frames:
        raise ValueError("a video needs at least one frame")
    size = video_size(frames[0].height, frames[0].width, cfg)
    stack = np.stack([_normalise(f, size, cfg) for f in frames])
    if pad := -len(frames) % cfg.temporal_patch_size:
        stack = np.concatenate([stack, np.repeat(stack[-1:], pad, axis=0)])
    return _patchify(stack, cfg)
