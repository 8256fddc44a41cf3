"""Teachers for coarse distillation: built from the plug-in registry, run on the batch's `teacher` extra.

A batch's `teacher` entry (from the data layer) maps a slot (`video`, `scene`) to either teacher inputs or
features already read from a feature cache (`moekit teach`). A slot with a configured teacher and raw inputs is
run through `teacher.features(inputs)` without gradients; cached features (anything with a `features`
attribute or key) pass through unchanged. Synergy heads receive the resulting dict as `teacher=`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moekit.recipe.schema import ComponentRef


def build_teachers(refs: dict[str, ComponentRef], where: str, device: torch.device) -> dict[str, Any]:
    """One frozen teacher per slot, from the plug-in registry (kind `teacher`)."""
    from moekit.registry import registry

    teachers = {}
    for slot, ref in refs.items():
        teacher = registry().build("teacher", ref.name, ref.params, where=f"{where}.teachers.{slot}")
        if isinstance(teacher, nn.Module):
            teacher.to(device).eval().requires_grad_(False)
        teachers[slot] = teacher
    return teachers


def is_features(value: Any) -> bool:
    return (
        hasattr(value, "features") and not callable(value.features) or isinstance(value, dict) and "features" in value
    )


def resolve_teacher(extra: Any, teachers: dict[str, Any]) -> dict[str, Any] | None:
    """The `teacher=` argument of the synergy heads for one batch."""
    if not extra:
        return None
    if not isinstance(extra, dict):
        raise TypeError(
            f"a batch's 'teacher' entry must be a dict of slot -> inputs/features, got {type(extra).__name__}"
        )
    out = {}
    for slot, value in extra.items():
        if slot in teachers and value is not None and not is_features(value):
            with torch.no_grad():
                value = teachers[slot].features(value)
        out[slot] = value
    return out
