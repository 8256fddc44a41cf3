"""Cached teacher features, read by sample id: the pluggable `TeacherFeatureReader` interface.

Anything with `teacher_features(sample_id) -> {teacher_name: Tensor [N, D]} | None` can serve features to the data
layer. `open_teacher_cache(dir)` reads what `moekit teach` writes:

    DIR/index.json + shard-*.safetensors          one teacher's cache (tensors `features/<id>`), or
    DIR/<any>/index.json + shard-*.safetensors    one sub-folder per teacher (e.g. DIR/vjepa2, DIR/vggt)

`index.json` holds `teacher` (its name) and `samples` (id -> {"shard": file, ...}); each folder is read by the
writer's own reader, `moekit.attach.teachers.FeatureCache` (which also rebuilds a stale index).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from moekit.attach.teachers.cache import FeatureCache


@runtime_checkable
class TeacherFeatureReader(Protocol):
    def teacher_features(self, sample_id: str) -> dict[str, torch.Tensor] | None: ...


class DictFeatures:
    """In-memory features `{sample_id: {teacher: tensor}}`, for tests and small experiments."""

    def __init__(self, features: Mapping[str, Mapping[str, torch.Tensor]]):
        self.features = {k: dict(v) for k, v in features.items()}

    def teacher_features(self, sample_id: str) -> dict[str, torch.Tensor] | None:
        return self.features.get(sample_id)


class CacheFeatures:
    """Features from one or more `moekit teach` caches, keyed by teacher name."""

    def __init__(self, caches: Mapping[str, Any]):
        self.caches = dict(caches)

    def teacher_features(self, sample_id: str) -> dict[str, torch.Tensor] | None:
        found = {}
        for name, cache in self.caches.items():
            tensor = cache.get(sample_id)
            if tensor is not None:
                found[name] = tensor
        return found or None


def open_teacher_cache(path: str | Path) -> CacheFeatures:
    """Open a cache folder (or a folder of per-teacher cache folders); a clear error when there is none."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"teacher cache {path} not found")
    folders = [path] if (path / "index.json").is_file() else sorted(p.parent for p in path.glob("*/index.json"))
    if not folders:
        raise ValueError(f"{path}: no index.json here or in a sub-folder; write a cache with `moekit teach`")
    caches = {}
    for folder in folders:
        name = json.loads((folder / "index.json").read_text()).get("teacher") or folder.name
        caches[name] = FeatureCache(folder)
    return CacheFeatures(caches)
