"""Moving token rows into expert order and back, with gradients that are plain gathers.

Autograd's own backward of `x[index]` is an accumulating `index_put_` (serial on CPU) and that of `index_select`
an `index_add_`; both are slow for the [T*k, H] rows a MoE layer moves. Here the index is a permutation of the
T*k (token, expert) slots, whose inverse is known, so every backward is again a parallel `index_select`.
"""

from __future__ import annotations

import torch


def slot_order(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Sort the flattened (token, k) slots by expert: `(order, inverse, counts per expert)`.

    `order[s]` is the flat slot (token * k + j) at sorted position s; `inverse` undoes it. The sort is stable, so
    the tokens of one expert keep their original order.
    """
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, inverse, flat.bincount(minlength=num_experts).tolist()


class _GatherSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return hidden.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        per_slot = grad.index_select(0, inverse)  # back to token-major slot order
        return per_slot.view(-1, ctx.top_k, grad.shape[-1]).sum(dim=1), None, None, None


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def gather_slots(hidden: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    """`[T, H] -> [T*k, H]`: the token of every slot, in expert order; the gradient sums each token's k slots."""
    return _GatherSlots.apply(hidden, order, inverse, top_k)


def unsort_slots(rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """`[T*k, H]` in expert order -> token-major slot order (row t*k + j is token t's j-th expert)."""
    return _PermuteRows.apply(rows, inverse, order)
