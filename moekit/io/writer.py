"""Sharded safetensors writing with bounded memory.

`safetensors.torch.save_file` serialises a whole shard into one in-memory buffer, so writing a 5 GB shard
costs 5 GB of heap. Here the shard layout is planned up front (names, shapes, dtypes, offsets), the header is
written first and every tensor is streamed to the file as it is produced: the heap holds one tensor at a time.
The files follow the safetensors format exactly and are read back with `safe_open` in the tests.
"""

from __future__ import annotations

import errno
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class PlannedTensor:
    """One output tensor: its key, shape and dtype are known before `produce()` computes it."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize if hasattr(self.dtype, "itemsize") else torch.empty(0, dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


@dataclass
class Shard:
    name: str
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int, prefix: str = "model") -> list[Shard]:
    """Group tensors, in order, into shards of at most `max_shard_bytes` (a bigger single tensor gets its own).

    Names follow the hub convention (`huggingface_hub.save_torch_state_dict`): one shard is `model.safetensors`,
    several are `model-00001-of-0000N.safetensors` with an index."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    count = len(groups)
    if count == 1:
        return [Shard(f"{prefix}.safetensors", groups[0])]
    return [Shard(hub_shard_name(i, count, prefix), group) for i, group in enumerate(groups)]


def hub_shard_name(index: int, count: int, prefix: str = "model") -> str:
    """The hub's name of shard `index` (from 0) of `count`: `model-00001-of-0000N.safetensors`."""
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.safetensors"


def _header(shard: Shard, metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for tensor in shard.tensors:
        if tensor.dtype not in _DTYPE_CODES:
            raise ValueError(f"{tensor.key}: dtype {tensor.dtype} cannot be written to safetensors")
        entries[tensor.key] = {
            "dtype": _DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


def write_shard(
    path: Path,
    shard: Shard,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[PlannedTensor], None] | None = None,
) -> None:
    """Write one planned shard, producing and streaming its tensors one at a time."""
    try:
        with open(path, "wb") as fh:
            fh.write(_header(shard, metadata or {"format": "pt"}))
            for planned in shard.tensors:
                tensor = planned.produce()
                if tuple(tensor.shape) != tuple(planned.shape) or tensor.dtype != planned.dtype:
                    raise RuntimeError(
                        f"{planned.key}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {planned.shape} {planned.dtype}"
                    )
                data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                fh.write(memoryview(data))
                if on_tensor is not None:
                    on_tensor(planned)
            fh.flush()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"disk full while writing {path.name} (needs {shard.nbytes / 1e9:.2f} GB); nothing was kept",
            ) from None
        raise


def write_index(directory: Path, shards: list[Shard], name: str = "model.safetensors.index.json") -> None:
    """The weight map of a sharded checkpoint (none for a single `model.safetensors`, as the hub writes)."""
    if len(shards) == 1:
        return
    weight_map = {t.key: s.name for s in shards for t in s.tensors}
    index = {"metadata": {"total_size": sum(s.nbytes for s in shards)}, "weight_map": weight_map}
    (directory / name).write_text(json.dumps(index, indent=2, sort_keys=True))


def iter_planned(shards: list[Shard]) -> Iterator[PlannedTensor]:
    for shard in shards:
        yield from shard.tensors
