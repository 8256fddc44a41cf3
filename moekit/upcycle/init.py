"""The deterministic parts of an upcycling shared by the in-memory surgery and the streaming converter, so both
produce bit-identical experts and routers from the same spec."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit.upcycle.sources import check_shapes, perturb
from moekit.upcycle.spec import UpcycleSpec


def expert_tensors(
    spec: UpcycleSpec,
    index: int,
    layer: int,
    tensors: dict[str, torch.Tensor],
    gated: bool,
    init: Callable | None = None,
) -> dict[str, torch.Tensor]:
    """Expert `index`'s fused FFN tensors for `layer` after its noise / Drop-Upcycling re-init and its plug-in
    initialiser `init`, if any."""
    expert = spec.experts[index]
    seed = expert.seed if expert.seed is not None else spec.seed + index
    generator = torch.Generator().manual_seed(seed * 100_003 + layer)
    tensors = perturb(
        tensors, noise_scale=expert.noise_scale, reinit_ratio=expert.reinit_ratio, gated=gated, generator=generator
    )
    if init is not None:
        tensors = run_expert_init(spec, index, init, tensors, layer, gated, generator)
    return tensors


def run_expert_init(
    spec: UpcycleSpec,
    index: int,
    fn: Callable,
    tensors: dict[str, torch.Tensor],
    layer: int,
    gated: bool,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Run expert `index`'s plug-in initialiser on a copy of its tensors; it must keep every tensor and shape."""
    expert = spec.experts[index]
    where = f"experts[{index}].init ({expert.init.name}), layer {layer}"
    copy = {k: v.clone() for k, v in tensors.items()}
    out = fn(copy, layer=layer, expert=expert.name, index=index, gated=gated, generator=generator)
    if not isinstance(out, dict):
        raise TypeError(f"{where}: the expert initialiser returned {type(out).__name__}, expected a dict of tensors")
    check_shapes(tensors, out, where)
    return out


def plugin_expert_inits(spec: UpcycleSpec) -> list[Callable | None]:
    """Each expert's plug-in initialiser (built from the registry), None where it has none."""
    return [e.init.build() if e.init is not None else None for e in spec.experts]


def router_weight(spec: UpcycleSpec, layer: int, hidden_size: int) -> torch.Tensor:
    """The fp32 router weight [M, H] of `layer` for `normal` / `zeros` init (prototype rows are set later)."""
    shape = (spec.num_experts, hidden_size)
    if spec.router.init == "zeros":
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(spec.seed * 7919 + layer)
    return torch.randn(shape, generator=generator) * spec.router.std
