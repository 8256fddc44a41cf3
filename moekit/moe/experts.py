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

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def default_implementation() -> str:
    """`grouped_mm` where this torch has a grouped GEMM kernel (CPU >= 2.9, CUDA sm80+), else `eager`."""
    has_kernel = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")
    return "grouped_mm" if has_kernel else "eager"


@dataclass
class ExpertsSettings:
    """Shared by every experts module of one model; transformers' dispatcher reads `_experts_implementation`."""

    _experts_implementation: str = "eager"

    def set(self, name: str) -> None:
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"unknown experts implementation {name!r}; choose one of {IMPLEMENTATIONS}")
        self._experts_implementation = name


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
        """Eager path: tokens sorted by expert, one dense matmul per expert that received tokens."""
        num_tokens, top_k = top_k_index.shape
        flat_expert = top_k_index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        token_of_slot = order // top_k
        inputs = hidden_states[token_of_slot]
        outputs = []
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            x = inputs[start : start + count]
            bias = None if self.up_bias is None else self.up_bias[expert]
            h = F.linear(x, self.up_weight[expert], bias)
            if self.gated:
                gate, up = h.chunk(2, dim=-1)
                h = self.act_fn(gate) * up
            else:
                h = self.act_fn(h)
            bias = self.down_proj_bias[expert] if self.biased else None
            outputs.append(F.linear(h, self.down_proj[expert], bias))
            start += count
        out = torch.cat(outputs) * top_k_weights.reshape(-1)[order, None]
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return unsorted.view(num_tokens, top_k, -1).sum(dim=1)

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
