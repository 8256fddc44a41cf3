"""The MoE runtime on a CUDA device: every experts implementation, fp32 and bf16, forward and backward, and a
bf16 training step of an upcycled model (skipped where there is no GPU; CI has none)."""

import pytest
import torch
from torch import nn

import moekit
from moekit.demo.tiny import tiny_inputs, tiny_model

from .test_moe_runtime import seeded_block

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _block(impl: str, dtype: torch.dtype) -> nn.Module:
    return seeded_block(impl, hidden=256, intermediate=512, std=0.05, seed=0).to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_implementation_agrees_on_cuda(dtype):
    """auto (grouped_mm on CUDA), eager and batched_mm: same outputs and gradients within the dtype's tolerance."""
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    x0 = torch.randn(2, 300, 256, device="cuda", dtype=dtype)
    results = {}
    for impl in ("auto", "eager", "grouped_mm", "batched_mm"):
        block = _block(impl, dtype)
        x = x0.clone().requires_grad_(True)
        out = block(x)
        out.float().pow(2).mean().backward()
        results[impl] = [out.detach().float(), x.grad.float()] + [p.grad.float() for p in block.parameters()]
        if impl == "auto":
            assert block.context.settings._experts_implementation == "grouped_mm"  # auto's choice on CUDA
    for impl in ("eager", "grouped_mm", "batched_mm"):
        for a, b in zip(results[impl], results["auto"]):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=impl)


def test_upcycled_model_trains_in_bf16_on_cuda():
    model = tiny_model("qwen2_5_vl")
    moe = moekit.upcycle(model, moekit.UpcycleSpec(layers="interval:2", num_experts=4, top_k=2)).to("cuda")
    batch = {k: v.to("cuda") for k, v in tiny_inputs("qwen2_5_vl", "image", seed=1).items()}
    optimizer = torch.optim.AdamW(moe.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = moe(**batch).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten())
        loss = loss + 0.01 * moekit.router_losses(moe).load_balancing
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
