"""In-memory upcycling: `moekit.upcycle(model, spec)` replaces the chosen FFNs with MoE blocks."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from moekit.arch import ArchAdapter, ffn_tensors, resolve_arch
from moekit.config.record import MoeRecord
from moekit.io.reader import check_finite
from moekit.modeling.classes import moekit_classes
from moekit.modeling.structure import build_blocks, new_context, place_blocks
from moekit.moe import MoeBlock
from moekit.moe.context import attach_context
from moekit.upcycle.init import expert_tensors, plugin_expert_inits, router_weight, run_expert_init
from moekit.upcycle.layout import resolve_layers
from moekit.upcycle.router_init import prototype_router_weights
from moekit.upcycle.sources import ExpertSource, ModuleSource, as_source, check_shapes
from moekit.upcycle.spec import ROUTER_INITS, UpcycleSpec
from moekit.upcycle.verify import check_layers


def build_record(spec: UpcycleSpec, adapter: ArchAdapter, layers: list[int], sources: dict[str, Any]) -> MoeRecord:
    """The `config.moekit` record: everything needed to rebuild the MoE layout, plus provenance."""
    return MoeRecord(
        base_model_type=adapter.model_type,
        auto=adapter.auto,
        num_layers=adapter.num_layers,
        hidden_size=adapter.hidden_size,
        intermediate_size=adapter.intermediate_size,
        biased=adapter.biased,
        layers=layers,
        arch=adapter.to_record(),
        spec=spec.model_dump(mode="json"),
        experts=spec.expert_names,
        model_class=adapter.model_class,
        sources=sources,
    )


def _resolve_sources(
    model: nn.Module,
    spec: UpcycleSpec,
    adapter: ArchAdapter,
    sources: Mapping[str, Any],
    layers: list[int],
    allow_pickle: bool,
    allow_nonfinite: bool = False,
) -> list[ExpertSource | None]:
    """One source per expert (None = copy of the base FFN), every shape checked against the base first, and every
    FFN tensor checked for NaN/Inf unless `allow_nonfinite`."""
    unknown = sorted(set(sources) - set(spec.expert_names))
    if unknown:
        raise ValueError(f"sources given for unknown experts {unknown}; the spec's experts are {spec.expert_names}")
    resolved: list[ExpertSource | None] = []
    names = None  # checkpoint key names, built on first use
    for expert in spec.experts:
        if expert.name in sources:
            resolved.append(as_source(sources[expert.name], adapter, expert.name))
        elif expert.source == "base":
            resolved.append(None)
        else:
            from moekit.io.names import KeyNames
            from moekit.upcycle.checkpoint_sources import checkpoint_source

            names = names or KeyNames(model)
            base = ModuleSource(model, adapter, "base")
            resolved.append(
                checkpoint_source(
                    expert.source, adapter, expert.name, names, base, expert.lora_scale, allow_pickle, allow_nonfinite
                )
            )
    for layer in layers:
        reference = ffn_tensors(adapter.ffn_module(model, layer), adapter.ffn)
        if not allow_nonfinite:
            _check_finite(reference, f"the base model, layer {layer} FFN ({adapter.ffn_prefix(layer)})")
        for source in resolved:
            if source is not None:
                tensors = source.tensors(layer)
                check_shapes(reference, tensors, f"{source.description}, layer {layer}")
                if not allow_nonfinite:
                    _check_finite(tensors, f"{source.description}, layer {layer} FFN")
    return resolved


def _check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    for name, tensor in tensors.items():
        check_finite(tensor, f"{where}: {name}", flag="allow_nonfinite=True")


def _swap_classes(model: nn.Module, adapter: ArchAdapter, record: MoeRecord) -> None:
    """Make the model an instance of moekit's class for its family, in place.

    Rebuilding a fresh instance would hold two copies of the model; the moekit class adds only methods to the
    stock class, so swapping `__class__` on the existing objects is safe.
    """
    config_cls, model_cls = moekit_classes(adapter.model_type, adapter.model_class)
    model.config.__class__ = config_cls
    model.config.moekit = record.to_json()
    model.__class__ = model_cls


@torch.no_grad()
def upcycle(
    model: nn.Module,
    spec: UpcycleSpec | Mapping[str, Any],
    sources: Mapping[str, nn.Module | Mapping[str, torch.Tensor]] | None = None,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Turn the chosen decoder FFNs of `model` into MoE blocks, in place, and return the model.

    Args:
        model: a dense transformers model (its decoder layers and FFNs are found by structure; `spec.arch`
            names them by hand).
        spec: an `UpcycleSpec` (or a dict of its fields).
        sources: in-memory FFN sources by expert name: a model of the same family or a state dict. Experts not
            named here use their spec `source` ("base" = copy of this model's FFN, or a checkpoint path).
        calibration: batches (model inputs) for `router.init == "prototype"`.
        allow_pickle: let checkpoint sources be `.bin`/`.pt` files (read with `weights_only=True`).
        allow_nonfinite: copy FFN weights holding NaN/Inf instead of refusing them (ValueError naming the tensor).

    Every check (layers, shapes, sources, and that each MoE block with copied experts computes its dense FFN)
    runs before the model is modified; the model is either fully upcycled or untouched.
    """
    if not isinstance(spec, UpcycleSpec):
        from moekit.config import parse_config

        spec = parse_config(UpcycleSpec, dict(spec), source="UpcycleSpec")
    if getattr(model.config, "moekit", None) is not None:
        raise ValueError("this model is already an MoE model made by moekit; upcycle its dense base instead")
    adapter = resolve_arch(model, spec.arch)
    if adapter.inline and spec.shared_expert:
        raise ValueError(
            f"{adapter.model_type}: its FFN is inline in the layer, which moekit upcycles without a shared expert"
        )
    layers = resolve_layers(spec.layers, adapter.num_layers)
    resolved = _resolve_sources(model, spec, adapter, sources or {}, layers, allow_pickle, allow_nonfinite)
    expert_inits, router_init = _plugin_initialisers(spec)
    first = ffn_tensors(adapter.ffn_module(model, layers[0]), adapter.ffn)
    for index, fn in enumerate(expert_inits):  # a dry run on one layer: a broken initialiser fails before any change
        if fn is not None:
            run_expert_init(spec, index, fn, first, layers[0], adapter.ffn.gated, torch.Generator().manual_seed(0))
    prototypes = None
    if spec.router.init == "prototype":
        prototypes = prototype_router_weights(model, adapter, layers, spec, calibration)
    elif spec.router.init == "zeros":
        warnings.warn(
            "router.init=zeros: every expert scores the same at first, so top-k ties break towards the lowest "
            "expert indices until training moves the router; use 'normal' or 'prototype' to avoid that",
            stacklevel=2,
        )
    descriptions = {e.name: (s.description if s is not None else "base") for e, s in zip(spec.experts, resolved)}
    record = build_record(spec, adapter, layers, descriptions)
    check_layers(model, adapter, record, layers)  # function preservation, proven on every layer to convert
    context = new_context(record)
    blocks = build_blocks(model, record, context)  # nothing in the model changes until every block is ready
    for layer, block in blocks.items():
        dense = ffn_tensors(adapter.ffn_module(model, layer), adapter.ffn)
        _fill_block(block, layer, spec, resolved, dense, expert_inits)
        _init_router(block, layer, spec, prototypes, router_init)
    place_blocks(model, record, blocks)
    _swap_classes(model, adapter, record)
    attach_context(model, context)
    return model


def _plugin_initialisers(spec: UpcycleSpec) -> tuple[list[Callable | None], Callable | None]:
    """Expert initialisers per expert and the router initialiser that plug-ins provide (built before any change)."""
    experts = plugin_expert_inits(spec)
    router = None
    if spec.router.init not in ROUTER_INITS:
        from moekit.plugins.registry import registry

        router = registry().build("router_init", spec.router.init, spec.router.params, where="router")
    return experts, router


def _fill_block(
    block: MoeBlock,
    layer: int,
    spec: UpcycleSpec,
    sources: list,
    base: dict[str, torch.Tensor],
    inits: list[Callable | None],
) -> None:
    experts = block.experts
    for index, source in enumerate(sources):
        tensors = base if source is None else source.tensors(layer)
        tensors = expert_tensors(spec, index, layer, tensors, experts.gated, inits[index])
        experts.up_weight[index].copy_(tensors["up"])
        experts.down_proj[index].copy_(tensors["down"])
        if experts.biased:
            experts.up_bias[index].copy_(tensors.get("up_bias", torch.zeros_like(experts.up_bias[index])))
            experts.down_proj_bias[index].copy_(
                tensors.get("down_bias", torch.zeros_like(experts.down_proj_bias[index]))
            )


def _init_router(
    block: MoeBlock,
    layer: int,
    spec: UpcycleSpec,
    prototypes: dict[int, torch.Tensor] | None,
    plugin: Callable | None,
) -> None:
    weight = block.gate.weight
    if plugin is not None:
        generator = torch.Generator().manual_seed(spec.seed * 7919 + layer)
        plugin(weight, layer=layer, experts=spec.expert_names, block=block, generator=generator)
        if not torch.isfinite(weight).all():
            raise ValueError(f"router.init {spec.router.init!r} left non-finite router weights in layer {layer}")
        return
    weight.copy_(router_weight(spec, layer, weight.shape[1]))
    if prototypes is not None:
        rows = prototypes[layer]
        for index, row in enumerate(rows):
            if row is not None:
                weight[index].copy_(row)
