"""Lazy, shard-by-shard reading of a checkpoint directory: only headers are read until a tensor is asked for.

safetensors tensors come back memory-mapped (no heap copy); a `.bin`/`.pt` pickle is read only when the caller
allows it, and then with `torch.load(weights_only=True)`. Every floating tensor is checked for NaN/Inf when it is
first read (in chunks, so the check costs a pass over pages about to be copied anyway) unless `allow_nonfinite`.
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


class NonFiniteError(CheckpointError):
    """A tensor holds NaN or Inf; the message names the tensor and its file."""


FINITE_CHUNK = 1 << 24  # elements per pass: bounds the temporary mask of an exact count to 16 MB


def count_nonfinite(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of a floating tensor; (0, 0) for other dtypes. Scanned in chunks: `aminmax`
    (NaN and Inf show in its result; ~20 GB/s on one core) and an exact count only for chunks where they do.
    Meta tensors (models built from a config alone) hold no values: (0, 0)."""
    if not tensor.is_floating_point() or tensor.device.type == "meta":
        return 0, 0
    flat = tensor.reshape(-1)
    nan = inf = 0
    for start in range(0, flat.numel(), FINITE_CHUNK):
        chunk = flat[start : start + FINITE_CHUNK]
        if chunk.element_size() == 1:  # float8: no kernels for these reductions; exact in float16
            chunk = chunk.to(torch.float16)
        low, high = torch.aminmax(chunk)
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
            nan += int(torch.isnan(chunk).sum())
            inf += int(torch.isinf(chunk).sum())
    return nan, inf


def check_finite(tensor: torch.Tensor, what: str, flag: str = "--allow-nonfinite") -> None:
    """Raise NonFiniteError naming `what` (e.g. "FILE: tensor KEY") when `tensor` holds NaN or Inf."""
    nan, inf = count_nonfinite(tensor)
    if nan or inf:
        raise NonFiniteError(
            f"{what} holds {nan} NaN and {inf} Inf value(s) of {tensor.numel()}; stopped before they reach the "
            f"output. Repair or replace that checkpoint, or pass {flag} to write them as they are"
        )


class CheckpointReader:
    """Index of a checkpoint directory (or a single weights file): key -> file, shape and dtype."""

    def __init__(
        self, path: str | Path, allow_pickle: bool = False, prefix: str = "model", allow_nonfinite: bool = False
    ):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self.allow_nonfinite = allow_nonfinite
        self._finite: set[str] = set()  # keys already checked
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        self.index: Path | None = None
        self.weight_map: dict[str, str] = {}
        self.files = self._weight_files(prefix)
        self.key_file: dict[str, Path] = {}
        self.meta: dict[str, tuple[tuple[int, ...], str]] = {}
        self._handles: dict[Path, object] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        for file in self.files:
            self._scan(file)
        self._check_index()

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
                self.index, self.weight_map = index, weight_map
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

    def _check_index(self) -> None:
        """Every tensor the index names must be in the shard it names (a torn copy or a hand-edited index)."""
        wrong = [
            (key, shard, self.key_file.get(key))
            for key, shard in self.weight_map.items()
            if self.key_file.get(key) != self.path / shard
        ]
        if wrong:
            key, shard, actual = wrong[0]
            where = f"it is in {actual.name}" if actual is not None else "no shard holds it"
            raise CheckpointError(
                f"{self.index}: names {len(wrong)} tensor(s) missing from the shard it gives, e.g. {key!r} in "
                f"{shard} ({where}); the checkpoint is incomplete or its index is stale"
            )

    def unindexed(self) -> list[str]:
        """Tensors in the shards that the index does not list (loaders that follow the index never see them)."""
        return sorted(k for k in self.key_file if self.index is not None and k not in self.weight_map)

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
        """The tensor `key` (memory-mapped for safetensors); a read error or a NaN/Inf names the file."""
        file = self.key_file[key]
        if file in self._pickles:
            tensor = self._pickles[file][key]
        else:
            try:
                tensor = self._handles[file].get_tensor(key)
            except Exception as exc:
                raise CheckpointError(f"{file}: cannot read tensor {key!r} ({exc})") from None
        if not self.allow_nonfinite and key not in self._finite:
            check_finite(tensor, f"{file}: tensor {key!r}")
            self._finite.add(key)
        return tensor

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
