"""What every built-in teacher shares: base params, frame sampling, resizing, normalising and token pooling.

Resizing uses `torch.nn.functional.interpolate` (torchvision does not import beside the pinned torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pydantic
import torch
import torch.nn.functional as F

from moekit.config import StrictModel
from moekit.config.base import is_pending

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherParams(StrictModel):
    """Params every built-in teacher takes. Weights load only from `checkpoint`, a local path."""

    checkpoint: Path
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    pooling: Literal["none", "mean", "tokens"] = "none"
    pool_tokens: int | None = pydantic.Field(default=None, ge=1)

    @pydantic.field_validator("checkpoint")
    @classmethod
    def _exists(cls, value: Path, info: pydantic.ValidationInfo) -> Path:
        if not value.exists() and not is_pending(value, info.context):
            raise ValueError(f"checkpoint path {str(value)!r} does not exist (weights load only from local paths)")
        return value

    @pydantic.field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        try:
            torch.device(value)
        except RuntimeError:
            raise ValueError(f"{value!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
        return value

    @pydantic.model_validator(mode="after")
    def _pooling(self) -> TeacherParams:
        if (self.pooling == "tokens") != (self.pool_tokens is not None):
            raise ValueError("pool_tokens (K >= 1) goes with pooling: tokens, and only with it")
        return self

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} is not available here (torch sees no CUDA device); use cpu")
        return device

    def pooling_name(self) -> str:
        return f"tokens:{self.pool_tokens}" if self.pooling == "tokens" else self.pooling


def stretch_indices(total: int, count: int) -> list[int]:
    """Exactly `count` frame indices spread evenly over `range(total)`, repeating frames when there are fewer
    (a single image becomes `count` copies of itself)."""
    if total < 1 or count < 1:
        raise ValueError(f"cannot sample {count} frames from {total}")
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def at_most(total: int, count: int | None) -> list[int]:
    """Up to `count` frame indices spread evenly over `range(total)`; all of them if there are not more."""
    return list(range(total)) if count is None or total <= count else stretch_indices(total, count)


def resize(frames: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """`[..., 3, H, W]` frames resized to `size` (antialiased), kept in [0, 1]."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    lead = frames.shape[:-3]
    flat = frames.reshape(-1, *frames.shape[-3:]).float()
    out = F.interpolate(flat, size=size, mode=mode, antialias=True, align_corners=False)
    return out.clamp_(0.0, 1.0).reshape(*lead, 3, *size).to(frames.dtype)


def center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    top = (frames.shape[-2] - height) // 2
    left = (frames.shape[-1] - width) // 2
    return frames[..., top : top + height, left : left + width]


def normalize(frames: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """`[..., 3, H, W]` frames in [0, 1] normalised per channel."""
    shape = (3, 1, 1)
    mean_t = torch.tensor(mean, dtype=frames.dtype, device=frames.device).view(shape)
    std_t = torch.tensor(std, dtype=frames.dtype, device=frames.device).view(shape)
    return (frames - mean_t) / std_t


def pool(features: torch.Tensor, mode: str, tokens: int | None = None) -> torch.Tensor:
    """Pool `[B, N, D]` features: "none", "mean" (-> `[B, 1, D]`) or "tokens" (-> `[B, K, D]`, the averages of K
    contiguous, near-equal runs of tokens in sequence order, as `adaptive_avg_pool1d` splits them)."""
    if mode == "none":
        return features
    if mode == "mean":
        return features.mean(dim=1, keepdim=True)
    if mode == "tokens":
        if tokens is None or tokens > features.shape[1]:
            raise ValueError(
                f"pool_tokens={tokens} needs at least that many tokens; the teacher gave {features.shape[1]}"
            )
        pooled = F.adaptive_avg_pool1d(features.transpose(1, 2).float(), tokens)
        return pooled.transpose(1, 2).to(features.dtype)
    raise ValueError(f"unknown pooling {mode!r}; choose none, mean or tokens")


def checkpoint_file(path: Path, names: tuple[str, ...], what: str) -> Path:
    """`path` itself if it is a file, else the first of `names` inside it; the error lists what was looked for."""
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: no {what} checkpoint file in this folder (looked for {', '.join(names)})")
