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

    def _revert(self, key: str) -> tuple[str, ...]:
        if self._probe is None:
            return (key,)
        try:  # conversions that split or index a tensor need its real shape (MoE experts stacked on dim 0..2)
            param = self.model.get_parameter(key)
            shape = tuple(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partition is an empty placeholder
        except (AttributeError, TypeError):
            shape = (0,)
        try:
            out = revert_weight_conversion(self._probe, {key: torch.empty(shape, device="meta")})
        except (IndexError, RuntimeError, ValueError):  # a conversion this key's shape does not fit: not its own
            return (key,)
        return tuple(out) or (key,)

    def saved(self, key: str) -> str:
        """The name `save_pretrained` writes for the module-path `key` (itself when saving splits it in parts)."""
        names = self._saved(key)
        return names[0] if len(names) == 1 else key

    def parts(self, key: str) -> tuple[str, ...]:
        """Every name saving writes for `key`: one, or several when a conversion splits it."""
        return self._saved(key)

    def candidates(self, key: str) -> list[str]:
        """Names to look for: the saved name (or the parts a split writes, e.g. q/k/v convolutions), then `key`."""
        return [n for n in self._saved(key) if n != key] + [key]

    def merged(self, keys: list[str]) -> list[str] | None:
        """When saving merges module-path `keys` into one tensor (Chunk on dim 0: HRM-text's `gate_up_proj`,
        Molmo2's `ff_proj`), `keys` in the order the saved tensor holds them; else None. Found by reverting one
        tiny tensor per key, each filled with its index."""
        if len(keys) < 2 or self._probe is None or len({self.saved(k) for k in keys}) != 1:
            return None
        state = {k: torch.full((1, 1), float(i)) for i, k in enumerate(keys)}
        try:
            (merged,) = revert_weight_conversion(self._probe, state).values()
        except (IndexError, RuntimeError, ValueError):
            return None
        order = [int(v) for v in merged.flatten().tolist()]
        return [keys[i] for i in order] if sorted(order) == list(range(len(keys))) else None

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
