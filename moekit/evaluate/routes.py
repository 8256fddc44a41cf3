"""Routing analysis: run an MoE checkpoint over datasets and collect `RoutingStats` per dataset and per modality.

The two views of PolyV's analysis: the share of routed tokens each expert gets on each dataset (its Fig. 5) and
per input modality (its Fig. 6), both summed over all MoE layers. Samples are batched within one dataset and one
modality, so every forward pass counts towards exactly one dataset and one modality.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import send_to_device

from moekit._version import __version__
from moekit.attach.position import feeding
from moekit.config.record import MoeRecord
from moekit.data.collate import Collator, split_batch
from moekit.data.config import DataConfig
from moekit.data.dataset import MixtureDataset
from moekit.data.schema import BadSample
from moekit.evaluate.plots import plot_shares
from moekit.io.atomic import atomic_dir
from moekit.moe import RoutingStats
from moekit.moe.context import get_context


class _Tee:
    """Forwards each routing record to several `RoutingStats`."""

    def __init__(self, *targets: RoutingStats):
        self.targets = targets

    def record(self, *args: Any) -> None:
        for target in self.targets:
            target.record(*args)


def expert_names(model: Any) -> list[str] | None:
    record = MoeRecord.of(model.config)
    return record.experts if record is not None else None


@torch.no_grad()
def collect_routes(
    model: Any,
    dataset: MixtureDataset,
    *,
    batch_size: int = 4,
    max_samples: int | None = None,
    encoders: dict[str, Any] | None = None,
) -> tuple[dict[str, RoutingStats], dict[str, RoutingStats], dict[str, dict[str, int]]]:
    """(stats per dataset, stats per sample modality, sample counts per dataset and modality); `encoders` are the
    position encoders attached to `model`, fed each batch's geometry."""
    context = get_context(model)
    names = expert_names(model)
    by_dataset: dict[str, RoutingStats] = {}
    by_modality: dict[str, RoutingStats] = {}
    counts: dict[str, dict[str, int]] = {}
    device = next(model.parameters()).device
    collate = Collator(dataset.parts[0].preprocessor.pad_id)
    for part in dataset.parts:
        groups: dict[str, list[int]] = defaultdict(list)
        for i in range(len(part) if max_samples is None else min(len(part), max_samples)):
            groups[part.modality(i)].append(i)
        by_dataset[part.spec.name] = dataset_stats = RoutingStats(names)
        counts[part.spec.name] = {}
        for modality, indices in sorted(groups.items()):
            modality_stats = by_modality.setdefault(modality, RoutingStats(names))
            items = [item for item in (_load(part, i) for i in indices) if item is not None]
            counts[part.spec.name][modality] = len(items)
            for start in range(0, len(items), batch_size):
                inputs, extras = split_batch(collate(items[start : start + batch_size]))
                inputs = send_to_device(inputs, device)
                inputs.pop("labels", None)
                previous = context.stats, context.sample_modalities
                context.stats, context.sample_modalities = (
                    _Tee(dataset_stats, modality_stats),
                    extras["sample_modalities"],
                )
                try:
                    with feeding(encoders or {}, model, inputs.get("input_ids"), extras.get("geometry")):
                        model(**inputs)
                finally:
                    context.stats, context.sample_modalities = previous
    return by_dataset, by_modality, counts


def _load(part: Any, index: int) -> dict | None:
    try:
        return part.load(index)
    except BadSample:
        if part.config.bad_samples == "fail":
            raise
        return None


def expert_shares(stats: RoutingStats) -> list[float]:
    """Share of top-k selections per expert over all layers and token kinds."""
    total = sum(c.sum(0) for c in stats.counts.values())
    if not isinstance(total, torch.Tensor) or int(total.sum()) == 0:
        return []
    return (total.double() / total.sum()).tolist()


def routes_report(
    by_dataset: dict[str, RoutingStats],
    by_modality: dict[str, RoutingStats],
    counts: dict[str, dict[str, int]],
    experts: list[str] | None,
    model_path: str,
) -> dict[str, Any]:
    def entry(stats: RoutingStats, samples: int) -> dict[str, Any]:
        return {"samples": samples, "expert_share": expert_shares(stats), "stats": stats.to_dict()}

    modality_counts: dict[str, int] = defaultdict(int)
    for per in counts.values():
        for modality, n in per.items():
            modality_counts[modality] += n
    return {
        "model": model_path,
        "moekit_version": __version__,
        "experts": experts,
        "datasets": {name: entry(s, sum(counts[name].values())) for name, s in by_dataset.items()},
        "modalities": {name: entry(s, modality_counts[name]) for name, s in by_modality.items()},
    }


def write_routes(
    model: Any,
    dataset: MixtureDataset,
    out: str | Path,
    model_path: str,
    *,
    batch_size: int = 4,
    max_samples: int | None = None,
    config: DataConfig | None = None,
    encoders: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Collect, then write `routes.json`, `routes_by_dataset.png` and `routes_by_modality.png` into `out`."""
    by_dataset, by_modality, counts = collect_routes(
        model, dataset, batch_size=batch_size, max_samples=max_samples, encoders=encoders
    )
    experts = expert_names(model)
    report = routes_report(by_dataset, by_modality, counts, experts, model_path)
    if config is not None:
        report["data"] = config.model_dump()
    with atomic_dir(out) as tmp:
        (tmp / "routes.json").write_text(json.dumps(report, indent=2))
        labels = experts or [f"expert {i}" for i in range(len(next(iter(report["datasets"].values()))["expert_share"]))]
        plot_shares(
            {k: v["expert_share"] for k, v in report["datasets"].items()},
            labels,
            tmp / "routes_by_dataset.png",
            "Token share per expert by dataset (all MoE layers)",
        )
        plot_shares(
            {k: v["expert_share"] for k, v in report["modalities"].items()},
            labels,
            tmp / "routes_by_modality.png",
            "Token share per expert by modality (all MoE layers)",
            grouped=True,
        )
    return report
