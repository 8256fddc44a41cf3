"""The routed experts' scratch buffers: reused on CPU from call to call, never handed out as results."""

import threading

import pytest
import torch
from torch import nn

from moekit.moe import workspace
from moekit.moe.experts import ExpertsSettings, make_experts


@pytest.fixture(autouse=True)
def _fresh_workspace():
    workspace.release()
    yield
    workspace.release()


def test_scratch_reuses_one_buffer_per_name_and_dtype():
    like = torch.empty(0)
    a = workspace.scratch("pre", (4, 6), like)
    b = workspace.scratch("pre", (3, 8), like)  # same size or smaller: the same storage
    assert a.data_ptr() == b.data_ptr() and b.shape == (3, 8)
    c = workspace.scratch("mid", (4, 6), like)
    d = workspace.scratch("pre", (4, 6), like, torch.bfloat16)
    assert len({a.data_ptr(), c.data_ptr(), d.data_ptr()}) == 3
    assert d.dtype == torch.bfloat16
    grown = workspace.scratch("pre", (10, 10), like)  # larger: replaced, then reused
    assert grown.numel() == 100 and workspace.scratch("pre", (2, 2), like).data_ptr() == grown.data_ptr()
    assert workspace.kept_bytes() == 100 * 4 + 24 * 4 + 24 * 2


def test_scratch_keeps_at_most_the_limit(monkeypatch):
    monkeypatch.setattr(workspace, "LIMIT", 1000)
    like = torch.empty(0)
    kept = workspace.scratch("a", (200,), like)  # 800 bytes
    big = workspace.scratch("b", (100,), like)  # 400 more would pass the limit: fresh, not kept
    assert workspace.scratch("b", (100,), like).data_ptr() != big.data_ptr()
    assert workspace.kept_bytes() == 800 and workspace.scratch("a", (200,), like).data_ptr() == kept.data_ptr()
    workspace.release()
    assert workspace.kept_bytes() == 0


def test_each_thread_has_its_own_buffers():
    like = torch.empty(0)
    mine = workspace.scratch("x", (16,), like).data_ptr()
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(workspace.scratch("x", (16,), like).data_ptr()))
    thread.start()
    thread.join()
    assert theirs[0] != mine and workspace.scratch("x", (16,), like).data_ptr() == mine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2])
def test_inference_results_survive_the_next_call(dtype, top_k):
    """Under no_grad the block runs in reused buffers; what it returns must still be its own tensor."""
    torch.manual_seed(3)
    E, H, I, T = 4, 16, 24, 33
    experts = make_experts(ExpertsSettings("eager"), E, H, I, nn.SiLU(), gated=True, biased=False)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.3)
    experts.to(dtype)
    calls = [
        (torch.randn(T, H).to(dtype), torch.stack([torch.randperm(E)[:top_k] for _ in range(T)]), torch.rand(T, top_k))
        for _ in range(2)
    ]
    expected = [experts(*c).detach().clone() for c in calls]  # copies: what a result must keep
    with torch.no_grad():
        first = experts(*calls[0])
        second = experts(*calls[1])
    assert torch.equal(first, expected[0]) and torch.equal(second, expected[1])
    assert workspace.kept_bytes() > 0  # the inference path ran


def test_grad_mode_decides_what_is_kept_for_backward():
    """Parameters require grad in both cases; only the caller's grad mode says whether a backward follows."""
    torch.manual_seed(4)
    experts = make_experts(ExpertsSettings("eager"), 4, 16, 24, nn.SiLU(), gated=True, biased=False)
    x, index, weights = torch.randn(9, 16), torch.stack([torch.randperm(4)[:2] for _ in range(9)]), torch.rand(9, 2)
    experts(x, index, weights).sum().backward()
    assert ("pre", torch.float32) not in workspace._buffers()  # training: full per-slot tensors, saved
    with torch.no_grad():
        experts(x, index, weights)
    pre = workspace._buffers()[("pre", torch.float32)]
    assert pre.numel() < 9 * 2 * 48  # one expert's block of rows, not every slot
