"""Synergy heads around a model: built from the plug-in registry and prepared on the model they train with.

A head is an `nn.Module` with `prepare(model, tokenizer)` (it may add special tokens and resize embeddings) and
`forward(*, hidden_states, input_ids, teacher) -> {term: loss}`. A head that reads tokens placed in the prompt
lists them in `placeholder_tokens` (after `prepare`); the data layer puts those tokens after the student's image
in paired samples (`data.synergy_tokens` of them), so the core never names a head's tokens itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from moekit.plugins.refs import SynergyHeadRef


def build_heads(refs: Sequence[SynergyHeadRef], model: nn.Module, tokenizer: Any, where: str) -> dict[str, nn.Module]:
    """Every head `refs` names, built and prepared on `model` (errors name `where[i]`), in float32."""
    heads = {}
    for index, ref in enumerate(refs):
        loc = f"{where}[{index}]"
        head = ref.build(where=loc)
        if not isinstance(head, nn.Module):
            raise TypeError(f"{loc}: synergy head {ref.name!r} built a {type(head).__name__}, not a torch module")
        head.prepare(model, tokenizer)
        heads[ref.name] = head.float()
    return heads


def placeholder_tokens(heads: Mapping[str, nn.Module]) -> list[str]:
    """The prompt tokens the heads read, in head order (empty when none reads any)."""
    tokens: list[str] = []
    for head in heads.values():
        tokens += list(getattr(head, "placeholder_tokens", ()) or ())
    return tokens
