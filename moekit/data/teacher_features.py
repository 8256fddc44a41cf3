"""Cached teacher features, read by sample id: the pluggable `TeacherFeatureReader` interface.

Anything with `teacher_features(sample_id) -> {teacher_name: Tensor [N, D]} | None` can serve features to the data
layer. `open_teacher_cache(dir)` reads what `moekit teach` writes:

    DIR/index.json + shard-*.safetensors          one teacher's cache (tensors `features/<id>`), or
    DIR/<any>/index.json + shard-*.safetensors    one sub-folder per teacher (e.g. DIR/vjepa2, DIR/vggt)

`index.json` holds `teacher` (its name) and `samples` (id -> {"shard": file, ...}). When `moekit.teachers` is
installed its `FeatureCache` reads the folder (it also rebuilds a stale index); otherwise a minimal reader of the
same layout does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

PREFIX = "features/"


@runtime_checkable
class TeacherFeatureReader(Protocol):
    def teacher_features(self, sample_id: str) -> dict[str, torch.Tensor] | None: ...


class DictFeatures:
    """In-memory features `{sample_id: {teacher: tensor}}`, for tests and small experiments."""

    def __init__(self, features: Mapping[str, Mapping[str, torch.Tensor]]):
        self.features = {k: dict(v) for k, v in features.items()}

    def teacher_features(self, sample_id: str) -> dict[str, torch.Tensor] | None:
        return self.features.get(sample_id)


class _LayoutCache:
    """Minimal reader of one cache folder (used when `moekit.teachers` is not installed)."""

    def __init__(self, path: Path):
        index = json.loads((path / "index.json").read_text())
        self.path = path
        self.samples: dict[str, Any] = index.get("samples") or {}

    def get(self, sample_id: str) -> torch.Tensor | None:
        entry = self.samples.get(sample_id)
        if entry is None:
            return None
        from safetensors import safe_open

        with safe_open(str(self.path / entry["shard"]), framework="pt") as handle:
            return handle.get_tensor(PREFIX + sample_id)


def _open_one(path: Path) -> Any:
    try:
        from moekit.teachers import FeatureCache  # the writer's own reader, when installed
    except ImportError:
        return _LayoutCache(path)
    return FeatureCache(path)


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
        caches[name] = _open_one(folder)
    return CacheFeatures(caches)
