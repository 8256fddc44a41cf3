"""The sparse MoE block that replaces a decoder layer's FFN."""

from __future__ import annotations

import torch
from torch import nn

from moekit.moe.context import MoeContext
from moekit.moe.experts import make_experts
from moekit.moe.inline import route_down, route_up
from moekit.moe.router import TopKRouter


class SharedExpertMix(nn.Module):
    """A dense expert every token passes through, mixed with the routed output by a per-token sigmoid gate.

    The mix is convex, `(1 - s) * routed + s * shared`, so when the shared and routed experts all start as
    copies of the dense FFN the block still computes the dense function, whatever the gate says.
    """

    def __init__(self, ffn: nn.Module, hidden_size: int):
        super().__init__()
        self.expert = ffn
        self.gate = nn.Linear(hidden_size, 1, bias=False)
        nn.init.zeros_(self.gate.weight)

    def forward(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        share = torch.sigmoid(self.gate(hidden_states))
        return routed + share * (self.expert(hidden_states) - routed)


class MoeBlock(nn.Module):
    """Router + fused experts (+ optional shared expert), a drop-in replacement for a dense FFN module.

    After each forward the block keeps `last_router_logits` and `last_top_k_index` (with the graph), from
    which `moekit.moe.losses.router_losses` computes the load-balancing and z losses of that pass.
    """

    def __init__(
        self,
        context: MoeContext,
        *,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        act: nn.Module,
        gated: bool,
        biased: bool,
        shared_expert: nn.Module | None = None,
    ):
        super().__init__()
        self.gate = TopKRouter(hidden_size, num_experts, top_k)
        self.experts = make_experts(
            context.settings, num_experts, hidden_size, intermediate_size, act, gated=gated, biased=biased
        )
        self.shared_expert = None if shared_expert is None else SharedExpertMix(shared_expert, hidden_size)
        self.context = context
        self.last_router_logits: torch.Tensor | None = None
        self.last_top_k_index: torch.Tensor | None = None
        self.layer_index = -1  # set by the surgery, used to label statistics

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def top_k(self) -> int:
        return self.gate.top_k

    def note_routing(self, flat: torch.Tensor, logits: torch.Tensor, top_index: torch.Tensor) -> None:
        """Keep this pass's routing for the router losses and any attached statistics."""
        self.context.settings.resolve(flat.device)
        self.last_router_logits, self.last_top_k_index = logits, top_index
        if self.context.stats is not None:
            kinds, valid = self.context.aligned(flat.shape[0])
            self.context.stats.record(self.layer_index, logits.detach(), top_index, kinds, valid)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The routed (and shared) experts' output; plus `residual` for families whose FFN adds the residual
        itself (`mlp(hidden_states, residual)`: BLOOM, MPT)."""
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        logits, top_weights, top_index = self.gate(flat)
        self.note_routing(flat, logits, top_index)
        out = self.experts(flat, top_index, top_weights)
        if self.shared_expert is not None:
            out = self.shared_expert(flat, out)
        out = out.reshape(shape)
        return out if residual is None else out + residual

    # An FFN inline in its layer: the two halves that take its projections' places call these (moekit.moe.inline).

    def route_up(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return route_up(self, hidden_states)

    def route_down(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return route_down(self, hidden_states)
