"""Where a stage's batches come from: a named batch source called with a `BatchRequest`.

A batch source is any function `source(request) -> Iterable[batch]` that yields this process's micro-batches
of one epoch, starting after `request.start` micro-batches (so a resumed run continues where it stopped).
Each batch is a dict of model inputs plus `labels` (-100 except answer tokens) and the extras the trainer pops:
`sample_ids`, `sample_modalities`, `teacher` (see `moekit.data.config`). If the returned object has `len()`,
it is the number of micro-batches in the whole epoch for this process (needed for `epochs:`).

Built-in sources: `data` (the moekit.data loader, reading the stage's `data:` section) and `tiny` (random
batches for the tiny models of `moekit.tiny`, to smoke-test recipes). Register more with
`register_batch_source(name, fn)`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from moekit.config import StrictModel, parse_config
from moekit.recipe.schema import Stage
from moekit.train.groups import base_model_type


@dataclass
class BatchRequest:
    """What a batch source needs to know to produce this process's micro-batches for one epoch."""

    stage: Stage
    model: nn.Module  # the transformers model being trained (family, special token ids)
    tokenizer: Any | None
    batch_size: int  # micro-batch per process
    rank: int
    world_size: int
    epoch: int
    start: int = 0  # micro-batches of this epoch already consumed by this process
    seed: int = 0
    model_dir: Path | None = None  # the folder the model was loaded from (tokenizer / preprocessor files)
    extra: dict[str, Any] = field(default_factory=dict)


BatchSource = Callable[[BatchRequest], Iterable[dict[str, Any]]]
_SOURCES: dict[str, BatchSource] = {}


def register_batch_source(name: str, source: BatchSource) -> None:
    """Make `source` usable as `data_source: <name>` in recipes."""
    _SOURCES[name] = source


def get_batch_source(name: str, where: str = "data_source") -> BatchSource:
    if name == "data":
        return data_layer_source
    if name not in _SOURCES:
        known = ", ".join(["data", *sorted(_SOURCES)])
        raise ValueError(f"{where}: no batch source named {name!r}; available: {known}")
    return _SOURCES[name]


def data_layer_source(request: BatchRequest) -> Iterable[dict[str, Any]]:
    """The stage's `data:` section through the data layer: `moekit.data.iter_batches(request)`."""
    from moekit.data import iter_batches

    return iter_batches(request)


# --- tiny random batches --------------------------------------------------------------------------------------


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

    def __init__(self, request: BatchRequest, params: TinyParams):
        self.request = request
        self.params = params
        self.family = base_model_type(request.model)
        per_process = len(range(request.rank, params.num_samples, request.world_size))
        self.length = per_process // request.batch_size

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> dict[str, Any]:
        from moekit.tiny import tiny_inputs

        p = self.params
        seed = zlib.crc32(f"{self.request.seed}:{self.request.epoch}:{index}".encode())
        kind = p.kinds[index % len(p.kinds)]
        batch = tiny_inputs(self.family, kind, seed=seed, text_len=p.text_len)
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, -p.answer_len :] = batch["input_ids"][:, -p.answer_len :]
        batch["labels"] = labels
        batch["sample_ids"] = [f"tiny-{index}"]
        batch["sample_modalities"] = [kind]
        batch["teacher"] = None
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        r, w, b = self.request.rank, self.request.world_size, self.request.batch_size
        for local in range(self.request.start, self.length):
            samples = [self.sample((local * b + slot) * w + r) for slot in range(b)]
            yield collate(samples)


def collate(samples: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Right-pad token-level tensors ([1, T]) and concatenate everything else along the first dimension."""
    length = max(s["input_ids"].shape[1] for s in samples)
    token_keys = [k for k, v in samples[0].items() if torch.is_tensor(v) and v.shape == samples[0]["input_ids"].shape]
    fill = {"input_ids": pad_id, "labels": -100}
    out: dict[str, Any] = {}
    for key in {k for s in samples for k in s}:
        values = [s[key] for s in samples if key in s and s[key] is not None]
        if key in token_keys:
            out[key] = torch.cat(
                [torch.nn.functional.pad(v, (0, length - v.shape[1]), value=fill.get(key, 0)) for v in values]
            )
        elif values and torch.is_tensor(values[0]):
            out[key] = torch.cat(values)
        elif key in ("sample_ids", "sample_modalities"):
            out[key] = [x for v in values for x in v]
        elif key == "teacher":
            out[key] = values or None
    return out


def tiny_source(request: BatchRequest) -> TinyBatches:
    params = parse_config(TinyParams, request.stage.data_params, source=f"stage {request.stage.name}: data_params")
    return TinyBatches(request, params)


register_batch_source("tiny", tiny_source)
