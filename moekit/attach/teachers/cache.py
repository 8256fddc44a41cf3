"""Teacher feature cache: features precomputed once, read by sample id during training.

Layout of a cache directory:
    shard-00000.safetensors   tensors `features/<id>` ([N, D] each); the header's metadata holds the teacher,
    shard-00001.safetensors   its params and every sample's metadata, so each shard describes itself
    index.json                id -> shard and metadata for all shards; rebuilt from the shard headers if stale

Shards are written under a temporary name and renamed when complete, then the index is rewritten atomically,
so an interrupted run leaves only complete shards; a rerun skips every id they hold.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moekit.attach.teachers.interface import Teacher, TeacherBatch
from moekit.attach.teachers.samples import FrameSample, load_frames
from moekit.io.atomic import atomic_write_text

FORMAT = "moekit-teacher-cache"
VERSION = 1
INDEX = "index.json"
PREFIX = "features/"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORED_PARAMS = ("device",)  # where a teacher ran does not make its features different


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("shard-*.safetensors"))


def _header(shard: Path) -> dict[str, Any]:
    with safe_open(shard, framework="pt") as handle:
        meta = handle.metadata() or {}
    if "moekit" not in meta:
        raise ValueError(f"{shard} is not a moekit teacher-cache shard (no 'moekit' metadata)")
    return json.loads(meta["moekit"])


def _scan(path: Path) -> dict[str, Any]:
    """The index, rebuilt from the shard headers (the source of truth)."""
    index: dict[str, Any] = {"format": FORMAT, "version": VERSION, "teacher": None, "params": None, "dtype": None}
    samples: dict[str, Any] = {}
    shards = []
    for shard in _shards(path):
        header = _header(shard)
        if index["teacher"] is None:
            index.update(teacher=header["teacher"], params=header["params"], dtype=header["dtype"])
        shards.append(shard.name)
        for sample_id, meta in header["samples"].items():
            samples[sample_id] = {"shard": shard.name, **meta}
    index["shards"] = shards
    index["samples"] = samples
    return index


def _load_index(path: Path) -> dict[str, Any]:
    file = path / INDEX
    if file.is_file():
        index = json.loads(file.read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{file}: not a moekit teacher-feature index (format {index.get('format')!r})")
        if index.get("version") != VERSION:
            raise ValueError(f"{file}: cache format version {index.get('version')} is not supported (want {VERSION})")
        if index.get("shards") == [s.name for s in _shards(path)]:
            return index
    return _scan(path)


class FeatureCache:
    """Read a teacher feature cache: `FeatureCache(dir).get(sample_id) -> Tensor [N, D] | None`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir() or not ((self.path / INDEX).is_file() or _shards(self.path)):
            raise FileNotFoundError(f"{self.path}: not a teacher feature cache (no {INDEX} or shards)")
        index = _load_index(self.path)
        self.teacher: str | None = index["teacher"]
        self.params: dict[str, Any] | None = index["params"]
        self.dtype: str | None = index["dtype"]
        self._samples: dict[str, dict[str, Any]] = index["samples"]
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def __contains__(self, sample_id: object) -> bool:
        return str(sample_id) in self._samples

    def ids(self) -> list[str]:
        return list(self._samples)

    def meta(self, sample_id: str) -> dict[str, Any] | None:
        """The sample's metadata (grid, frames used, pooling, dim...), or None if it is not cached."""
        return self._samples.get(str(sample_id))

    def get(
        self, sample_id: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor | None:
        """The sample's features `[N, D]`, or None if it is not cached."""
        meta = self._samples.get(str(sample_id))
        if meta is None:
            return None
        shard = meta["shard"]
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.path / shard, framework="pt")
        tensor = self._handles[shard].get_tensor(PREFIX + str(sample_id))
        return tensor.to(device=device, dtype=dtype) if device is not None or dtype is not None else tensor


@dataclass
class CacheReport:
    computed: int
    skipped: int
    shards_written: int
    path: Path


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in keys if k not in IGNORED_PARAMS and old.get(k) != new.get(k)
    ]


def check_compatible(out: str | Path, teacher: str, params: dict[str, Any], dtype: str) -> None:
    """Refuse, before any teacher runs, to add features to a cache that was made with another teacher, other
    params (anything but `device`) or another dtype. A missing or empty directory is fine."""
    path = Path(out)
    if not path.is_dir():
        return
    index = _scan(path)
    if index["teacher"] is None:
        return
    problems = []
    if index["teacher"] != teacher:
        problems.append(f"teacher ({index['teacher']!r} -> {teacher!r})")
    problems += _differences(index["params"] or {}, params)
    if index["dtype"] != dtype:
        problems.append(f"dtype ({index['dtype']!r} -> {dtype!r})")
    if problems:
        raise ValueError(
            f"{path} already holds features made differently: {', '.join(problems)}; "
            "write to another directory or pass --overwrite"
        )


def _write_shard(path: Path, name: str, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    tmp = path / f".{name}.tmp-{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata={"moekit": json.dumps(header)})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _clear(path: Path) -> None:
    for shard in _shards(path):
        shard.unlink()
    (path / INDEX).unlink(missing_ok=True)


def build_cache(
    teacher: Teacher,
    samples: Iterable[FrameSample],
    out: str | Path,
    *,
    teacher_name: str,
    params: dict[str, Any],
    dtype: str = "bfloat16",
    shard_mb: float = 1024.0,
    overwrite: bool = False,
    on_sample: Callable[[str, bool], None] | None = None,
) -> CacheReport:
    """Run `teacher` over `samples` and store its features under `out`, skipping ids already there.

    `params` are the teacher's validated params as JSON data (stored, and compared on resume); `on_sample(id,
    computed)` is called once per sample (for progress bars). A shard is flushed once it holds `shard_mb` MB.
    """
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob(".shard-*.tmp-*"):  # left by a run that was killed mid-write
        stale.unlink()
    if overwrite:
        _clear(path)
    check_compatible(path, teacher_name, params, dtype)
    index = _scan(path)
    done = set(index["samples"])
    number = max((int(name[6:11]) for name in index["shards"]), default=-1) + 1
    base = {"teacher": teacher_name, "params": params, "dtype": dtype}
    tensors: dict[str, torch.Tensor] = {}
    metas: dict[str, dict[str, Any]] = {}
    computed = skipped = written = 0
    size = 0

    def flush() -> None:
        nonlocal number, size, written
        if not tensors:
            return
        _write_shard(path, _shard_name(number), tensors, {**base, "samples": metas})
        number, size, written = number + 1, 0, written + 1
        tensors.clear()
        metas.clear()
        atomic_write_text(path / INDEX, json.dumps(_scan(path), indent=1) + "\n")

    for sample in samples:
        if sample.id in done:
            skipped += 1
            if on_sample:
                on_sample(sample.id, False)
            continue
        frames, files = load_frames(sample, getattr(teacher, "num_frames", None))
        with torch.inference_mode():
            output = teacher.features(TeacherBatch(frames=frames.unsqueeze(0)))
        tensors[PREFIX + sample.id] = output.features[0].to("cpu", DTYPES[dtype]).contiguous().clone()
        metas[sample.id] = {
            **output.meta(),
            "kind": sample.kind,
            "files": [str(sample.paths[files[i]]) for i in output.frames_used],
        }
        done.add(sample.id)
        computed += 1
        size += tensors[PREFIX + sample.id].nbytes
        if size >= shard_mb * 2**20:
            flush()
        if on_sample:
            on_sample(sample.id, True)
    flush()
    atomic_write_text(path / INDEX, json.dumps(_scan(path), indent=1) + "\n")  # also heals a stale index
    return CacheReport(computed, skipped, written, path)
