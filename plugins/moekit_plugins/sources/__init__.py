"""Built-in batch sources, registered through the `moekit` entry point `sources`.

    tiny   random batches for the tiny models of `moekit.demo.tiny` (text, image or video samples with answer
           labels on the last tokens), to smoke-test recipes and the trainer without any data

A recipe stage uses one with `data_source: tiny` and `data_params: {...}` (the `TinyParams` below).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field

from moekit import Component, hookimpl
from moekit.config import StrictModel
from moekit.config.record import dense_model_type
from moekit.data.collate import Collator
from moekit.demo.tiny import PAD_ID, tiny_inputs


class TinyParams(StrictModel):
    """Parameters of `data_source: tiny`."""

    kinds: list[Literal["text", "image", "video"]] = Field(default_factory=lambda: ["text"], min_length=1)
    num_samples: int = Field(64, ge=1, description="samples per epoch (all processes together)")
    text_len: int = Field(12, ge=4)
    answer_len: int = Field(4, ge=1, description="last text tokens of each sample that carry labels")


class TinyBatches:
    """Deterministic random samples of a tiny model family; sample `i` is the same whatever the process layout.

    Process `r` of `W` takes samples `r, r + W, r + 2W, ...` in micro-batches of `batch_size`, so one optimizer
    step over all processes sees the same samples as one process with `W` times the batch.
    """

    def __init__(self, params: TinyParams, request: Any):
        self.request = request
        self.params = params
        self.family = dense_model_type(request.model)
        per_process = len(range(request.rank, params.num_samples, request.world_size))
        self.length = per_process // request.batch_size
        self.collate = Collator(PAD_ID)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> dict[str, Any]:
        """Sample `index` in the data layer's per-sample form (1-D token tensors, singular extras)."""
        p = self.params
        seed = zlib.crc32(f"{self.request.seed}:{self.request.epoch}:{index}".encode())
        kind = p.kinds[index % len(p.kinds)]
        inputs = tiny_inputs(self.family, kind, seed=seed, text_len=p.text_len)
        ids = inputs["input_ids"]
        item = {k: v[0] if torch.is_tensor(v) and v.shape == ids.shape else v for k, v in inputs.items()}
        labels = torch.full_like(item["input_ids"], -100)
        labels[-p.answer_len :] = item["input_ids"][-p.answer_len :]
        item.update(labels=labels, sample_ids=f"tiny-{index}", sample_modalities=kind, teacher=None)
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        r, w, b = self.request.rank, self.request.world_size, self.request.batch_size
        for local in range(self.request.start, self.length):
            batch = self.collate([self.sample((local * b + slot) * w + r) for slot in range(b)])
            batch["teacher"] = None
            yield batch


@hookimpl
def moekit_batch_sources() -> list[Component]:
    return [
        Component(
            "tiny",
            "batch_source",
            TinyParams,
            TinyBatches,
            "random text / image / video batches for moekit's tiny models (smoke tests, no data needed)",
        )
    ]
