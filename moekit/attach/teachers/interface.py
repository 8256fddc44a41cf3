"""What a distillation teacher takes and gives back; plug-ins implement it, the feature cache and training use it.

A teacher is built by its `Component.build(params)` (registered through the `moekit_teachers` hook) and is any
object with

    name: str                      # the registered name, e.g. "vjepa2"
    dim: int                       # D, the feature width it returns
    num_frames: int | None         # how many frames it wants at most (None: any number); loaders may pre-sample
    features(batch) -> TeacherOutput

`batch` is a `TeacherBatch`: `frames` float `[B, T, 3, H, W]` in [0, 1] (a single image may be passed as
`[B, 3, H, W]` and counts as T = 1), plus optional `depth [B, T, H, W]`, `intrinsics [B, T, 3, 3]` and `poses
[B, T, 4, 4]` (camera-to-world) that teachers which do not need them ignore. Teachers resize, normalise and sample
frames themselves, so callers pass frames as loaded.

`TeacherOutput.features` is `[B, N, D]` (float, on the teacher's device and dtype); the metadata says which token
grid the N tokens came from (before any pooling), which input frames were used, and how they were pooled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class TeacherBatch:
    """Teacher inputs. `frames` `[B, T, 3, H, W]` (or `[B, 3, H, W]`) in [0, 1]; the rest optional."""

    frames: torch.Tensor
    depth: torch.Tensor | None = None
    intrinsics: torch.Tensor | None = None
    poses: torch.Tensor | None = None

    def clip(self) -> torch.Tensor:
        """`frames` as a float `[B, T, 3, H, W]` clip, checked."""
        frames = self.frames
        if frames.ndim == 4:
            frames = frames.unsqueeze(1)
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B, T, 3, H, W] or [B, 3, H, W], got {tuple(self.frames.shape)}")
        if not frames.is_floating_point():
            raise ValueError(f"frames must be float in [0, 1], got {frames.dtype}")
        return frames


@dataclass
class TeacherOutput:
    """Teacher features `[B, N, D]` and where they came from."""

    features: torch.Tensor
    name: str
    grid: tuple[int, ...]  # the token grid behind N before pooling, e.g. (t, h, w) or (frames, h, w)
    frames_used: tuple[int, ...]  # indices into the input clip, in the order the teacher saw them
    pooling: str = "none"  # "none", "mean" or "tokens:K"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.features.shape[-1])

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[1])

    def meta(self) -> dict[str, Any]:
        """JSON-ready metadata (everything but the features)."""
        return {
            "name": self.name,
            "dim": self.dim,
            "num_tokens": self.num_tokens,
            "grid": list(self.grid),
            "frames_used": list(self.frames_used),
            "pooling": self.pooling,
            **self.extra,
        }


@runtime_checkable
class Teacher(Protocol):
    name: str
    dim: int
    num_frames: int | None

    def features(self, batch: TeacherBatch) -> TeacherOutput: ...
