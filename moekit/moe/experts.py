"""Routed experts stored as fused 3-D tensors in the layout transformers v5 uses.

Gated FFNs (SwiGLU, GeGLU): `gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`.
Plain FFNs (fc1 -> act -> fc2, CLIP towers, LLaVA projectors): `up_proj [E, I, H]` and `down_proj [E, H, I]`.
Optional biases `gate_up_proj_bias [E, 2I]` / `up_proj_bias [E, I]` and `down_proj_bias [E, H]`.

The classes are wrapped with transformers' `use_experts_implementation`, so its `batched_mm` and `grouped_mm`
kernels run them unchanged; the eager forward below is ours because the stock eager loop knows neither biases
nor non-gated experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import use_experts_implementation

from moekit.moe.fused import expert_mlps, fused_supported, routed_mlps
from moekit.moe.slots import gather_slots, slot_order, unsort_slots

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
AUTO = "auto"


def default_implementation(device: torch.device | str = "cpu") -> str:
    """The implementation measured fastest on `device` (bench/moe_block.py, docs/benchmarks.md).

    CPU: moekit's eager path matches torch's CPU `grouped_mm` in forward (within noise) and beats it in
    forward+backward, in fp32 and bf16, and its backward accepts the stride-0 gradients of `out.sum().backward()` that the CPU `grouped_mm` backward rejects.
    CUDA: `grouped_mm` (one kernel, no host sync; transformers falls back by itself on GPUs without the kernel).
    """
    has_kernel = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")
    return "grouped_mm" if torch.device(device).type == "cuda" and has_kernel else "eager"


@dataclass
class ExpertsSettings:
    """Shared by every experts module of one model; transformers' dispatcher reads `_experts_implementation`.

    `requested` is one of IMPLEMENTATIONS or `auto` (the default): auto follows `default_implementation` for the
    device of each MoeBlock forward, so a model moved between CPU and GPU keeps the fastest path.
    """

    requested: str = AUTO

    def __post_init__(self) -> None:
        self.set(self.requested)

    def set(self, name: str) -> None:
        if name not in (*IMPLEMENTATIONS, AUTO):
            raise ValueError(f"unknown experts implementation {name!r}; choose one of {(*IMPLEMENTATIONS, AUTO)}")
        self.requested = name
        self._experts_implementation = default_implementation() if name == AUTO else name

    def resolve(self, device: torch.device) -> None:
        """Pick the implementation for `device` when `auto` was requested (called by MoeBlock on each forward)."""
        if self.requested == AUTO:
            self._experts_implementation = default_implementation(device)


class _ExpertsBase(nn.Module):
    gated: bool = True
    biased: bool = False

    def __init__(
        self, config: ExpertsSettings, num_experts: int, hidden_size: int, intermediate_size: int, act: nn.Module
    ):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.act_fn = act
        up_rows = (2 if self.gated else 1) * intermediate_size
        up_name = "gate_up_proj" if self.gated else "up_proj"
        self.register_parameter(up_name, nn.Parameter(torch.empty(num_experts, up_rows, hidden_size)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if self.biased:
            self.register_parameter(f"{up_name}_bias", nn.Parameter(torch.zeros(num_experts, up_rows)))
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))

    @property
    def up_weight(self) -> torch.Tensor:
        return self.gate_up_proj if self.gated else self.up_proj

    @property
    def up_bias(self) -> torch.Tensor | None:
        if not self.biased:
            return None
        return self.gate_up_proj_bias if self.gated else self.up_proj_bias

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Eager path: slots sorted by expert once, then one fused node runs every expert's MLP on its block of rows
        and sums each token's weighted rows (`moekit.moe.fused`, written for CPU speed: no per-slot copies moved
        back to token order, no per-token batched mixing product, buffers reused across experts).
        """
        down_bias = self.down_proj_bias if self.biased else None
        weights = top_k_weights.to(hidden_states.dtype)
        if not fused_supported(self.act_fn, hidden_states):
            return self._unfused(hidden_states, top_k_index, weights, down_bias)
        order, inverse, counts = slot_order(top_k_index, self.num_experts)
        return routed_mlps(
            hidden_states,
            weights,
            order,
            inverse,
            counts,
            self.up_weight,
            self.down_proj,
            self.act_fn,
            gated=self.gated,
            up_bias=self.up_bias,
            down_bias=down_bias,
        )

    def _unfused(self, hidden_states, top_k_index, weights, down_bias) -> torch.Tensor:
        """Plain autograd (activations with parameters, autocast): permutation gathers, per-expert MLPs, a mix."""
        num_tokens, top_k = top_k_index.shape
        order, inverse, counts = slot_order(top_k_index, self.num_experts)
        inputs = gather_slots(hidden_states, order, inverse, top_k)
        out = expert_mlps(
            inputs,
            counts,
            self.up_weight,
            self.down_proj,
            self.act_fn,
            gated=self.gated,
            up_bias=self.up_bias,
            down_bias=down_bias,
        )
        per_slot = unsort_slots(out, order, inverse).view(num_tokens, top_k, out.shape[-1])
        return torch.einsum("tk,tkh->th", weights.to(per_slot.dtype), per_slot)

    def extra_repr(self) -> str:
        kind = "gated" if self.gated else "plain"
        return f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, {kind}, bias={self.biased}"


def _variant(gated: bool, biased: bool) -> type[_ExpertsBase]:
    name = f"{'Gated' if gated else 'Plain'}Experts{'WithBias' if biased else ''}"
    cls = type(name, (_ExpertsBase,), {"gated": gated, "biased": biased, "__module__": __name__})
    return use_experts_implementation(cls, has_gate=gated, has_bias=biased)


# One class per (gated, biased) pair: transformers' decorator fixes these flags per class.
EXPERT_CLASSES: dict[tuple[bool, bool], type[_ExpertsBase]] = {
    (g, b): _variant(g, b) for g in (True, False) for b in (False, True)
}


def make_experts(
    settings: ExpertsSettings,
    num_experts: int,
    hidden_size: int,
    intermediate_size: int,
    act: nn.Module,
    *,
    gated: bool,
    biased: bool,
) -> _ExpertsBase:
    """Build an (uninitialised) experts module of the right variant."""
    return EXPERT_CLASSES[(gated, biased)](settings, num_experts, hidden_size, intermediate_size, act)


def is_experts(module: nn.Module) -> bool:
    return isinstance(module, _ExpertsBase)
