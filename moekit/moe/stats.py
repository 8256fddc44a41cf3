"""Routing statistics: how often each expert is chosen, per layer and per token kind, over many batches."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.moe.context import TOKEN_KINDS, get_context


class RoutingStats:
    """Accumulates top-k selection counts `[layer][kind][expert]` and mean router probabilities.

    Attach it with `with stats.recording(model): ...` around any number of forward passes, then read
    `shares()` or write `to_json(path)`.
    """

    def __init__(self, expert_names: list[str] | None = None):
        self.expert_names = expert_names
        self.counts: dict[int, torch.Tensor] = {}  # layer -> [kinds, experts] top-k selections
        self.prob_sums: dict[int, torch.Tensor] = {}  # layer -> [kinds, experts] summed probabilities
        self.tokens: dict[int, torch.Tensor] = {}  # layer -> [kinds] routed tokens

    def record(
        self,
        layer: int,
        router_logits: torch.Tensor,
        top_k_index: torch.Tensor,
        kinds: torch.Tensor | None,
        valid: torch.Tensor | None,
    ) -> None:
        num_experts = router_logits.shape[-1]
        kinds = torch.zeros(router_logits.shape[0], dtype=torch.long) if kinds is None else kinds.cpu()
        probs = torch.softmax(router_logits.float(), dim=-1).cpu()
        index = top_k_index.cpu()
        if valid is not None:
            valid = valid.cpu()
            kinds, probs, index = kinds[valid], probs[valid], index[valid]
        if layer not in self.counts:
            self.counts[layer] = torch.zeros(len(TOKEN_KINDS), num_experts, dtype=torch.long)
            self.prob_sums[layer] = torch.zeros(len(TOKEN_KINDS), num_experts, dtype=torch.float64)
            self.tokens[layer] = torch.zeros(len(TOKEN_KINDS), dtype=torch.long)
        slot_kinds = kinds[:, None].expand_as(index).reshape(-1)
        flat = slot_kinds * num_experts + index.reshape(-1)
        self.counts[layer] += torch.bincount(flat, minlength=len(TOKEN_KINDS) * num_experts).view(len(TOKEN_KINDS), -1)
        self.prob_sums[layer].index_add_(0, kinds, probs.double())
        self.tokens[layer] += torch.bincount(kinds, minlength=len(TOKEN_KINDS))

    @contextmanager
    def recording(self, model: nn.Module) -> Iterator[RoutingStats]:
        """Attach to `model` for the duration of the block."""
        context = get_context(model)
        previous, context.stats = context.stats, self
        try:
            yield self
        finally:
            context.stats = previous

    def shares(self, layer: int | None = None) -> dict[str, list[float]]:
        """Fraction of top-k selections per expert for each token kind seen (all layers summed if layer is None)."""
        counts = sum(self.counts.values()) if layer is None else self.counts[layer]
        out = {}
        for k, kind in enumerate(TOKEN_KINDS):
            total = int(counts[k].sum())
            if total:
                out[kind] = (counts[k].double() / total).tolist()
        return out

    def to_dict(self) -> dict[str, Any]:
        layers = {}
        for layer in sorted(self.counts):
            per_kind = {}
            for k, kind in enumerate(TOKEN_KINDS):
                n = int(self.tokens[layer][k])
                if n:
                    per_kind[kind] = {
                        "tokens": n,
                        "topk_counts": self.counts[layer][k].tolist(),
                        "topk_share": (self.counts[layer][k].double() / self.counts[layer][k].sum()).tolist(),
                        "mean_prob": (self.prob_sums[layer][k] / n).tolist(),
                    }
            layers[str(layer)] = per_kind
        return {
            "experts": self.expert_names,
            "token_kinds": list(TOKEN_KINDS),
            "layers": layers,
            "overall": self.shares(),
        }

    def to_json(self, path: str | Path) -> None:
        from moekit.io.atomic import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))
