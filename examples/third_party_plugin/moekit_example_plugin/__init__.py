"""An example moekit plug-in, kept deliberately small: one component for every hook moekit has.

Everything it needs from moekit is public API: `hookimpl`, `Component`, `moekit.config.StrictModel` for the
parameter models, `moekit.arch` for families and the visual-token hook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from moekit import Component, hookimpl
from moekit.arch import Family, add_to_visual_tokens
from moekit.config import StrictModel


# --- a teacher: frames -> patch features ------------------------------------------------------------------------
class PatchMeanParams(StrictModel):
    patch: int = Field(14, ge=1)
    dim: int = Field(16, ge=1)
    seed: int = 0


class PatchMeanTeacher:
    """Mean colour of each patch of each frame, through a fixed random projection: [B, F*h*w, dim]."""

    def __init__(self, params: PatchMeanParams):
        self.patch = params.patch
        self.projection = torch.randn(3, params.dim, generator=torch.Generator().manual_seed(params.seed))

    def features(self, batch: dict) -> torch.Tensor:
        frames = batch["frames"]  # [B, F, 3, H, W]
        b, f = frames.shape[:2]
        pooled = F.avg_pool2d(frames.flatten(0, 1), self.patch)  # [B*F, 3, h, w]
        tokens = pooled.flatten(2).transpose(1, 2).reshape(b, -1, 3)
        return tokens @ self.projection


# --- a position encoder: a learned offset added to every visual token --------------------------------------------
class OffsetParams(StrictModel):
    value: float = 0.0


class VisualOffset(nn.Module):
    def __init__(self, params: OffsetParams, model: nn.Module):
        super().__init__()
        self.offset = nn.Parameter(torch.full((model.get_input_embeddings().embedding_dim,), params.value))
        self.hook = add_to_visual_tokens(model, lambda items: [self.offset.expand_as(i.features) for i in items])

    def remove(self) -> None:
        self.hook.remove()


# --- a synergy head: 1 - cos between the mean last hidden state and the mean teacher feature ----------------------
class CosineParams(StrictModel):
    teacher_dim: int = Field(16, ge=1)


class CosineHead(nn.Module):
    def __init__(self, params: CosineParams):
        super().__init__()
        self.params = params

    def prepare(self, model: nn.Module, tokenizer=None) -> None:
        self.proj = nn.Linear(model.get_input_embeddings().embedding_dim, self.params.teacher_dim)

    def forward(self, *, hidden_states, input_ids, teacher) -> dict[str, torch.Tensor]:
        student = self.proj(hidden_states[-1].mean(1))
        return {"example_cosine": (1 - F.cosine_similarity(student, teacher["temporal"].mean(1))).mean()}


# --- initialisers for the upcycle surgery ------------------------------------------------------------------------
class DampParams(StrictModel):
    factor: float = Field(0.5, gt=0.0)


def damp(params: DampParams):
    """Scale an expert's down projection: its output shrinks by `factor`."""

    def init(tensors, *, layer, expert, index, gated, generator, **_):
        tensors["down"] = tensors["down"] * params.factor
        if "down_bias" in tensors:
            tensors["down_bias"] = tensors["down_bias"] * params.factor
        return tensors

    return init


class OrthogonalParams(StrictModel):
    gain: float = Field(0.1, gt=0.0)


def orthogonal(params: OrthogonalParams):
    """Orthogonal router rows of length `gain`."""

    def init(weight, *, layer, experts, block, generator, **_):
        rows = torch.linalg.qr(torch.randn(weight.shape[1], weight.shape[0], generator=generator)).Q.T
        weight.copy_(rows * params.gain)

    return init


# --- the hook implementations ------------------------------------------------------------------------------------
@hookimpl
def moekit_teachers():
    return [Component("example_patch_mean", "teacher", PatchMeanParams, lambda p, **_: PatchMeanTeacher(p))]


@hookimpl
def moekit_position_encoders():
    return [Component("example_visual_offset", "position_encoder", OffsetParams, VisualOffset)]


@hookimpl
def moekit_synergy_heads():
    return [Component("example_cosine", "synergy_head", CosineParams, lambda p, **_: CosineHead(p))]


@hookimpl
def moekit_arch_adapters():
    return {"olmo2": Family("model.layers", auto="causal-lm")}


@hookimpl
def moekit_expert_initializers():
    return [Component("example_damp", "expert_init", DampParams, damp, "scale an expert's output")]


@hookimpl
def moekit_router_initializers():
    return [Component("example_orthogonal", "router_init", OrthogonalParams, orthogonal, "orthogonal router rows")]
