"""Top-k softmax router (SPEC eq. 5-6): one bias-free linear layer, softmax over M experts, top-k renormalised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TopKRouter(nn.Module):
    """Scores each token against `num_experts` and keeps the `top_k` best.

    The kept probabilities are renormalised to sum to 1 per token, as in the PolyV paper and transformers'
    Qwen3-(VL-)MoE router, so a checkpoint exported to those classes routes identically.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (router logits [T, M], top-k weights [T, k], top-k expert indices [T, k])."""
        logits = F.linear(hidden_states, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_weights, top_index = torch.topk(probs, self.top_k, dim=-1)
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return logits, top_weights.to(hidden_states.dtype), top_index

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}"
