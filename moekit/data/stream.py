"""The trainer's batch source over the data layer: `iter_batches(request)` (recipe `data_source: data`).

Every process computes the same epoch order of the stage's mixture and takes every `world_size`-th sample
starting at its rank, in micro-batches of `batch_size`, skipping the `start` micro-batches a resumed run has
already seen. So one optimizer step over all processes sees the same samples whatever the process count.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moekit.config.record import dense_model_type
from moekit.data.collate import Collator
from moekit.data.loader import build_dataset
from moekit.data.mixture import MixtureSampler
from moekit.data.preprocess import Preprocessor
from moekit.data.vision import build_vision


def preprocessor_for(
    model: Any, tokenizer: Any, model_dir: str | Path | None, synergy_tokens: list[str] = ()
) -> Preprocessor:
    """The preprocessor of the model being trained: its tokenizer (with any tokens a synergy head added), the
    pixel settings of the folder it was loaded from and the tokens the stage's synergy heads read."""
    if model_dir is None:
        raise ValueError("the data layer needs the folder the model was loaded from (preprocessor_config.json)")
    if tokenizer is None:
        return Preprocessor.from_dir(model_dir, synergy_tokens=synergy_tokens)
    config = model.config
    family = dense_model_type(config)
    return Preprocessor(tokenizer, build_vision(Path(model_dir), family, config), family, config, synergy_tokens)


class Batches:
    """This process's micro-batches of one epoch (see the module docstring); `len()` counts them."""

    def __init__(self, request: Any):
        stage = request.stage
        if stage.data is None:
            raise ValueError(f"stage {stage.name}: data_source 'data' needs a data: section")
        self.request = request
        preprocessor = preprocessor_for(request.model, request.tokenizer, request.model_dir, request.synergy_tokens)
        self.dataset = build_dataset(stage.data, preprocessor)
        sampler = MixtureSampler(
            [len(p) for p in self.dataset.parts],
            [p.spec.weight for p in self.dataset.parts],
            stage.data.mixing,
            seed=stage.data.seed + request.seed,
            num_samples=stage.data.samples_per_epoch,
        )
        sampler.set_epoch(request.epoch)
        order = list(sampler)
        per_process = len(order) // request.world_size  # equal counts: a process with one more step would hang
        self.indices = order[request.rank :: request.world_size][:per_process]
        self.length = len(self.indices) // request.batch_size
        self.collate = Collator(preprocessor.pad_id)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        size = self.request.batch_size
        for local in range(self.request.start, self.length):
            items = [self.dataset[i] for i in self.indices[local * size : (local + 1) * size]]
            batch = self.collate(items)
            if not any(g is not None for g in batch.get("geometry") or []):
                batch.pop("geometry", None)
            batch.pop("datasets", None)
            teacher = batch.get("teacher")
            batch["teacher"] = teacher if teacher and any(t is not None for t in teacher) else None
            yield batch


def iter_batches(request: Any) -> Batches:
    """The batch source `data`: the stage's `data:` section through the data layer."""
    return Batches(request)
