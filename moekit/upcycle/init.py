"""The deterministic parts of an upcycling shared by the in-memory surgery and the streaming converter, so both
produce bit-identical experts and routers from the same spec."""

from __future__ import annotations

import torch

from moekit.upcycle.sources import perturb
from moekit.upcycle.spec import UpcycleSpec


def expert_tensors(
    spec: UpcycleSpec, index: int, layer: int, tensors: dict[str, torch.Tensor], gated: bool
) -> dict[str, torch.Tensor]:
    """Expert `index`'s fused FFN tensors for `layer` after its noise / Drop-Upcycling re-init."""
    expert = spec.experts[index]
    seed = expert.seed if expert.seed is not None else spec.seed + index
    generator = torch.Generator().manual_seed(seed * 100_003 + layer)
    return perturb(
        tensors, noise_scale=expert.noise_scale, reinit_ratio=expert.reinit_ratio, gated=gated, generator=generator
    )


def router_weight(spec: UpcycleSpec, layer: int, hidden_size: int) -> torch.Tensor:
    """The fp32 router weight [M, H] of `layer` for `normal` / `zeros` init (prototype rows are set later)."""
    shape = (spec.num_experts, hidden_size)
    if spec.router.init == "zeros":
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(spec.seed * 7919 + layer)
    return torch.randn(shape, generator=generator) * spec.router.std
