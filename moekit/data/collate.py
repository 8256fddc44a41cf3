"""Collate encoded samples into a padded batch (right padding) in the layout `moekit/data/config.py` describes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch.nn.utils.rnn import pad_sequence

from moekit.data.chat import IGNORE

# Per-token keys and their padding values; every other tensor key is concatenated along dim 0.
TOKEN_KEYS = {"input_ids": None, "attention_mask": 0, "labels": IGNORE, "mm_token_type_ids": 0, "token_type_ids": 0}
# Per-sample extras (singular in an encoded sample, a list in the batch); the trainer pops these before forward.
EXTRA_KEYS = ("sample_ids", "sample_modalities", "teacher", "geometry", "datasets")
_SINGULAR = {"dataset": "datasets"}


class Collator:
    """`Collator(pad_id)(items) -> batch`; `pad_id` fills `input_ids` past each sample's end (`side="left"`:
    before its start, as batched generation needs)."""

    def __init__(self, pad_id: int, side: Literal["right", "left"] = "right"):
        self.pad_id = pad_id
        self.side = side

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        batch: dict[str, Any] = {}
        for key, pad in TOKEN_KEYS.items():
            if key not in items[0]:
                continue
            value = self.pad_id if pad is None else pad
            batch[key] = pad_sequence(
                [item[key] for item in items], batch_first=True, padding_value=value, padding_side=self.side
            )
        keys = {k for item in items for k in item} - set(TOKEN_KEYS)
        for key in sorted(keys):
            name = _SINGULAR.get(key, key)
            if name in EXTRA_KEYS:
                batch[name] = [item.get(key) for item in items]
            else:
                batch[key] = torch.cat([item[key] for item in items if key in item])
        return batch


def split_batch(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model inputs, extras): what goes into `model(**inputs)` and what the trainer uses besides."""
    inputs = {k: v for k, v in batch.items() if k not in EXTRA_KEYS}
    extras = {k: batch[k] for k in EXTRA_KEYS if k in batch}
    return inputs, extras
