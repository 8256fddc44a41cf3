"""Parameter accounting: total vs activated parameters of a (possibly meta-device) MoE model."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from moekit.arch import ArchAdapter
from moekit.moe.block import MoeBlock


@dataclass
class LayerRow:
    index: int
    kind: str  # "dense" or "moe"
    experts: int = 0
    top_k: int = 0
    ffn_params: int = 0  # parameters of one FFN / expert
    total: int = 0  # parameters of the FFN or MoE block
    active: int = 0  # parameters one token uses in that block


@dataclass
class Accounting:
    total: int
    active: int
    layers: list[LayerRow] = field(default_factory=list)

    @property
    def moe_layers(self) -> list[int]:
        return [r.index for r in self.layers if r.kind == "moe"]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def account(model: nn.Module, adapter: ArchAdapter | str, mlp: str = "mlp") -> Accounting:
    """Count parameters: a token activates the router, its top-k experts and any shared expert, and every
    parameter outside the MoE blocks (embeddings and vision tower included, as in PolyV's Table 5).

    `adapter` is the model's `ArchAdapter` (or the decoder-layer path, with `mlp` the FFN's attribute)."""
    total = _numel(model)
    inactive = 0
    rows = []
    layers_path = adapter.layers if isinstance(adapter, ArchAdapter) else adapter
    for index, layer in enumerate(model.get_submodule(layers_path)):
        ffn = adapter.block_of(layer) if isinstance(adapter, ArchAdapter) else layer.get_submodule(mlp)
        if isinstance(ffn, MoeBlock):
            per_expert = sum(p[0].numel() for p in ffn.experts.parameters())
            block_total = _numel(ffn)
            idle = (ffn.num_experts - ffn.top_k) * per_expert
            inactive += idle
            rows.append(LayerRow(index, "moe", ffn.num_experts, ffn.top_k, per_expert, block_total, block_total - idle))
        else:
            params = adapter.ffn_parameters(layer) if isinstance(adapter, ArchAdapter) else list(ffn.parameters())
            n = sum(p.numel() for p in params)
            rows.append(LayerRow(index, "dense", ffn_params=n, total=n, active=n))
    return Accounting(total=total, active=total - inactive, layers=rows)


def billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"
