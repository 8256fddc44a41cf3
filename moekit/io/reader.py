"""Lazy, shard-by-shard reading of a checkpoint directory: only headers are read until a tensor is asked for.

safetensors tensors come back memory-mapped (no heap copy); a `.bin`/`.pt` pickle is read only when the caller
allows it, and then with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "adapter_model.safetensors.index.json")


class CheckpointError(ValueError):
    """A checkpoint could not be read; the message names the file."""


class CheckpointReader:
    """Index of a checkpoint directory (or a single weights file): key -> file, shape and dtype."""

    def __init__(self, path: str | Path, allow_pickle: bool = False, prefix: str = "model"):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        self.files = self._weight_files(prefix)
        self.key_file: dict[str, Path] = {}
        self.meta: dict[str, tuple[tuple[int, ...], str]] = {}
        self._handles: dict[Path, object] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        for file in self.files:
            self._scan(file)

    def _weight_files(self, prefix: str) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        if not os.access(self.path, os.R_OK | os.X_OK):
            raise CheckpointError(f"{self.path}: directory is not readable")
        for name in INDEX_NAMES:
            index = self.path / name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as exc:
                    raise CheckpointError(f"{index}: not a valid weight index ({exc})") from None
                files = sorted({self.path / f for f in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise CheckpointError(f"{index} lists shards that do not exist: {missing}")
                return files
        found = sorted(p for p in self.path.iterdir() if p.suffix == ".safetensors" and not p.name.startswith("."))
        if found:
            return found
        pickles = sorted(p for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            return pickles
        raise CheckpointError(f"{self.path}: no weights found (looked for *.safetensors, an index, *.bin/*.pt)")

    def _scan(self, file: Path) -> None:
        if file.suffix != ".safetensors":
            if not self.allow_pickle:
                raise CheckpointError(
                    f"{file}: a pickle checkpoint; moekit reads only safetensors by default. Convert it, or pass "
                    "--allow-pickle (it is then loaded with torch.load(weights_only=True))"
                )
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CheckpointError(f"{file}: cannot be read as a weights-only PyTorch file ({exc})") from None
            self._pickles[file] = state
            for key, tensor in state.items():
                self.key_file[key] = file
                self.meta[key] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
            return
        try:
            handle = safe_open(file, framework="pt")
            for key in handle.keys():
                sl = handle.get_slice(key)
                self.key_file[key] = file
                self.meta[key] = (tuple(sl.get_shape()), _dtype_name(sl.get_dtype()))
        except Exception as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
        self._handles[file] = handle

    def __contains__(self, key: str) -> bool:
        return key in self.key_file

    def keys(self) -> list[str]:
        return list(self.key_file)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.meta[key][0]

    def dtype(self, key: str) -> str:
        return self.meta[key][1]

    def nbytes(self, key: str) -> int:
        shape, dtype = self.meta[key]
        return _numel(shape) * _itemsize(dtype)

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key` (memory-mapped for safetensors); a read error names the file."""
        file = self.key_file[key]
        if file in self._pickles:
            return self._pickles[file][key]
        try:
            return self._handles[file].get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot read tensor {key!r} ({exc})") from None

    def fingerprint(self) -> str:
        """A cheap identity of the weights: sha256 over keys, shapes, dtypes and file sizes (not the data)."""
        digest = hashlib.sha256()
        for key in sorted(self.meta):
            digest.update(f"{key}:{self.meta[key]}".encode())
        for file in self.files:
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
        return digest.hexdigest()[:16]


_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def _dtype_name(st_dtype: str) -> str:
    return _ST_DTYPES.get(st_dtype, st_dtype.lower())


def _itemsize(dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
