"""An MoE block for an FFN written straight into its decoder layer (OPT, BART, Whisper, BioGPT: `fc1`, the
layer's activation, dropout, `fc2`, with no FFN module to replace).

The block sits beside them (`layer.moe`) and two parameter-free halves take the projections' places: `up`
routes each token to its top-k experts and returns their up projections side by side, `[..., k * I]`; the
layer's own activation and dropout act on that elementwise, exactly as on one FFN's hidden units; `down`
applies each slot's expert down projection and mixes the k slots with the router weights. With every expert a
copy of the dense FFN this is the dense computation, whatever the layer does between the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.moe.slots import _PermuteRows, gather_slots, slot_order, unsort_slots


class _Half(nn.Module):
    """Holds its block without registering it (the block's parameters live once, at `layer.moe`)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        object.__setattr__(self, "block", block)

    def extra_repr(self) -> str:
        return f"of the MoE block at layer {self.block.layer_index}"


class InlineUp(_Half):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.block.route_up(hidden_states)


class InlineDown(_Half):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.block.route_down(hidden_states)


def _per_expert(rows: torch.Tensor, counts: list[int], weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Rows sorted by expert through each expert's linear map (`weight` [E, out, in], `bias` [E, out])."""
    parts = rows.split(counts)
    return torch.cat([F.linear(p, weight[e], None if bias is None else bias[e]) for e, p in enumerate(parts)])


def route_up(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`[..., H]` -> `[..., k * I]`: each token's top-k experts' up projections, slot by slot."""
    shape = hidden_states.shape
    flat = hidden_states.reshape(-1, shape[-1])
    logits, weights, index = block.gate(flat)
    block.note_routing(flat, logits, index)
    order, inverse, counts = slot_order(index, block.num_experts)
    experts = block.experts
    rows = gather_slots(flat, order, inverse, block.top_k)
    up = _per_expert(rows, counts, experts.up_weight, experts.up_bias)
    block._inline_pending = (shape, weights, order, inverse, counts)
    return unsort_slots(up, order, inverse).reshape(*shape[:-1], block.top_k * up.shape[-1])


def route_down(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`[..., k * I]` (after the layer's activation) -> `[..., H]`: each slot's down projection, mixed."""
    pending = block.__dict__.pop("_inline_pending", None)
    if pending is None:
        raise RuntimeError("an inline MoE block's down half ran without its up half (report this as a bug)")
    shape, weights, order, inverse, counts = pending
    top_k = block.top_k
    slots = hidden_states.reshape(-1, hidden_states.shape[-1] // top_k)
    rows = _PermuteRows.apply(slots, order, inverse)
    experts = block.experts
    down = _per_expert(rows, counts, experts.down_proj, experts.down_proj_bias if experts.biased else None)
    per_slot = unsort_slots(down, order, inverse).view(-1, top_k, down.shape[-1])
    out = torch.einsum("tk,tkh->th", weights.to(per_slot.dtype), per_slot)
    return out.reshape(*shape[:-1], out.shape[-1])
