"""Teachers for coarse distillation: built from the plug-in registry, run on the batch's `teacher` extra.

The data layer gives one entry per sample (None when the sample has no pair): `{"video": {"frames"},
"scene": {"frames", "depth", "intrinsics", "poses"}, "student": {"frames"}, "features": {teacher_name: [N,
D]}}`. A slot reads the input its recipe entry names (`input:`, default the slot's name). For each configured
teacher slot, a sample's cached features (from `moekit teach`) are used when present, else the teacher runs
on its inputs without gradients. The features are padded into `[B, N, D]` with `<path>_mask` (which samples
carry that teacher) and `<path>_tokens_mask`, under the synergy head's path name: PolyV's video teacher
(V-JEPA 2) feeds the `temporal` path, its 3D teacher (VGGT) the `spatial` (geometric) path; Vid-LLM's CTA reads
slots named `spatial` and `semantic`, both with `input: student`.

A batch-level dict `{slot: inputs or features}` (custom batch sources) is also accepted and passed on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moekit.plugins.refs import TeacherRef


def build_teachers(refs: dict[str, TeacherRef], where: str, device: torch.device) -> dict[str, Any]:
    """One frozen teacher per slot, from the plug-in registry (kind `teacher`)."""
    from moekit.plugins.registry import registry

    teachers = {}
    for slot, ref in refs.items():
        teacher = registry().build("teacher", ref.name, ref.params, where=f"{where}.teachers.{slot}")
        if isinstance(teacher, nn.Module):
            teacher.to(device).eval().requires_grad_(False)
        reads = getattr(ref, "input", None)
        teachers[slot] = teacher if reads in (None, slot) else Reading(teacher, reads)
    return teachers


class Reading:
    """A teacher that reads the sample input `reads` rather than the one its slot is named after."""

    def __init__(self, teacher: Any, reads: str):
        self.teacher, self.reads = teacher, reads

    def __getattr__(self, name: str) -> Any:
        return getattr(self.teacher, name)


def is_features(value: Any) -> bool:
    return (
        hasattr(value, "features") and not callable(value.features) or isinstance(value, dict) and "features" in value
    )


SLOT_PATHS = {"video": "temporal", "scene": "spatial"}


def _sample_features(sample: dict | None, slot: str, teacher: Any) -> torch.Tensor | None:
    from moekit.attach.teachers.interface import TeacherBatch

    if not sample:
        return None
    cached = (sample.get("features") or {}).get(getattr(teacher, "name", slot))
    if cached is not None:
        return torch.as_tensor(cached)
    inputs = sample.get(teacher.reads if isinstance(teacher, Reading) else slot)
    if inputs is None:
        return None
    batch = TeacherBatch(**{k: v[None] for k, v in inputs.items() if k in ("frames", "depth", "intrinsics", "poses")})
    with torch.no_grad():
        return teacher.features(batch).features[0]


def per_sample_teacher(samples: list[dict | None], teachers: dict[str, Any]) -> dict[str, Any]:
    """Pad each slot's per-sample features into `[B, N, D]` plus sample and token masks, keyed by head path."""
    out: dict[str, Any] = {}
    for slot, teacher in teachers.items():
        path = SLOT_PATHS.get(slot, slot)
        rows = [_sample_features(sample, slot, teacher) for sample in samples]
        present = [r for r in rows if r is not None]
        if not present:
            out[path] = None
            continue
        length, dim = max(r.shape[0] for r in present), present[0].shape[-1]
        features = present[0].new_zeros(len(rows), length, dim)
        tokens = torch.zeros(len(rows), length, dtype=torch.bool)
        for index, row in enumerate(rows):
            if row is not None:
                features[index, : row.shape[0]] = row
                tokens[index, : row.shape[0]] = True
        out[path] = features
        out[f"{path}_mask"] = torch.tensor([r is not None for r in rows])
        out[f"{path}_tokens_mask"] = tokens
    return out


def resolve_teacher(extra: Any, teachers: dict[str, Any]) -> dict[str, Any] | None:
    """The `teacher=` argument of the synergy heads for one batch."""
    if not extra:
        return None
    if isinstance(extra, list):
        return per_sample_teacher(extra, teachers) if teachers else None
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
