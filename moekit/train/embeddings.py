"""Trainable rows for tokens added in a stage (e.g. `<synergy>`), while the rest of the embedding stays frozen.

The added rows live in their own parameter, so the `new_token_embeddings` group trains them under every
distributed mode (a gradient mask on the full matrix would not survive FSDP sharding) and weight decay never
touches the old rows. `merge` writes them back into a plain `nn.Embedding` before the model is saved.
"""

from __future__ import annotations

import torch
from torch import nn


class ExtendedEmbedding(nn.Module):
    """`base(ids)` plus a learned offset for ids >= `first_new` (the offset starts at zero)."""

    def __init__(self, base: nn.Embedding, first_new: int):
        super().__init__()
        self.base = base
        self.first_new = first_new
        rows = base.num_embeddings - first_new
        self.new_rows = nn.Parameter(torch.zeros(rows, base.embedding_dim, dtype=base.weight.dtype))

    def new_rows_parameters(self) -> list[nn.Parameter]:
        return [self.new_rows]

    @property
    def weight(self) -> torch.Tensor:  # read by transformers (tying checks, resize)
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        index = (input_ids - self.first_new).clamp(min=0)
        added = (input_ids >= self.first_new).unsqueeze(-1)
        return out + torch.where(added, self.new_rows[index].to(out.dtype), torch.zeros_like(out))


def extend(model: nn.Module, first_new: int) -> ExtendedEmbedding | None:
    """Wrap the input embedding of `model` if it has rows at or beyond `first_new`; None when it has none."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, ExtendedEmbedding) or embedding.num_embeddings <= first_new:
        return None
    wrapped = ExtendedEmbedding(embedding, first_new)
    model.set_input_embeddings(wrapped)
    return wrapped


def unwrap(model: nn.Module) -> None:
    """Put the plain embedding back without touching its weights (the saved state carries the merged rows)."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, ExtendedEmbedding):
        model.set_input_embeddings(embedding.base)


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold the learned rows back into the plain embedding (in place) and unwrap it."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, ExtendedEmbedding):
        return
    embedding.base.weight[embedding.first_new :] += embedding.new_rows.to(embedding.base.weight.dtype)
    model.set_input_embeddings(embedding.base)


def merged_state(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The same fold on a full state dict (for sharded models, whose state is gathered, not held)."""
    state = dict(state)
    for key in [k for k in state if k.endswith(".new_rows")]:
        owner = key.removesuffix(".new_rows")
        weight_key = f"{owner}.base.weight"
        weight = state.pop(weight_key).clone()
        rows = state.pop(key)
        weight[weight.shape[0] - rows.shape[0] :] += rows.to(weight.dtype)
        state[f"{owner}.weight"] = weight
    return state
