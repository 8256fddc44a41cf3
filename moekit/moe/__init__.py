"""The MoE runtime: router, fused experts, the block, router losses and routing statistics."""

from moekit.moe.block import MoeBlock
from moekit.moe.context import TOKEN_KINDS, MoeContext, get_context
from moekit.moe.experts import ExpertsSettings, make_experts
from moekit.moe.losses import RouterLosses, load_balancing_loss, moe_blocks, router_losses, router_z_loss
from moekit.moe.router import TopKRouter
from moekit.moe.stats import RoutingStats

__all__ = [
    "TOKEN_KINDS",
    "ExpertsSettings",
    "MoeBlock",
    "MoeContext",
    "RouterLosses",
    "RoutingStats",
    "TopKRouter",
    "load_balancing_loss",
    "make_experts",
    "get_context",
    "moe_blocks",
    "router_losses",
    "router_z_loss",
]
