"""Per-model routing context: what kind of token each position is, shared by all MoE blocks of one model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moekit.moe.experts import ExpertsSettings

TOKEN_KINDS = ("text", "image", "video", "3d")
TEXT, IMAGE, VIDEO, THREE_D = range(4)


@dataclass
class MoeContext:
    """State one forward pass shares with every MoE block.

    A forward pre-hook on the model fills `token_kinds` and `valid` from `input_ids` and `attention_mask`, so
    blocks can attribute routing decisions to text / image / video / 3D tokens and skip padding in the losses.
    Samples marked with `sample_modalities` (e.g. multi-view 3D scenes fed as video) override the kind of
    their visual tokens.
    """

    image_token_ids: tuple[int, ...] = ()
    video_token_ids: tuple[int, ...] = ()
    settings: ExpertsSettings = field(default_factory=ExpertsSettings)
    balance_loss: str = "switch"
    token_kinds: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    sample_modalities: list[str | None] | None = None
    stats: object | None = None  # a RoutingStats while one is attached

    def observe(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        if input_ids is None:
            self.token_kinds = self.valid = None
            return
        kinds = torch.zeros_like(input_ids)
        for token in self.image_token_ids:
            kinds[input_ids == token] = IMAGE
        for token in self.video_token_ids:
            kinds[input_ids == token] = VIDEO
        if self.sample_modalities is not None:
            for row, modality in enumerate(self.sample_modalities[: kinds.shape[0]]):
                if modality is not None:
                    code = TOKEN_KINDS.index(modality)
                    kinds[row][kinds[row] != TEXT] = code
        self.token_kinds = kinds.reshape(-1)
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        self.valid = None if mask is None else mask.reshape(-1).bool()

    def aligned(self, num_tokens: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Token kinds and validity for a block that routed `num_tokens` tokens (None when they do not line up)."""
        kinds = self.token_kinds if self.token_kinds is not None and self.token_kinds.numel() == num_tokens else None
        valid = self.valid if self.valid is not None and self.valid.numel() == num_tokens else None
        return kinds, valid


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    context: MoeContext = module._moekit_context
    input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    context.observe(input_ids, kwargs.get("attention_mask"))


def attach_context(model: nn.Module, context: MoeContext) -> MoeContext:
    """Install `context` on `model` (idempotent) with the pre-hook that fills it on every forward."""
    if getattr(model, "_moekit_context", None) is None:
        model._moekit_context_hook = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    model._moekit_context = context
    return context


def get_context(model: nn.Module) -> MoeContext:
    context = getattr(model, "_moekit_context", None)
    if context is None:
        raise ValueError("this model has no MoE layers (it was not upcycled by moekit)")
    return context
