"""Turn the recorded MoE layout (`config.moekit`) into MoE blocks inside a freshly built dense model."""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from moekit.arch import ArchAdapter
from moekit.moe import MoeBlock, MoeContext
from moekit.moe.experts import AUTO, IMPLEMENTATIONS, ExpertsSettings

FORMAT_VERSION = 1


def guard_key(meta: dict[str, Any]) -> str:
    """State-dict key of the dense FFN weight that a moekit checkpoint fills with a zero-size tensor.

    A stock transformers class that ignores the `moekit_*` model type (e.g. `Qwen2_5_VLForConditionalGeneration.
    from_pretrained(dir)`) then fails with a size mismatch instead of silently loading a dense model with
    randomly initialised FFNs. moekit's own classes ignore this key.
    """
    arch = meta["arch"]
    first_proj = arch["ffn"]["gate"] or arch["ffn"]["up"]
    return f"{arch['layers']}.{meta['layers'][0]}.{arch['mlp']}.{first_proj}.weight"


def guard_pattern(meta: dict[str, Any]) -> str:
    """Regex matching the guard key under any of the family's key renamings (legacy prefixes)."""
    tail = guard_key(meta).split(".")[-5:]  # layers.<i>.<mlp>.<proj>.weight
    return r"(^|\.)" + re.escape(".".join(tail)) + "$"


def new_context(meta: dict[str, Any], requested: str | None = None) -> MoeContext:
    impl = requested if requested in IMPLEMENTATIONS else AUTO
    arch = meta["arch"]
    return MoeContext(
        image_token_ids=tuple(arch.get("image_token_ids", ())),
        video_token_ids=tuple(arch.get("video_token_ids", ())),
        settings=ExpertsSettings(impl),
        balance_loss=meta["spec"].get("balance_loss", "switch"),
    )


def make_block(
    dense: nn.Module, adapter: ArchAdapter, meta: dict[str, Any], context: MoeContext, layer: int
) -> MoeBlock:
    """An (uninitialised) MoE block shaped after `dense`, on its device and dtype."""
    spec = meta["spec"]
    weight = getattr(dense, adapter.ffn.down).weight
    block = MoeBlock(
        context,
        hidden_size=adapter.hidden_size,
        intermediate_size=adapter.intermediate_size,
        num_experts=spec["num_experts"],
        top_k=spec["top_k"],
        act=copy.deepcopy(getattr(dense, adapter.ffn.act)),
        gated=adapter.ffn.gated,
        biased=adapter.biased,
        shared_expert=copy.deepcopy(dense) if spec.get("shared_expert") else None,
    )
    block.layer_index = layer
    return block.to(device=weight.device, dtype=weight.dtype)


@torch.no_grad()
def init_block(block: MoeBlock, std: float) -> None:
    """Random init used when a moekit model is built from its config alone (no checkpoint)."""
    for name, param in block.named_parameters():
        if param.device.type == "meta" or name.startswith("shared_expert.expert"):
            continue
        if name.endswith("bias") or name == "shared_expert.gate.weight":
            param.zero_()
        else:
            param.normal_(0.0, std)


def install_blocks(model: nn.Module, meta: dict[str, Any], context: MoeContext) -> dict[int, MoeBlock]:
    """Replace the FFN of every layer in `meta['layers']` with an MoE block; return them by layer."""
    adapter = ArchAdapter.from_meta(meta)
    decoder = model.get_submodule(adapter.layers)
    blocks = {}
    for layer in meta["layers"]:
        block = make_block(getattr(decoder[layer], adapter.mlp), adapter, meta, context, layer)
        setattr(decoder[layer], adapter.mlp, block)
        blocks[layer] = block
    return blocks
