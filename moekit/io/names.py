"""Module paths vs the key names a checkpoint stores them under.

transformers v5 saves some families under legacy names (`model.layers.0...` for Qwen2.5-VL's
`model.language_model.layers.0...`). transformers' own reverse conversion tells which; moekit asks it rather
than keeping a second table.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import PrefixChange, revert_weight_conversion


class KeyNames:
    """Candidate checkpoint names of a module-path key, for one model class (meta-device models are fine)."""

    def __init__(self, model: nn.Module):
        self.model = model
        conversions = [
            c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)
        ]
        self._probe = _Probe(model, conversions) if conversions else None
        self._saved = cache(self._revert)

    def _revert(self, key: str) -> str:
        if self._probe is None:
            return key
        out = revert_weight_conversion(self._probe, {key: torch.empty(0, device="meta")})
        return next(iter(out)) if len(out) == 1 else key

    def saved(self, key: str) -> str:
        """The name `save_pretrained` writes for the module-path `key`."""
        return self._saved(key)

    def candidates(self, key: str) -> list[str]:
        saved = self.saved(key)
        return [saved] if saved == key else [saved, key]

    def find(self, key: str, available) -> str | None:
        """The name under which `available` (a set/reader) holds module-path `key`, or None."""
        return next((c for c in self.candidates(key) if c in available), None)


class _Probe:
    """Stands in for `model` in `revert_weight_conversion` with a precomputed conversion list (computing it
    walks every module, which would make per-key lookups slow); everything else is the model's."""

    def __init__(self, model: nn.Module, conversions: list):
        self._model = model
        self._weight_conversions = conversions

    def __getattr__(self, name: str):
        return getattr(self._model, name)
