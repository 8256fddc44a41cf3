"""The routed experts' MLPs over rows sorted by expert, as one autograd node that writes every result in place.

Running `F.linear` per expert on slices of the rows and of the 3-D weights leaves autograd to do the plumbing:
concatenate the per-expert outputs, concatenate the row slices' gradients, stack the per-expert weight gradients
(or, with `w[e]` indexing, zero-fill a full-size gradient once per expert). Here forward and backward write
straight into one output, one input gradient and one gradient per weight, expert after expert, so each expert's
intermediates are still in cache when its second GEMM reads them. The GEMMs are the calls `F.linear` makes; the
activation's backward is autograd's own, replayed per expert on the saved pre-activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _activate(pre: torch.Tensor, act: nn.Module, gated: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    if not gated:
        return act(pre) if out is None else out.copy_(act(pre))
    gate, up = pre.chunk(2, dim=-1)
    return torch.mul(act(gate), up, out=out) if out is not None else act(gate) * up


def _mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """`out = x @ weight.T (+ bias)`, written in place."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


class _ExpertMlps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, up_w, up_b, down_w, down_b, counts, act, gated):
        x = x.contiguous()
        training = any(ctx.needs_input_grad)
        out = x.new_empty(x.shape[0], down_w.shape[1])
        pre_all = x.new_empty(x.shape[0], up_w.shape[1]) if training else None
        mid_all = x.new_empty(x.shape[0], down_w.shape[2]) if training else None
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            start += n
            pre = pre_all[rows] if training else x.new_empty(n, up_w.shape[1])
            _mm(x[rows], up_w[e], None if up_b is None else up_b[e], pre)
            mid = _activate(pre, act, gated, mid_all[rows] if training else None)
            _mm(mid, down_w[e], None if down_b is None else down_b[e], out[rows])
        if training:
            ctx.save_for_backward(x, up_w, down_w, pre_all, mid_all)
        ctx.counts, ctx.act, ctx.gated = counts, act, gated
        ctx.has_bias = (up_b is not None, down_b is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, up_w, down_w, pre_all, mid_all = ctx.saved_tensors
        grad = grad.contiguous()  # an expanded (stride-0) upstream gradient is fine
        need = ctx.needs_input_grad
        grad_x = torch.empty_like(x) if need[0] else None
        grad_up_w = torch.empty_like(up_w) if need[1] else None
        grad_up_b = up_w.new_empty(up_w.shape[:2]) if need[2] and ctx.has_bias[0] else None
        grad_down_w = torch.empty_like(down_w) if need[3] else None
        grad_down_b = down_w.new_empty(down_w.shape[:2]) if need[4] and ctx.has_bias[1] else None
        per_expert = [g for g in (grad_up_w, grad_up_b, grad_down_w, grad_down_b) if g is not None]
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:  # an expert without tokens gets a zero gradient
                for g in per_expert:
                    g[e].zero_()
                continue
            rows = slice(start, start + n)
            start += n
            g_out = grad[rows]
            if grad_down_w is not None:
                torch.mm(g_out.t(), mid_all[rows], out=grad_down_w[e])
            if grad_down_b is not None:
                torch.sum(g_out, dim=0, out=grad_down_b[e])
            with torch.enable_grad():
                pre = pre_all[rows].detach().requires_grad_(True)
                (g_pre,) = torch.autograd.grad(_activate(pre, ctx.act, ctx.gated), pre, g_out @ down_w[e])
            if grad_x is not None:
                torch.mm(g_pre, up_w[e], out=grad_x[rows])
            if grad_up_w is not None:
                torch.mm(g_pre.t(), x[rows], out=grad_up_w[e])
            if grad_up_b is not None:
                torch.sum(g_pre, dim=0, out=grad_up_b[e])
        return grad_x, grad_up_w, grad_up_b, grad_down_w, grad_down_b, None, None, None


def _expert_mlps_autograd(x, counts, up_w, down_w, act, gated, up_b, down_b) -> torch.Tensor:
    """The same computation left to autograd: per-expert `F.linear` on split rows and unbound weights."""
    ups, downs = up_w.unbind(0), down_w.unbind(0)
    up_bs = [None] * len(counts) if up_b is None else up_b.unbind(0)
    down_bs = [None] * len(counts) if down_b is None else down_b.unbind(0)
    outputs = [
        F.linear(_activate(F.linear(rows, ups[e], up_bs[e]), act, gated), downs[e], down_bs[e])
        for e, rows in enumerate(x.split(counts))
        if rows.shape[0]
    ]
    return torch.cat(outputs) if outputs else x.new_zeros(0, down_w.shape[1])


def expert_mlps(
    x: torch.Tensor,
    counts: list[int],
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    act: nn.Module,
    *,
    gated: bool,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x [S, H]` with rows sorted by expert (`counts[e]` rows for expert e) -> `[S, H]`.

    Row block e is `down_e(act(up_e(x_e)))` with `up_weight [E, U, H]` (U = 2I gate-first when `gated`, else I),
    `down_weight [E, H, I]` and optional biases `[E, U]`, `[E, H]`. Plain autograd takes over when the
    activation has parameters or autocast is on (the in-place node knows neither); double backward is not supported
    by the in-place node.
    """
    args = (x, counts, up_weight, down_weight, act, gated, up_bias, down_bias)
    if any(True for _ in act.parameters()) or torch.is_autocast_enabled(x.device.type):
        return _expert_mlps_autograd(*args)
    return _ExpertMlps.apply(x, up_weight, up_bias, down_weight, down_bias, counts, act, gated)
