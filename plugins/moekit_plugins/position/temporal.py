"""Temporal frame embedding: a per-frame vector (sinusoidal or learned) added to every video token."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from moekit.arch import VisualItem
from moekit.config import StrictModel
from moekit_plugins.position.feed import VisualEncoderBase, token_width
from moekit_plugins.position.sinusoid import sinusoid


class TemporalParams(StrictModel):
    """The frame index is the token's temporal grid position (Qwen-VL: one per 2 frames; LLaVA-OneVision: one
    per frame)."""

    mode: Literal["sinusoidal", "learned"] = "sinusoidal"
    max_frames: int = Field(256, ge=1, description="learned mode: number of frame positions in the table")
    init: Literal["zeros", "normal"] = Field("zeros", description="learned mode: zeros leave the model unchanged")
    std: float = Field(0.02, gt=0.0, description="learned mode: std of the normal init")
    min_wavelength: float = Field(2.0, gt=0.0, description="sinusoidal mode: shortest wavelength, in frames")
    max_wavelength: float = Field(10_000.0, gt=0.0, description="sinusoidal mode: longest wavelength, in frames")
    scale: float = Field(1.0, description="multiplier of the embedding before it is added")


class TemporalFrameEncoder(VisualEncoderBase):
    """Adds `scale * E[t]` to each video token of temporal index t (images and newline tokens are left alone)."""

    def __init__(self, params: TemporalParams, model: nn.Module | None = None, dim: int | None = None):
        super().__init__()
        dim = token_width(model, dim, "temporal_frame")
        self.params, self.dim = params, dim
        self.table = None
        if params.mode == "learned":
            self.table = nn.Embedding(params.max_frames, dim)
            if params.init == "zeros":
                nn.init.zeros_(self.table.weight)
            else:
                nn.init.normal_(self.table.weight, std=params.std)
        if model is not None:
            self.attach(model)

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """[N] frame indices (-1 = no frame) -> [N, dim] embeddings (zeros where the index is -1)."""
        p = self.params
        keep = (frames >= 0)[:, None]
        if self.table is None:
            return sinusoid(frames.clamp_min(0)[:, None].float(), self.dim, p.min_wavelength, p.max_wavelength) * (
                p.scale * keep
            )
        if int(frames.max()) >= p.max_frames:
            raise ValueError(f"a video has {int(frames.max()) + 1} temporal positions; max_frames is {p.max_frames}")
        return self.table(frames.clamp_min(0).to(self.table.weight.device)) * (p.scale * keep.to(self.table.weight))

    def token_deltas(self, items: list[VisualItem]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for item in items:
            if item.kind != "video" or item.layout is None:
                out.append(None)
                continue
            out.append(self.embed(item.layout.frame_index().to(item.features.device)))
        return out
