"""The routed experts' MLPs as one autograd node: per-expert gather, MLP, and the top-k mix, results in place.

Running `F.linear` per expert on gathered rows and mixing the slots afterwards leaves autograd to do the plumbing:
a copy of every slot's input in expert order, a copy of every output moved back to token order, a batched
`[1, k] @ [k, H]` product per token (slow on CPU), per-expert gradients concatenated, the activation's backward
replayed with a `cat` of its two halves. Here one node runs expert by expert: gather the block's token rows into
a reused buffer, `up -> act -> down` with the GEMMs writing in place (the calls `F.linear` makes), then one gather
and k multiply-adds mix each token's slots. Backward runs the same loop, with the activation's gradient written
straight into the halves of one buffer. Outputs and gradients equal the unfused computation's bit for bit, except
the routing weights' gradient (a dot product summed in another order; see tests/test_moe_runtime.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.activations import SiLUActivation

from moekit.moe.workspace import scratch

# Activations whose forward is `F.silu`: their backward is aten's `silu_backward`, called directly.
_SILU = (nn.SiLU, SiLUActivation)
_HALF = (torch.bfloat16, torch.float16)


def _activate(pre: torch.Tensor, act: nn.Module, gated: bool, out: torch.Tensor) -> torch.Tensor:
    """`out = act(pre)`, or `act(gate) * up` for gated experts (gate rows first); values as `act(gate) * up`."""
    silu = type(act) in _SILU
    if not gated:
        return torch.ops.aten.silu.out(pre, out=out) if silu else out.copy_(act(pre))
    gate, up = pre.chunk(2, dim=-1)
    if silu:
        return torch.ops.aten.silu.out(gate, out=out).mul_(up)
    return torch.mul(act(gate), up, out=out)


def _activation_backward(
    g_mid: torch.Tensor, pre: torch.Tensor, act: nn.Module, gated: bool, out: torch.Tensor
) -> torch.Tensor:
    """Gradient of `_activate` w.r.t. `pre`, written into `out` (the same ops autograd would run, without its
    `cat` of the two halves' gradients)."""
    silu = type(act) in _SILU
    if not gated:
        if silu:
            return torch.ops.aten.silu_backward.grad_input(g_mid, pre, grad_input=out)
        with torch.enable_grad():
            leaf = pre.detach().requires_grad_(True)
            return out.copy_(torch.autograd.grad(act(leaf), leaf, g_mid)[0])
    gate, up = pre.chunk(2, dim=-1)
    g_gate, g_up = out.chunk(2, dim=-1)
    if silu:
        a = F.silu(gate)
        torch.mul(g_mid, a, out=g_up)
        torch.ops.aten.silu_backward.grad_input(torch.mul(g_mid, up, out=a), gate, grad_input=g_gate)
        return out
    with torch.enable_grad():
        leaf = gate.detach().requires_grad_(True)
        a = act(leaf)
        torch.mul(g_mid, a.detach(), out=g_up)
        g_gate.copy_(torch.autograd.grad(a, leaf, g_mid * up)[0])
    return out


def _mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """`out = x @ weight.T (+ bias)`, written in place."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _rows(buffer: torch.Tensor | None, full: torch.Tensor | None, rows: slice) -> torch.Tensor:
    """A block of rows: of the saved full tensor when training, else of the reused per-expert buffer."""
    return full[rows] if full is not None else buffer[: rows.stop - rows.start]


def _slot_sum(rows: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    """`[T*k, H]` in expert order -> `[T, H]`: each token's k rows summed. A gather, not a scatter-add: CPU
    `index_add_` radix-sorts its index over many thread barriers and stalls for milliseconds on a busy machine."""
    per_slot = rows.index_select(0, inverse).view(-1, top_k, rows.shape[1])
    if top_k <= 2:  # a + b is what the reduction computes, without its slow low-precision middle-dim kernel
        return per_slot[:, 0] if top_k == 1 else torch.add(per_slot[:, 0], per_slot[:, 1])
    return per_slot.sum(dim=1)


def _slot_mix(rows: torch.Tensor, inverse: torch.Tensor, w: torch.Tensor, top_k: int) -> torch.Tensor:
    """`[T*k, H]` in expert order -> `[T, H]`: `sum_j w[t, j] * row(t, j)`, as the batched matmul that used to mix
    the slots computed it: each product rounded, then summed; in low precision summed in fp32 (a product of two
    bf16 values is exact there) and rounded once."""
    per_slot = torch.index_select(rows, 0, inverse, out=scratch("slots", tuple(rows.shape), rows))
    per_slot = per_slot.view(-1, top_k, rows.shape[1])
    half = rows.dtype in _HALF
    w = w.view(-1, top_k, 1).to(torch.float32 if half else rows.dtype)
    # Summed in the workspace when it is rounded into a new tensor at the end; else it is the result.
    into = scratch("mix", (per_slot.shape[0], rows.shape[1]), rows, torch.float32) if half else None
    mixed = torch.mul(per_slot[:, 0], w[:, 0], out=into) if half else torch.mul(per_slot[:, 0], w[:, 0])
    for j in range(1, top_k):
        if half:  # exact products: a fused multiply-add rounds just as often
            mixed.addcmul_(per_slot[:, j], w[:, j])
        else:
            mixed.add_(torch.mul(per_slot[:, j], w[:, j]))
    return mixed.to(rows.dtype)


class _RoutedMlps(torch.autograd.Function):
    """`y[t] = sum_j w[t*k+j] * mlp_e(x[t])` over token t's k slots, the slots sorted by expert (`order`).

    Without `order` the rows of `x` are already in expert order and `y` is the per-row MLP output.
    """

    @staticmethod
    def forward(ctx, x, w, up_w, up_b, down_w, down_b, order, inverse, counts, top_k, act, gated, grad_enabled):
        # `needs_input_grad` is set under `torch.no_grad()` too (and grad mode is always off in here): the caller's
        # grad mode says whether a backward can follow, and so whether the full per-slot tensors must be kept.
        routed, training = order is not None, grad_enabled and any(ctx.needs_input_grad)
        slots, width = sum(counts), max(counts, default=0)
        # Every slot's output row, in expert order: the result unless the slots are mixed afterwards.
        out_shape = (slots, down_w.shape[1])
        out_all = scratch("out", out_shape, x) if routed and not training else x.new_empty(out_shape)
        # Saved for backward when training, else one block-sized buffer reused by every expert (and every call).
        pre_all = x.new_empty(slots, up_w.shape[1]) if training else None
        mid_all = x.new_empty(slots, down_w.shape[2]) if training else None
        pre_buf = None if training else scratch("pre", (width, up_w.shape[1]), x)
        mid_buf = None if training else scratch("mid", (width, down_w.shape[2]), x)
        tok = x_buf = None
        if routed:
            tok, x_buf = order // top_k, scratch("x", (width, x.shape[1]), x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            start += n
            x_e = torch.index_select(x, 0, tok[rows], out=x_buf[:n]) if routed else x[rows]
            pre = _mm(x_e, up_w[e], None if up_b is None else up_b[e], _rows(pre_buf, pre_all, rows))
            mid = _activate(pre, act, gated, _rows(mid_buf, mid_all, rows))
            _mm(mid, down_w[e], None if down_b is None else down_b[e], out_all[rows])
        w_sorted = w.index_select(0, order) if routed and training else None
        if training:
            ctx.save_for_backward(
                x, w_sorted, tok, inverse, up_w, down_w, pre_all, mid_all, out_all if routed else None
            )
        ctx.counts, ctx.top_k, ctx.act, ctx.gated, ctx.width = counts, top_k, act, gated, width
        ctx.has_bias = (up_b is not None, down_b is not None)
        return _slot_mix(out_all, inverse, w, top_k) if routed else out_all

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, w_sorted, tok, inverse, up_w, down_w, pre_all, mid_all, out_all = ctx.saved_tensors
        routed, width, slots = tok is not None, ctx.width, pre_all.shape[0]
        grad = grad.contiguous()  # an expanded (stride-0) upstream gradient is fine
        need = ctx.needs_input_grad
        acc = torch.float32 if routed and x.dtype in _HALF else x.dtype
        grad_x = None  # routed: each slot's input gradient in expert order, summed per token at the end
        if need[0]:
            grad_x = scratch("grad_x", (slots, x.shape[1]), x) if routed else torch.empty_like(x)
        grad_w = x.new_empty(slots, dtype=acc) if routed and need[1] else None
        grad_up_w = torch.empty_like(up_w) if need[2] else None
        grad_up_b = up_w.new_empty(up_w.shape[:2]) if need[3] and ctx.has_bias[0] else None
        grad_down_w = torch.empty_like(down_w) if need[4] else None
        grad_down_b = down_w.new_empty(down_w.shape[:2]) if need[5] and ctx.has_bias[1] else None
        per_expert = [g for g in (grad_up_w, grad_up_b, grad_down_w, grad_down_b) if g is not None]
        g_buf = scratch("grad", (width, grad.shape[1]), x) if routed else None
        x_buf = scratch("x", (width, x.shape[1]), x) if routed else None
        g_mid_buf = scratch("grad_mid", (width, mid_all.shape[1]), x)
        g_pre_buf = scratch("grad_pre", (width, pre_all.shape[1]), x)
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:  # an expert without tokens gets a zero gradient
                for g in per_expert:
                    g[e].zero_()
                continue
            rows = slice(start, start + n)
            start += n
            g_out = grad[rows]
            if routed:  # the gradient of the slots' weighted rows, then of the expert's output
                g_out = torch.index_select(grad, 0, tok[rows], out=g_buf[:n])
                if grad_w is not None:
                    torch.linalg.vecdot(g_out.to(acc), out_all[rows].to(acc), out=grad_w[rows])
                g_out.mul_(w_sorted[rows, None])
            if grad_down_w is not None:
                torch.mm(g_out.t(), mid_all[rows], out=grad_down_w[e])
            if grad_down_b is not None:
                torch.sum(g_out, dim=0, out=grad_down_b[e])
            g_mid = torch.mm(g_out, down_w[e], out=g_mid_buf[:n])
            g_pre = _activation_backward(g_mid, pre_all[rows], ctx.act, ctx.gated, g_pre_buf[:n])
            if grad_up_w is not None:
                x_e = torch.index_select(x, 0, tok[rows], out=x_buf[:n]) if routed else x[rows]
                torch.mm(g_pre.t(), x_e, out=grad_up_w[e])
            if grad_up_b is not None:
                torch.sum(g_pre, dim=0, out=grad_up_b[e])
            if grad_x is not None:
                torch.mm(g_pre, up_w[e], out=grad_x[rows])
        if routed:
            grad_x = None if grad_x is None else _slot_sum(grad_x, inverse, ctx.top_k)
            grad_w = None if grad_w is None else grad_w.index_select(0, inverse).to(x.dtype)
        grads = (grad_x, grad_w, grad_up_w, grad_up_b, grad_down_w, grad_down_b)
        return *grads, None, None, None, None, None, None, None


def _expert_mlps_autograd(x, counts, up_w, down_w, act, gated, up_b, down_b) -> torch.Tensor:
    """The same computation left to autograd: per-expert `F.linear` on split rows and unbound weights."""
    ups, downs = up_w.unbind(0), down_w.unbind(0)
    up_bs = [None] * len(counts) if up_b is None else up_b.unbind(0)
    down_bs = [None] * len(counts) if down_b is None else down_b.unbind(0)
    outputs = []
    for e, rows in enumerate(x.split(counts)):
        if rows.shape[0]:
            pre = F.linear(rows, ups[e], up_bs[e])
            if gated:
                gate, up = pre.chunk(2, dim=-1)
                pre = act(gate) * up
            else:
                pre = act(pre)
            outputs.append(F.linear(pre, downs[e], down_bs[e]))
    return torch.cat(outputs) if outputs else x.new_zeros(0, down_w.shape[1])


def fused_supported(act: nn.Module, x: torch.Tensor) -> bool:
    """The fused node knows neither activations with parameters nor autocast; those take plain autograd."""
    return not any(True for _ in act.parameters()) and not torch.is_autocast_enabled(x.device.type)


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
    `down_weight [E, H, I]` and optional biases `[E, U]`, `[E, H]`. Plain autograd takes over when
    `fused_supported` says no; double backward is not supported by the fused node.
    """
    if not fused_supported(act, x):
        return _expert_mlps_autograd(x, counts, up_weight, down_weight, act, gated, up_bias, down_bias)
    args = (up_weight, up_bias, down_weight, down_bias, None, None, counts, 1, act, gated)
    return _RoutedMlps.apply(x.contiguous(), None, *args, torch.is_grad_enabled())


def routed_mlps(
    x: torch.Tensor,
    weight: torch.Tensor,
    order: torch.Tensor,
    inverse: torch.Tensor,
    counts: list[int],
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    act: nn.Module,
    *,
    gated: bool,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x [T, H]`, `weight [T, k]` -> `[T, H]`: token t's output is `sum_j weight[t, j] * mlp_e(x[t])` over its
    k slots, the slots sorted by expert as `moekit.moe.slots.slot_order` gives them (`order`, `inverse`,
    `counts`). Needs `fused_supported(act, x)`."""
    args = (up_weight, up_bias, down_weight, down_bias, order, inverse, counts, weight.shape[1], act, gated)
    return _RoutedMlps.apply(x, weight.reshape(-1), *args, torch.is_grad_enabled())
