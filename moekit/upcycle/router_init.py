"""Per-modality prototype router init: each expert's router row points at the mean FFN input of its modality."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from moekit.arch import ArchAdapter
from moekit.config.record import MoeRecord
from moekit.moe import MoeBlock, get_context
from moekit.moe.context import TOKEN_KINDS, MoeContext
from moekit.upcycle.spec import UpcycleSpec


class PrototypeCollector:
    """Sums FFN inputs per layer and per token kind while the dense model runs calibration batches."""

    def __init__(self, num_kinds: int = len(TOKEN_KINDS)):
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}
        self.num_kinds = num_kinds

    def add(self, layer: int, hidden: torch.Tensor, kinds: torch.Tensor, valid: torch.Tensor | None) -> None:
        flat = hidden.reshape(-1, hidden.shape[-1]).double().cpu()
        kinds = kinds.cpu()
        if valid is not None:
            flat, kinds = flat[valid.cpu()], kinds[valid.cpu()]
        if layer not in self.sums:
            self.sums[layer] = torch.zeros(self.num_kinds, flat.shape[-1], dtype=torch.float64)
            self.counts[layer] = torch.zeros(self.num_kinds, dtype=torch.float64)
        self.sums[layer].index_add_(0, kinds, flat)
        self.counts[layer] += torch.bincount(kinds, minlength=self.num_kinds).double()

    def rows(self, layer: int, modalities: list[str | None], scale: float, where: str) -> list[torch.Tensor | None]:
        """Router rows: `scale * unit(mean_kind - mean_all)` for experts with a modality, None for the rest."""
        counts, sums = self.counts[layer], self.sums[layer]
        overall = sums.sum(0) / counts.sum()
        out = []
        for modality in modalities:
            if modality is None:
                out.append(None)
                continue
            k = TOKEN_KINDS.index(modality)
            if counts[k] == 0:
                seen = [TOKEN_KINDS[i] for i in range(self.num_kinds) if counts[i] > 0]
                raise ValueError(
                    f"{where}: no {modality} tokens in the calibration batches (seen: {seen}); add {modality} samples"
                )
            direction = sums[k] / counts[k] - overall
            norm = direction.norm()
            out.append((direction / norm * scale).float() if norm > 0 else torch.zeros_like(direction).float())
        return out


def collect_prototypes(
    model: nn.Module,
    adapter: ArchAdapter,
    layers: list[int],
    batches: Iterable[Mapping[str, torch.Tensor]],
    context: MoeContext,
) -> PrototypeCollector:
    """Run `batches` through the dense model, summing each chosen FFN's input per token kind."""
    collector = PrototypeCollector()
    handles = []
    for layer in layers:

        def hook(module, args, layer=layer):
            kinds, valid = context.aligned(args[0].reshape(-1, args[0].shape[-1]).shape[0])
            if kinds is None:
                kinds = torch.zeros(args[0].reshape(-1, args[0].shape[-1]).shape[0], dtype=torch.long)
            collector.add(layer, args[0], kinds, valid)

        handles.append(adapter.ffn_module(model, layer).register_forward_pre_hook(hook))
    try:
        for batch in batches:
            batch = dict(batch)
            context.sample_modalities = batch.pop("sample_modalities", None)
            context.observe(batch.get("input_ids"), batch.get("attention_mask"))
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        context.sample_modalities = None
    return collector


def prototype_router_weights(
    model: nn.Module,
    adapter: ArchAdapter,
    layers: list[int],
    spec: UpcycleSpec,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None,
) -> dict[int, list[torch.Tensor | None]]:
    """Router rows per layer for `router.init: prototype` (None rows keep the normal init)."""
    modalities = [e.modality for e in spec.experts]
    if calibration is None:
        raise ValueError(
            "router.init=prototype needs calibration batches: upcycle(model, spec, calibration=[batch, ...])"
        )
    if all(m is None for m in modalities):
        raise ValueError(
            "router.init=prototype needs experts with a modality (name them text/image/video/3d or set `modality`)"
        )
    context = MoeContext(image_token_ids=adapter.image_token_ids, video_token_ids=adapter.video_token_ids)
    collector = collect_prototypes(model, adapter, layers, calibration, context)
    if not collector.sums:
        raise ValueError("the calibration batches were empty")
    return {layer: collector.rows(layer, modalities, spec.router.prototype_scale, f"layer {layer}") for layer in layers}


@torch.no_grad()
def calibrate_router(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], scale: float | None = None
) -> dict[int, list[str]]:
    """Set per-modality prototype rows in the routers of an already upcycled `model`, in place.

    The prototype of each MoE layer is taken from that layer's own input while the MoE model runs, so later
    layers see the routing of earlier ones. Experts without a modality keep their router rows. Returns, per
    layer, the experts whose rows were set.
    """
    record = MoeRecord.of(model.config)
    modalities = record.expert_modalities
    if all(m is None for m in modalities):
        raise ValueError("no expert has a modality: name experts text/image/video/3d or set `modality` in the spec")
    scale = record.prototype_scale if scale is None else scale
    context = get_context(model)
    collector = PrototypeCollector()
    blocks = {m.layer_index: m for m in model.modules() if isinstance(m, MoeBlock)}
    handles = []
    for layer, block in blocks.items():

        def hook(module, args, layer=layer):
            flat = args[0].reshape(-1, args[0].shape[-1])
            kinds, valid = context.aligned(flat.shape[0])
            collector.add(
                layer, flat, kinds if kinds is not None else torch.zeros(flat.shape[0], dtype=torch.long), valid
            )

        handles.append(block.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            batch = dict(batch)
            context.sample_modalities = batch.pop("sample_modalities", None)
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        context.sample_modalities = None
    if not collector.sums:
        raise ValueError("the calibration data produced no tokens")
    updated = {}
    for layer, block in blocks.items():
        rows = collector.rows(layer, modalities, scale, f"layer {layer}")
        updated[layer] = []
        for index, row in enumerate(rows):
            if row is not None:
                block.gate.weight[index].copy_(row.to(block.gate.weight.dtype))
                updated[layer].append(record.experts[index])
    record.router_calibration = {"scale": scale, "experts": sorted({n for v in updated.values() for n in v})}
    model.config.moekit = record.to_json()
    return updated
