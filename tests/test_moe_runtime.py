"""Router, fused experts, block, losses and routing statistics, checked against hand-computed references."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit.moe import MoeBlock, MoeContext, RoutingStats, TopKRouter, load_balancing_loss, router_z_loss
from moekit.moe.context import IMAGE, TEXT, VIDEO
from moekit.moe.experts import ExpertsSettings, make_experts
from moekit.moe.fused import expert_mlps
from moekit.moe.slots import gather_slots, slot_order, unsort_slots


def test_router_keeps_top_k_and_renormalises():
    torch.manual_seed(0)
    router = TopKRouter(8, num_experts=4, top_k=2)
    nn.init.normal_(router.weight)
    x = torch.randn(10, 8)
    logits, weights, index = router(x)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    expected_index = probs.argsort(dim=-1, descending=True)[:, :2]
    assert torch.equal(index, expected_index)
    expected = probs.gather(1, expected_index)
    torch.testing.assert_close(weights, expected / expected.sum(-1, keepdim=True))
    torch.testing.assert_close(weights.sum(-1), torch.ones(10))


def test_router_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and num_experts=4"):
        TopKRouter(8, 4, 5)


def _reference_expert(x, up, down, gated, act, up_bias=None, down_bias=None):
    h = F.linear(x, up, up_bias)
    if gated:
        gate, upv = h.chunk(2, dim=-1)
        h = act(gate) * upv
    else:
        h = act(h)
    return F.linear(h, down, down_bias)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_experts_match_per_token_reference(gated, biased, impl):
    torch.manual_seed(1)
    E, H, I, T, k = 4, 16, 24, 37, 2
    settings = ExpertsSettings(impl)
    experts = make_experts(settings, E, H, I, nn.SiLU() if gated else nn.GELU(), gated=gated, biased=biased)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.2)
    x = torch.randn(T, H)
    index = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    weights = torch.rand(T, k)
    out = experts(x, index, weights)
    expected = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            e = index[t, j]
            ub = experts.up_bias[e] if biased else None
            db = experts.down_proj_bias[e] if biased else None
            expected[t] += weights[t, j] * _reference_expert(
                x[t], experts.up_weight[e], experts.down_proj[e], gated, experts.act_fn, ub, db
            )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def seeded_block(impl: str, *, hidden: int, intermediate: int, std: float, seed: int) -> MoeBlock:
    """A gated 4-expert top-2 block under experts implementation `impl`, every parameter ~ N(0, std) from `seed`
    (the same weights whatever `impl`)."""
    torch.manual_seed(seed)
    block = MoeBlock(
        MoeContext(settings=ExpertsSettings(impl)),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_experts=4,
        top_k=2,
        act=nn.SiLU(),
        gated=True,
        biased=False,
    )
    for p in block.parameters():
        nn.init.normal_(p, std=std)
    return block


def test_grouped_mm_gradients_match_eager():
    torch.manual_seed(2)
    grads = {}
    for impl in ("eager", "grouped_mm"):
        block = seeded_block(impl, hidden=16, intermediate=32, std=0.3, seed=2)
        x = torch.randn(2, 9, 16, requires_grad=True)
        (block(x) * torch.linspace(0, 1, 16)).sum().backward()
        grads[impl] = [x.grad] + [p.grad for p in block.parameters()]
    for a, b in zip(grads["eager"], grads["grouped_mm"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _slot_case(T=7, E=4, k=2, seed=5):
    torch.manual_seed(seed)
    index = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    return index, slot_order(index, E)


def test_slot_order_sorts_by_expert_and_inverts():
    index, (order, inverse, counts) = _slot_case()
    flat = index.reshape(-1)
    assert torch.equal(flat[order], flat.sort(stable=True).values)
    assert torch.equal(order[inverse], torch.arange(flat.numel()))
    assert counts == torch.bincount(flat, minlength=4).tolist()


def test_slot_moves_match_indexing_with_exact_gradients():
    index, (order, inverse, _) = _slot_case()
    hidden = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.equal(gather_slots(hidden, order, inverse, 2), hidden[order // 2])
    torch.autograd.gradcheck(lambda h: gather_slots(h, order, inverse, 2), (hidden,))
    rows = torch.randn(14, 3, dtype=torch.float64, requires_grad=True)
    unsorted = unsort_slots(rows, order, inverse)
    assert torch.equal(unsorted[order], rows)
    torch.autograd.gradcheck(lambda r: unsort_slots(r, order, inverse), (rows,))


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("biased", [False, True])
def test_eager_gradients_match_batched_mm_with_an_idle_expert(gated, biased):
    """Every gradient of the eager path (custom backward) against transformers' batched_mm (plain autograd)."""
    torch.manual_seed(6)
    E, H, I, T, k = 5, 8, 12, 11, 2
    index = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)])  # expert 4 gets no token
    weights = torch.rand(T, k)
    x = torch.randn(T, H)
    grads = {}
    for impl in ("eager", "batched_mm"):
        torch.manual_seed(7)
        experts = make_experts(
            ExpertsSettings(impl), E, H, I, nn.SiLU() if gated else nn.GELU(), gated=gated, biased=biased
        )
        for p in experts.parameters():
            nn.init.normal_(p, std=0.3)
        leaf_x, leaf_w = x.clone().requires_grad_(), weights.clone().requires_grad_()
        experts(leaf_x, index, leaf_w).sum().backward()  # a stride-0 upstream gradient
        grads[impl] = [leaf_x.grad, leaf_w.grad] + [p.grad for p in experts.parameters()]
    for a, b in zip(grads["eager"], grads["batched_mm"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert grads["eager"][3][4].abs().max() == 0  # the idle expert's down_proj gradient


@pytest.mark.parametrize("gated", [True, False])
def test_expert_mlps_gradcheck(gated):
    """The in-place node's backward (gradcheck), its inference path, and the plain-autograd path agree."""
    torch.manual_seed(8)
    E, H, I, counts = 3, 4, 5, [2, 0, 3]
    up = torch.randn(E, (2 if gated else 1) * I, H, dtype=torch.float64, requires_grad=True)
    down = torch.randn(E, H, I, dtype=torch.float64, requires_grad=True)
    up_b = torch.randn(E, up.shape[1], dtype=torch.float64, requires_grad=True)
    down_b = torch.randn(E, H, dtype=torch.float64, requires_grad=True)
    x = torch.randn(sum(counts), H, dtype=torch.float64, requires_grad=True)
    inputs = (x, up, down, up_b, down_b)

    def run(act):
        return lambda x, up, down, up_b, down_b: expert_mlps(
            x, counts, up, down, act, gated=gated, up_bias=up_b, down_bias=down_b
        )

    torch.autograd.gradcheck(run(nn.SiLU() if gated else nn.GELU()), inputs)
    leaky = run(nn.LeakyReLU(0.25))  # no parameter: the in-place node
    prelu = nn.PReLU(dtype=torch.float64)  # the same function with a parameter: the plain autograd path
    prelu.weight.data.fill_(0.25)
    torch.autograd.gradcheck(run(prelu), inputs)
    training = leaky(*inputs)
    torch.testing.assert_close(training, run(prelu)(*inputs))
    with torch.no_grad():  # the inference path (no saved buffers) computes the same values
        torch.testing.assert_close(leaky(*inputs), training.detach(), atol=0, rtol=0)


def test_auto_settings_pick_the_implementation_per_device():
    settings = ExpertsSettings()
    assert (settings.requested, settings._experts_implementation) == ("auto", "eager")
    settings.resolve(torch.device("cuda"))  # a pure choice: no GPU needed
    assert settings._experts_implementation == "grouped_mm"
    settings.resolve(torch.device("cpu"))
    assert settings._experts_implementation == "eager"
    fixed = ExpertsSettings("grouped_mm")
    fixed.resolve(torch.device("cpu"))
    assert fixed._experts_implementation == "grouped_mm"
    with pytest.raises(ValueError, match="unknown experts implementation 'fast'.*'auto'"):
        ExpertsSettings("fast")


def test_default_block_takes_broadcast_gradients_and_matches_batched_mm():
    """`out.sum().backward()` (a stride-0 gradient) works on CPU by default, with batched_mm's gradients."""
    grads = {}
    for impl in ("auto", "batched_mm"):
        block = seeded_block(impl, hidden=8, intermediate=12, std=0.3, seed=4)
        x = torch.randn(3, 5, 8, requires_grad=True)
        block(x).sum().backward()
        grads[impl] = [x.grad] + [p.grad for p in block.parameters()]
    for a, b in zip(grads["auto"], grads["batched_mm"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_eager_experts_take_zero_tokens():
    experts = make_experts(ExpertsSettings("eager"), 4, 8, 12, nn.SiLU(), gated=True, biased=False)
    out = experts(torch.randn(0, 8), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, 8)


def test_block_with_identical_experts_is_the_dense_ffn():
    torch.manual_seed(3)
    H, I = 16, 32
    gate, up, down = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False), nn.Linear(I, H, bias=False)
    block = MoeBlock(
        MoeContext(),
        hidden_size=H,
        intermediate_size=I,
        num_experts=3,
        top_k=2,
        act=nn.SiLU(),
        gated=True,
        biased=False,
    )
    nn.init.normal_(block.gate.weight)
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(torch.cat([gate.weight, up.weight])[None].expand(3, -1, -1))
        block.experts.down_proj.copy_(down.weight[None].expand(3, -1, -1))
    x = torch.randn(2, 5, H)
    torch.testing.assert_close(block(x), down(F.silu(gate(x)) * up(x)), atol=1e-6, rtol=1e-5)
    assert block.last_router_logits.shape == (10, 3)


def test_balance_loss_is_one_when_balanced_and_m_when_collapsed():
    M = 4
    balanced = torch.eye(M).repeat(8, 1) * 5.0  # each expert is argmax for a quarter of the tokens
    assert load_balancing_loss(balanced).item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.zeros(32, M)
    collapsed[:, 2] = 100.0
    assert load_balancing_loss(collapsed).item() == pytest.approx(M, rel=1e-4)


def test_balance_loss_matches_the_formula():
    torch.manual_seed(4)
    logits = torch.randn(50, 5)
    probs = logits.softmax(-1)
    frac = torch.bincount(probs.argmax(-1), minlength=5).float() / 50
    expected = 5 * (frac * probs.mean(0)).sum()
    assert load_balancing_loss(logits).item() == pytest.approx(expected.item(), rel=1e-6)
    top = probs.topk(2, dim=-1).indices
    frac_k = torch.bincount(top.reshape(-1), minlength=5).float() / 100
    assert load_balancing_loss(logits, top, kind="switch_topk").item() == pytest.approx(
        5 * (frac_k * probs.mean(0)).sum().item(), rel=1e-6
    )
    valid = torch.arange(50) < 20
    assert load_balancing_loss(logits, valid=valid).item() == pytest.approx(
        load_balancing_loss(logits[:20]).item(), rel=1e-6
    )


def test_z_loss_matches_logsumexp_squared():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = ((torch.log(torch.tensor(2.0))) ** 2 + torch.logsumexp(torch.tensor([1.0, 2.0]), 0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected.item(), rel=1e-6)


def test_context_marks_token_kinds_and_3d_samples():
    context = MoeContext(image_token_ids=(9,), video_token_ids=(8,))
    ids = torch.tensor([[1, 9, 9, 2], [8, 8, 3, 0]])
    context.sample_modalities = [None, "3d"]
    context.observe(ids, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    assert context.token_kinds.tolist() == [TEXT, IMAGE, IMAGE, TEXT, 3, 3, TEXT, TEXT]
    assert context.valid.tolist() == [True] * 7 + [False]


def test_routing_stats_accumulate_per_kind(tmp_path):
    stats = RoutingStats(["a", "b", "c"])
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    index = torch.tensor([[0], [1], [2], [0]])
    kinds = torch.tensor([TEXT, IMAGE, VIDEO, TEXT])
    for _ in range(3):
        stats.record(0, logits, index, kinds, torch.tensor([True, True, True, False]))
    assert stats.counts[0][TEXT].tolist() == [3, 0, 0]
    assert stats.counts[0][IMAGE].tolist() == [0, 3, 0]
    assert stats.shares()["video"] == [0.0, 0.0, 1.0]
    stats.to_json(tmp_path / "routes.json")
    data = json.loads((tmp_path / "routes.json").read_text())
    assert data["layers"]["0"]["text"]["tokens"] == 3
    assert data["experts"] == ["a", "b", "c"]


# The eager path as it was before issue 15 ("routing overhead"), frozen here as the reference for the fused one:
# permutation gathers, one in-place node per expert MLP, the k slots mixed with a per-token einsum.


class _FrozenExpertMlps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, up_w, up_b, down_w, down_b, counts, act, gated):
        out = x.new_empty(x.shape[0], down_w.shape[1])
        pre_all, mid_all = x.new_empty(x.shape[0], up_w.shape[1]), x.new_empty(x.shape[0], down_w.shape[2])
        start = 0
        for e, n in enumerate(counts):
            rows = slice(start, start + n)
            start += n
            if n:
                torch.addmm(up_b[e], x[rows], up_w[e].t(), out=pre_all[rows]) if up_b is not None else torch.mm(
                    x[rows], up_w[e].t(), out=pre_all[rows]
                )
                mid_all[rows] = _frozen_activate(pre_all[rows], act, gated)
                if down_b is None:
                    torch.mm(mid_all[rows], down_w[e].t(), out=out[rows])
                else:
                    torch.addmm(down_b[e], mid_all[rows], down_w[e].t(), out=out[rows])
        ctx.save_for_backward(x, up_w, down_w, pre_all, mid_all)
        ctx.counts, ctx.act, ctx.gated, ctx.has_bias = counts, act, gated, (up_b is not None, down_b is not None)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, up_w, down_w, pre_all, mid_all = ctx.saved_tensors
        grad = grad.contiguous()
        grads = [torch.empty_like(x), torch.zeros_like(up_w), torch.zeros_like(down_w)]
        grad_up_b, grad_down_b = up_w.new_zeros(up_w.shape[:2]), down_w.new_zeros(down_w.shape[:2])
        start = 0
        for e, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            start += n
            if n:
                g_out = grad[rows]
                torch.mm(g_out.t(), mid_all[rows], out=grads[2][e])
                torch.sum(g_out, dim=0, out=grad_down_b[e])
                with torch.enable_grad():
                    pre = pre_all[rows].detach().requires_grad_(True)
                    (g_pre,) = torch.autograd.grad(_frozen_activate(pre, ctx.act, ctx.gated), pre, g_out @ down_w[e])
                torch.mm(g_pre, up_w[e], out=grads[0][rows])
                torch.mm(g_pre.t(), x[rows], out=grads[1][e])
                torch.sum(g_pre, dim=0, out=grad_up_b[e])
        up_b = grad_up_b if ctx.has_bias[0] else None
        down_b = grad_down_b if ctx.has_bias[1] else None
        return grads[0], grads[1], up_b, grads[2], down_b, None, None, None


def _frozen_activate(pre, act, gated):
    if not gated:
        return act(pre)
    gate, up = pre.chunk(2, dim=-1)
    return act(gate) * up


def _frozen_eager(experts, x, index, weights):
    num_tokens, top_k = index.shape
    order, inverse, counts = slot_order(index, experts.num_experts)
    rows = gather_slots(x, order, inverse, top_k)
    down_b = experts.down_proj_bias if experts.biased else None
    args = (experts.up_weight, experts.up_bias, experts.down_proj, down_b, counts, experts.act_fn, experts.gated)
    out = _FrozenExpertMlps.apply(rows, *args)
    per_slot = unsort_slots(out, order, inverse).view(num_tokens, top_k, -1)
    return torch.einsum("tk,tkh->th", weights.to(per_slot.dtype), per_slot)


def _eager_outputs_and_grads(forward, experts, x, index, weights, grad):
    experts.zero_grad(set_to_none=True)
    leaf_x, leaf_w = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = forward(experts, leaf_x, index, leaf_w)
    out.backward(grad)
    return [out, leaf_x.grad, leaf_w.grad] + [p.grad for p in experts.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize(
    ("gated", "act"), [(True, nn.SiLU()), (True, nn.GELU()), (False, nn.GELU()), (False, nn.SiLU())]
)
@pytest.mark.parametrize("biased", [False, True])
def test_fused_eager_path_matches_the_frozen_one(dtype, top_k, gated, act, biased):
    """Same outputs and gradients as before the fused node, bit for bit, except the routing weights' gradient: a
    length-H dot product, now summed in fp32 in another order (fp32: within 1e-6 of its largest value; bf16, where
    the old top-1 path rounded every product to bf16: within 2^-7 of it)."""
    torch.manual_seed(10)
    E, H, I, T = 5, 32, 48, 97
    experts = make_experts(ExpertsSettings("eager"), E, H, I, act, gated=gated, biased=biased)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.3)
    experts.to(dtype)
    x, grad = torch.randn(T, H).to(dtype), torch.randn(T, H).to(dtype)
    index = torch.stack([torch.randperm(E - 1)[:top_k] for _ in range(T)])  # expert 4 gets no token
    weights = torch.rand(T, top_k)
    new = _eager_outputs_and_grads(type(experts).forward, experts, x, index, weights, grad)
    old = _eager_outputs_and_grads(_frozen_eager, experts, x, index, weights, grad)
    for i, (a, b) in enumerate(zip(new, old, strict=True)):
        if i == 2:
            scale = (1e-6 if dtype == torch.float32 else 2**-7) * b.abs().max().item()
            torch.testing.assert_close(a, b, atol=scale, rtol=0)
        else:
            assert torch.equal(a, b), f"tensor {i} differs by {(a.float() - b.float()).abs().max().item()}"
    with torch.no_grad():  # the inference path (reused buffers, nothing saved) computes the same values
        assert torch.equal(experts(x, index, weights), new[0])


def test_fused_eager_path_takes_autocast_through_plain_autograd():
    torch.manual_seed(11)
    experts = make_experts(ExpertsSettings("eager"), 4, 16, 24, nn.SiLU(), gated=True, biased=False)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.3)
    x, index, weights = torch.randn(9, 16), torch.stack([torch.randperm(4)[:2] for _ in range(9)]), torch.rand(9, 2)
    reference = _frozen_eager(experts, x, index, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, index, weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)
