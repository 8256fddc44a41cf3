"""Turn the recorded MoE layout (`config.moekit`) into MoE blocks inside a freshly built dense model."""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from moekit.arch import ArchAdapter
from moekit.config.record import MoeRecord
from moekit.moe import MoeBlock, MoeContext
from moekit.moe.experts import AUTO, IMPLEMENTATIONS, ExpertsSettings
from moekit.moe.inline import InlineDown, InlineUp


def guard_key(record: MoeRecord) -> str:
    """State-dict key of the dense FFN weight that a moekit checkpoint fills with a zero-size tensor.

    A stock transformers class that ignores the `moekit_*` model type (e.g. `Qwen2_5_VLForConditionalGeneration.
    from_pretrained(dir)`) then fails with a size mismatch instead of silently loading a dense model with
    randomly initialised FFNs. moekit's own classes ignore this key.
    """
    adapter = ArchAdapter.from_record(record)
    first_proj = adapter.ffn.gate or adapter.ffn.up
    return f"{adapter.ffn_prefix(record.layers[0])}.{first_proj}.weight"


def guard_pattern(record: MoeRecord) -> str:
    """Regex matching the guard key under any of the family's key renamings (legacy prefixes), and its sibling
    projection: a family whose checkpoints merge gate and up (HRM-text, Molmo2) saves the guard merged and splits
    it again on loading, into both names."""
    layers, index, mlp, _, weight = guard_key(record).split(".")[-5:]  # layers.<i>.<mlp>.<proj>.weight
    ffn = ArchAdapter.from_record(record).ffn
    projections = "|".join(re.escape(p) for p in dict.fromkeys(p for p in (ffn.gate, ffn.up) if p))
    return r"(^|\.)" + re.escape(f"{layers}.{index}.{mlp}.") + f"({projections})" + re.escape(f".{weight}") + "$"


def new_context(record: MoeRecord, requested: str | None = None) -> MoeContext:
    impl = requested if requested in IMPLEMENTATIONS else AUTO
    return MoeContext(
        image_token_ids=tuple(record.arch.image_token_ids),
        video_token_ids=tuple(record.arch.video_token_ids),
        settings=ExpertsSettings(impl),
        balance_loss=record.balance_loss,
    )


def make_block(dense: nn.Module, adapter: ArchAdapter, record: MoeRecord, context: MoeContext, layer: int) -> MoeBlock:
    """An (uninitialised) MoE block shaped after `dense`, on its device and dtype."""
    weight = getattr(dense, adapter.ffn.down).weight
    block = MoeBlock(
        context,
        hidden_size=adapter.hidden_size,
        intermediate_size=adapter.intermediate_size,
        num_experts=record.num_experts,
        top_k=record.top_k,
        act=copy.deepcopy(adapter.ffn.activation(dense)),
        gated=adapter.ffn.gated,
        biased=adapter.biased,
        shared_expert=copy.deepcopy(dense) if record.shared_expert else None,
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


def build_blocks(model: nn.Module, record: MoeRecord, context: MoeContext) -> dict[int, MoeBlock]:
    """An MoE block for every layer in `record.layers`, shaped after that layer's FFN; the model is not changed."""
    adapter = ArchAdapter.from_record(record)
    return {
        layer: make_block(adapter.ffn_module(model, layer), adapter, record, context, layer) for layer in record.layers
    }


def place_blocks(model: nn.Module, record: MoeRecord, blocks: dict[int, MoeBlock]) -> None:
    """Put each block in place of its layer's FFN."""
    adapter = ArchAdapter.from_record(record)
    decoder = model.get_submodule(adapter.layers)
    parent, _, attr = adapter.mlp.rpartition(".")  # a nested FFN (T5's layer.2.DenseReluDense) is set in place
    for layer, block in blocks.items():
        setattr(decoder[layer].get_submodule(parent) if parent else decoder[layer], attr, block)
        if adapter.inline:  # the projections give way to the block's two halves; the layer's own code runs on
            setattr(decoder[layer], adapter.ffn.up, InlineUp(block))
            setattr(decoder[layer], adapter.ffn.down, InlineDown(block))


def install_blocks(model: nn.Module, record: MoeRecord, context: MoeContext) -> dict[int, MoeBlock]:
    """Replace the FFN of every layer in `record.layers` with an MoE block; return them by layer."""
    blocks = build_blocks(model, record, context)
    place_blocks(model, record, blocks)
    return blocks
