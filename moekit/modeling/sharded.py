"""Load a checkpoint so that each process of a sharded run keeps only its part of the decoder layers.

`load_deferred` builds the model with its decoder layers' parameters on the meta device and everything else
(embeddings, vision tower, head, buffers) read whole in float32, so the steps that run before wrapping (heads
that add tokens, position encoders, new embedding rows) see a real model. After FSDP2 has sharded the layers,
`materialize` gives each meta parameter this process's rows, read straight from the safetensors files, so no
process ever holds the whole model. DeepSpeed ZeRO-3 partitions flat tensors instead of rows: its engine fills
one layer at a time with `materialize_module` and partitions it before reading the next.

Written here rather than through `set_model_state_dict(..., broadcast_from_rank0=True)`: that needs the whole
state dict on rank 0, the memory this module exists to avoid.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from moekit.io.names import KeyNames
from moekit.io.reader import CheckpointError, CheckpointReader


class ShardedLoadError(ValueError):
    """The checkpoint cannot be loaded shard by shard (the caller loads it whole instead)."""


class DeferredWeights:
    """Where every parameter of `model` (module paths) is stored in the checkpoint at `path`."""

    def __init__(self, path: str | Path, model: nn.Module):
        self.path = Path(path)
        self.model = model
        try:
            self.reader = CheckpointReader(self.path)
        except CheckpointError as exc:
            raise ShardedLoadError(str(exc)) from None
        names = KeyNames(model)
        self.keys: dict[str, str] = {}  # module path -> checkpoint key
        aliases: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        params = dict(model.named_parameters(remove_duplicate=False))
        for group in aliases.values():  # tied weights: any one of the names may be stored
            found = next(((n, k) for n in group if (k := names.find(n, self.reader)) is not None), None)
            if found is None:
                raise ShardedLoadError(f"{self.path}: no tensor for parameter {group[0]!r}")
            shape = tuple(params[group[0]].shape)
            if self.reader.shape(found[1]) != shape:
                raise ShardedLoadError(
                    f"{self.path}: {found[1]!r} has shape {self.reader.shape(found[1])}, the model's {group[0]!r} "
                    f"{shape} (a conversion that splits or fuses tensors)"
                )
            for name in group:
                self.keys[name] = found[1]
        self.buffers = {n: k for n, _ in model.named_buffers() if (k := names.find(n, self.reader)) is not None}
        self._offsets: dict[Path, dict[str, tuple[int, int]]] = {}

    def stored_dtype(self, name: str) -> str | None:
        """The dtype parameter `name` is stored in (`bfloat16`, `float32`, ...), or None if it is not stored."""
        key = self.keys.get(name)
        return None if key is None else self.reader.dtype(key)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Parameter `name` in float32, whole or only rows [start, stop) of its first dimension.

        Read with plain file reads, not safetensors' memory map: mapped pages count in a process's RSS, and
        the page cache the other processes filled would be mapped in with them."""
        key = self.keys.get(name) or self.buffers[name]
        file = self.reader.key_file[key]
        if file not in self._offsets:
            self._offsets[file] = _data_offsets(file)
        begin, _ = self._offsets[file][key]
        shape = self.reader.shape(key)
        start, stop = rows or (0, shape[0] if shape else 1)
        tensor = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=getattr(torch, self.reader.dtype(key)))
        row = math.prod(shape[1:]) * tensor.element_size()
        with open(file, "rb") as fh:
            fh.seek(begin + start * row)
            if fh.readinto(tensor.view(-1).view(torch.uint8).numpy()) != tensor.numel() * tensor.element_size():
                raise ShardedLoadError(f"{file}: tensor {key!r} is cut short")
        return tensor.to(torch.float32)


def _data_offsets(file: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte range of every tensor in a safetensors file (8-byte header size, JSON header, data)."""
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    base = 8 + size
    return {
        k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"
    }


def load_deferred(path: str | Path) -> tuple[nn.Module, DeferredWeights]:
    """The model of checkpoint `path` in float32 with its decoder layers' parameters left on the meta device;
    the `DeferredWeights` that `materialize` fills them from."""
    from accelerate import init_empty_weights

    from moekit.arch import resolve_arch
    from moekit.modeling.meta_model import model_class, read_config

    config = read_config(path)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed for real
        model = model_class(config)._from_config(config, dtype=torch.float32)
    weights = DeferredWeights(path, model)
    deferred = {id(p) for p in model.get_submodule(resolve_arch(model).layers).parameters()}
    _assign(model, lambda name, param: None if id(param) in deferred else weights.read(name))
    for name, buffer in model.named_buffers():
        if name in weights.buffers:
            buffer.copy_(weights.read(name).to(buffer.dtype))
    return model.eval(), weights


def materialize(weights: DeferredWeights, device: torch.device) -> int:
    """Fill every parameter of `weights.model` still on the meta device: a DTensor shard gets this process's
    rows only, a plain tensor the whole tensor. Returns how many parameters were filled."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    def values(name: str, param: torch.Tensor) -> torch.Tensor | None:
        if not _is_meta(param):
            return None
        if not isinstance(param, DTensor):
            return weights.read(name).to(device, param.dtype)
        if tuple(param.placements) != (Shard(0),) or param.ndim == 0:
            raise ShardedLoadError(f"{name}: placements {param.placements}; only Shard(0) loads by rows")
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        local = weights.read(name, (offset[0], offset[0] + shape[0])).to(device, param.dtype)
        return DTensor.from_local(
            local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )

    return _assign(weights.model, values)


def materialize_module(weights: DeferredWeights, module: nn.Module, device: torch.device) -> int:
    """Fill the meta parameters of `module`, a submodule of `weights.model`, with whole tensors; returns how
    many were filled."""
    prefix = next(name for name, sub in weights.model.named_modules(remove_duplicate=False) if sub is module)
    prefix = f"{prefix}." if prefix else ""
    return _assign(
        module, lambda name, param: weights.read(prefix + name).to(device, param.dtype) if _is_meta(param) else None
    )


def _is_meta(param: torch.Tensor) -> bool:
    local = getattr(param, "_local_tensor", param)
    return local.is_meta


def _assign(model: nn.Module, values) -> int:
    """Replace parameters by new ones from `values(name, param)` (None: keep), keeping tied ones tied. Assigning
    is what FSDP2 expects after it wrapped meta parameters (it re-reads them on its first forward)."""
    done: dict[int, nn.Parameter | None] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                tensor = values(f"{prefix}.{name}" if prefix else name, param)
                done[id(param)] = None if tensor is None else nn.Parameter(tensor, requires_grad=param.requires_grad)
            if done[id(param)] is not None:
                module._parameters[name] = done[id(param)]
    return sum(p is not None for p in done.values())
