"""Router losses collected from the last forward pass: Switch load balancing (SPEC eq. 9-10) and z-loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

BalanceKind = Literal["switch", "switch_topk"]


def load_balancing_loss(
    router_logits: torch.Tensor,
    top_k_index: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    kind: BalanceKind = "switch",
) -> torch.Tensor:
    """Switch Transformer balance loss `M * sum_i F_i * G_i` over the routed tokens.

    `F_i` is the fraction of tokens whose argmax expert is `i` ("switch") or the fraction of top-k slots that
    went to `i` ("switch_topk"); `G_i` is the mean router probability of expert `i`. It equals 1.0 when the
    routing is perfectly balanced and grows to M when every token picks one expert.
    """
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)
    if valid is not None:
        probs = probs[valid]
        top_k_index = None if top_k_index is None else top_k_index[valid]
    if probs.shape[0] == 0:
        return router_logits.new_zeros((), dtype=torch.float32)
    if kind == "switch":
        chosen = probs.argmax(dim=-1)
        fraction = torch.bincount(chosen, minlength=num_experts).float() / chosen.numel()
    elif kind == "switch_topk":
        if top_k_index is None:
            raise ValueError("the switch_topk balance loss needs the top-k indices")
        fraction = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).float() / top_k_index.numel()
    else:
        raise ValueError(f"unknown balance loss {kind!r}; choose 'switch' or 'switch_topk'")
    return num_experts * torch.sum(fraction * probs.mean(dim=0))


def router_z_loss(router_logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2, keeping router logits small."""
    logits = router_logits.float() if valid is None else router_logits.float()[valid]
    if logits.shape[0] == 0:
        return router_logits.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(logits, dim=-1).square().mean()


@dataclass
class RouterLosses:
    """Losses of one forward pass, averaged over the MoE layers (per-layer values kept for logging)."""

    load_balancing: torch.Tensor
    z_loss: torch.Tensor
    per_layer: dict[int, dict[str, float]] = field(default_factory=dict)

    def total(self, aux_loss_coef: float, z_loss_coef: float = 0.0) -> torch.Tensor:
        """`aux_loss_coef * L_aux + z_loss_coef * L_z`, ready to add to the task loss."""
        return aux_loss_coef * self.load_balancing + z_loss_coef * self.z_loss


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """Every MoE block of `model`, in module order."""
    from moekit.moe.block import MoeBlock

    return [m for m in model.modules() if isinstance(m, MoeBlock)]


def router_losses(model: nn.Module, kind: BalanceKind | None = None) -> RouterLosses:
    """Collect load-balancing and z losses from the last forward pass of every MoE block of `model`.

    `kind` defaults to the spec the model was upcycled with. Padding (attention_mask == 0) is excluded.
    """
    blocks = [b for b in moe_blocks(model) if b.last_router_logits is not None]
    if not blocks:
        raise ValueError("no MoE block has routed anything yet: run a forward pass first")
    if kind is None:
        kind = getattr(blocks[0].context, "balance_loss", "switch")
    balance, z, per_layer = [], [], {}
    for block in blocks:
        _, valid = block.context.aligned(block.last_router_logits.shape[0])
        lb = load_balancing_loss(block.last_router_logits, block.last_top_k_index, valid, kind)
        zl = router_z_loss(block.last_router_logits, valid)
        balance.append(lb)
        z.append(zl)
        per_layer[block.layer_index] = {"load_balancing": float(lb.detach()), "z_loss": float(zl.detach())}
    return RouterLosses(torch.stack(balance).mean(), torch.stack(z).mean(), per_layer)
