"""Writing a sharded model's output without holding it whole: the decoder layers are gathered one tensor at a time.

`save_pretrained` needs the whole state on the writing process, and so does transformers' own FSDP save
(`gather_full_state_dict`): for the 11.3B PolyV MoE that is ~45 GB of fp32 on rank 0. Here the decoder-layer
tensors (nearly all of an MoE model) are gathered as the writer reaches them, every process taking part in the
same order; the rest (embeddings, vision tower, head, norms, synergy heads) is gathered whole and saved by
`save_pretrained` as before, so tied weights, ignored keys, renames and moekit's record follow transformers.

A layer tensor is streamed only when transformers saves it under exactly one name of its own (a rename at
most, found with `KeyNames` on its shape) and no other key shares its parameter; a tensor that a conversion
splits or fuses with others goes with the rest.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moekit.io.names import KeyNames
from moekit.io.writer import PlannedTensor, hub_shard_name, plan_shards, write_shard

# save_pretrained's default `max_shard_size` ("50GB": decimal units, as huggingface_hub parses it)
MAX_SHARD_BYTES = 50 * 10**9
INDEX = "model.safetensors.index.json"


@dataclass
class LayerStream:
    """Decoder-layer tensors written as they are gathered. `saved` maps each key of the wrapped module's state
    (the `model.` prefix of `TrainModule` included) to the name it is saved under; `gather(key)` is the
    collective every process calls in the same order, returning the full CPU tensor on the main process."""

    saved: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    gather: Callable[[str], torch.Tensor | None]

    def drain(self) -> None:
        """A non-writing process's part: the same gathers, in the writer's order, results dropped."""
        for key in self.saved:
            self.gather(key)

    def planned(self) -> list[PlannedTensor]:
        return [
            PlannedTensor(name, self.shapes[key], self.dtypes[key], lambda key=key: self.gather(key))
            for key, name in self.saved.items()
        ]

    def write(self, directory: Path, model: nn.Module) -> None:
        """Add the streamed tensors to the checkpoint `save_pretrained` wrote into `directory` (the rest):
        its weight files are renumbered, new shards follow, and one index names them all."""
        old = _weight_map(directory)
        files = sorted(set(old.values()))
        shards = plan_shards(self.planned(), MAX_SHARD_BYTES)
        count = len(files) + len(shards)
        renamed = {f: hub_shard_name(i, count) for i, f in enumerate(files)}
        for f in files:
            (directory / f).rename(directory / renamed[f])
        weight_map = {k: renamed[f] for k, f in old.items()}
        for i, shard in enumerate(shards, start=len(files)):
            shard.name = hub_shard_name(i, count)
            write_shard(directory / shard.name, shard, {"format": "pt"})
            weight_map.update(dict.fromkeys((t.key for t in shard.tensors), shard.name))
        size = sum(_data_bytes(directory / renamed[f]) for f in files) + sum(s.nbytes for s in shards)
        # As `save_pretrained` counts them; a ZeRO-3 partition's own numel is 0, its full one `ds_numel`.
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        index = {
            "metadata": {"total_parameters": parameters, "total_size": size},
            "weight_map": weight_map,
        }
        (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def layer_stream(
    module: nn.Module, layers: str, gather: Callable[[torch.Tensor], torch.Tensor | None]
) -> LayerStream | None:
    """The streamable decoder-layer tensors of `module` (a `TrainModule` without LoRA, maybe sharded or
    partitioned), or None when none are. `layers` is where the decoder layers are in the model (`resolve_arch`);
    `gather(tensor)` gives one of `module`'s tensors full on CPU in fp32 (floating) on the main process."""
    model = module.model
    layers = f"model.{layers}."
    names = KeyNames(model)
    ignored = set(model._keys_to_ignore_on_save or ())
    tensors = module.state_dict(keep_vars=True)  # shards or partitions, nothing gathered; tied keys: one object
    owners = Counter(id(t) for t in tensors.values())
    parts = {k: names.parts(k.removeprefix("model.")) for k in tensors if k.startswith(layers)}
    uses = Counter(n for p in parts.values() for n in p)
    saved = {
        k: p[0]
        for k, p in parts.items()
        if len(p) == 1 and uses[p[0]] == 1 and k.removeprefix("model.") not in ignored and owners[id(tensors[k])] == 1
    }
    if not saved:
        return None
    # The full shape (a ZeRO-3 partition's is `ds_shape`) and the saved dtype (fp32, as `gather` gives it).
    shapes = {k: tuple(getattr(tensors[k], "ds_shape", tensors[k].shape)) for k in saved}
    dtypes = {k: torch.float32 if tensors[k].is_floating_point() else tensors[k].dtype for k in saved}
    return LayerStream(saved, shapes, dtypes, lambda key: gather(tensors[key]))


def gathered_state(
    module: nn.Module, skip: Collection[str], gather: Callable[[torch.Tensor], torch.Tensor | None], is_main: bool
) -> dict[str, torch.Tensor] | None:
    """`module`'s state tensor by tensor (`gather`, every process), so that the `skip` keys are never gathered,
    and a tied parameter once, as the same tensor under each of its keys: `save_pretrained` then writes it once,
    as it does for an unsharded model (torch's `get_model_state_dict` returns separate copies, and the head of a
    tied model was saved twice). None outside the main process."""
    done: dict[int, torch.Tensor | None] = {}
    state = {}
    for key, value in module.state_dict(keep_vars=True).items():
        if key not in skip:
            if id(value) not in done:
                done[id(value)] = gather(value)
            state[key] = done[id(value)]
    return state if is_main else None


def _weight_map(directory: Path) -> dict[str, str]:
    """Saved name -> weight file of what `save_pretrained` wrote (one file, or several with an index)."""
    index = directory / INDEX
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = directory / "model.safetensors"
    return dict.fromkeys(_header(single), single.name)


def _header(path: Path) -> dict[str, dict]:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header


def _data_bytes(path: Path) -> int:
    return sum(end - start for start, end in (t["data_offsets"] for t in _header(path).values()))
