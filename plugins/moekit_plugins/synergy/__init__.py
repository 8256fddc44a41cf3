"""Built-in synergy heads: PolyV `<synergy>` tokens with alignment projectors, Vid-LLM cross-task adapter.
Registered through the `moekit` entry-point group (`synergy = "moekit_plugins.synergy"`)."""

from __future__ import annotations

from moekit import Component, hookimpl
from moekit_plugins.synergy.cta import CrossTaskHead, CrossTaskParams
from moekit_plugins.synergy.polyv import PolyVSynergyHead, PolyVSynergyParams

__all__ = ["CrossTaskHead", "PolyVSynergyHead"]


@hookimpl
def moekit_synergy_heads() -> list[Component]:
    return [
        Component(
            "polyv_synergy",
            "synergy_head",
            PolyVSynergyParams,
            lambda params, **_: PolyVSynergyHead(params),
            "PolyV: K <synergy> tokens, temporal + geometric projectors, MSE to pooled teacher features",
        ),
        Component(
            "vidllm_cta",
            "synergy_head",
            CrossTaskParams,
            lambda params, **_: CrossTaskHead(params),
            "Vid-LLM: cross-task adapter with bridge tokens; L_geo, L_lang and structural consistency",
        ),
    ]
