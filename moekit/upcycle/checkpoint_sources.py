"""Expert sources on disk: full checkpoints, FFN-only checkpoints (stage 1-2 output) and peft LoRA adapters.

All answer `tensors(layer)` in the fused convention of `moekit.arch.ffn_tensors`, reading lazily.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from moekit.arch import ArchAdapter, ffn_state_keys
from moekit.arch.adapter import fuse_state, fused_shapes
from moekit.io.names import KeyNames
from moekit.io.reader import CheckpointError, CheckpointReader


def kept_buffer(store: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The buffer `store` keeps under `name`, (re)made when `shape` or `dtype` differ. A streaming conversion builds
    tensors of the same shapes layer after layer: a fresh one each time is mapped and zeroed anew by the C library
    (a page fault per 4 KB), a kept one is not. Its previous contents must no longer be in use."""
    buffer = store.get(name)
    if buffer is None or tuple(buffer.shape) != tuple(shape) or buffer.dtype != dtype:
        store.pop(name, None)  # freed before the new one is taken
        buffer = store[name] = torch.empty(shape, dtype=dtype)
    return buffer


class CheckpointSource:
    """FFN tensors of every layer, read from a checkpoint directory (full or FFN-only)."""

    def __init__(self, reader: CheckpointReader, names: KeyNames, adapter: ArchAdapter, description: str):
        self.reader = reader
        self.names = names
        self.adapter = adapter
        self.description = description

    def key(self, module_key: str, required: bool = True) -> str | None:
        found = self.names.find(module_key, self.reader)
        if found is None and required:
            tried = " or ".join(repr(c) for c in self.names.candidates(module_key))
            raise CheckpointError(f"{self.description}: no tensor {tried} in {self.reader.path}")
        return found

    def ffn_keys(self, layer: int, required: bool = True) -> dict[str, list[str]]:
        """Checkpoint keys of layer `layer`'s FFN, per fused tensor (biases only when present). Gate and up saved
        as one merged tensor are one key (`swapped` says whether it holds up before gate)."""
        out = {}
        for name, module_keys in ffn_state_keys(self.adapter.ffn, self.adapter.ffn_prefix(layer)).items():
            keys = [self.key(k, required=required and name in ("up", "down")) for k in module_keys]
            if all(k is not None for k in keys):
                out[name] = keys[:1] if len(set(keys)) == 1 else keys
        return out

    def swapped(self, layer: int, name: str = "up") -> bool:
        """True when the checkpoint merges the FFN's gate and up into one tensor with up first (Molmo2)."""
        module_keys = ffn_state_keys(self.adapter.ffn, self.adapter.ffn_prefix(layer))[name]
        order = self.names.merged(module_keys)
        return order is not None and order != module_keys

    def layout(self, layer: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shapes and dtypes of the fused tensors, from headers only."""
        keys = self.ffn_keys(layer)
        shapes = fused_shapes(self.adapter.ffn, {name: [self.reader.shape(k) for k in ks] for name, ks in keys.items()})
        return {name: (shapes[name], self.reader.dtype(ks[0])) for name, ks in keys.items()}

    def tensors(self, layer: int, scratch: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Layer `layer`'s FFN in the fused convention. With `scratch`, a dict the caller keeps from layer to layer,
        a joined gate|up is written into the buffer it holds (`kept_buffer`): the previous result is overwritten.
        (About half of the 3-4 M page faults of a 16.85 GB conversion were these joins, each a fresh tensor.)"""
        parts = {name: [self.reader.get(k) for k in keys] for name, keys in self.ffn_keys(layer).items()}
        for name in ("up", "up_bias"):
            if name in parts and len(parts[name]) == 1 and self.swapped(layer, name):
                parts[name] = [torch.cat(parts[name][0].chunk(2, 0)[::-1], 0)]  # gate rows first, as moekit fuses
        up_out = None
        if scratch is not None and len(parts["up"]) > 1:
            shape = fused_shapes(self.adapter.ffn, {"up": [tuple(t.shape) for t in parts["up"]]})["up"]
            up_out = kept_buffer(scratch, "up", shape, parts["up"][0].dtype)
        return fuse_state(self.adapter.ffn, parts, up_out)


class LoraSource:
    """Base FFN plus a peft LoRA delta `scale * (alpha / r) * B @ A` merged on the fly, per projection."""

    def __init__(
        self, base, adapter_dir: Path, adapter: ArchAdapter, description: str, scale: float, allow_pickle: bool
    ):
        self.base = base
        self.adapter = adapter
        self.description = description
        config_file = adapter_dir / "adapter_config.json"
        try:
            self.config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from None
        if self.config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(
                f"{config_file}: peft_type {self.config.get('peft_type')!r}; only LORA adapters can be merged into experts"
            )
        if self.config.get("use_dora"):
            raise CheckpointError(
                f"{config_file}: DoRA adapters are not supported (their magnitude vector needs the full weight norm); merge it with peft first"
            )
        self.reader = CheckpointReader(adapter_dir, allow_pickle=allow_pickle, prefix="adapter_model")
        self.scale = scale
        self.lora_keys = {self._module(k): k for k in self.reader.keys() if ".lora_A." in k}
        if not self.lora_keys:
            raise CheckpointError(f"{adapter_dir}: no lora_A tensors in this adapter")

    @staticmethod
    def _module(key: str) -> str:
        name = key.split(".lora_A.")[0]
        return name.removeprefix("base_model.model.")

    def _factor(self, module: str) -> float:
        rank, alpha = self.config.get("r", 8), self.config.get("lora_alpha", 8)
        for pattern, value in (self.config.get("rank_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                rank = value
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
        return self.scale * (alpha / rank**0.5 if self.config.get("use_rslora") else alpha / rank)

    def delta(self, module: str, out_features: int, in_features: int) -> torch.Tensor | None:
        key_a = self.lora_keys.get(module)
        if key_a is None:
            return None
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        if key_b not in self.reader:
            raise CheckpointError(f"{self.description}: {key_a} has no matching {key_b}")
        a_shape, b_shape = self.reader.shape(key_a), self.reader.shape(key_b)
        if a_shape[1] != in_features or b_shape[0] != out_features:
            raise CheckpointError(
                f"{self.description}: LoRA {module} maps {a_shape[1]} -> {b_shape[0]} features but the base layer is "
                f"{in_features} -> {out_features}; is this adapter for another base model?"
            )
        a, b = self.reader.get(key_a).float(), self.reader.get(key_b).float()
        return (b @ a) * self._factor(module)

    def layer_modules(self, layer: int) -> list[str]:
        ffn = self.adapter.ffn
        prefix = self.adapter.ffn_prefix(layer)
        return [f"{prefix}.{p}" for p in ffn.projections()]

    def check(self, layers: list[int], base_layout) -> None:
        """Raise unless the adapter touches the FFN of at least one chosen layer with matching shapes
        (from headers only). `base_layout(layer)` gives the base's fused shapes."""
        touched = [m for layer in layers for m in self.layer_modules(layer) if m in self.lora_keys]
        if not touched:
            targets = sorted(self.lora_keys)[:6]
            raise CheckpointError(
                f"{self.description}: the adapter changes no FFN of the MoE layers {layers} (it targets e.g. {targets}); "
                "is it for another base model or another layer layout?"
            )
        for layer in layers:
            layout = base_layout(layer)
            (up_rows, hidden), (_, inter) = layout["up"][0], layout["down"][0]
            per_proj = up_rows // 2 if self.adapter.ffn.kind == "gated" else up_rows
            for module in self.layer_modules(layer):
                if module.endswith("." + self.adapter.ffn.down):
                    self._check_shape(module, hidden, inter)
                else:
                    self._check_shape(module, per_proj, hidden)

    def _check_shape(self, module: str, out_features: int, in_features: int) -> None:
        key_a = self.lora_keys.get(module)
        if key_a is None:
            return
        a_shape, b_shape = self.reader.shape(key_a), self.reader.shape(key_a.replace(".lora_A.", ".lora_B."))
        if a_shape[1] != in_features or b_shape[0] != out_features:
            raise CheckpointError(
                f"{self.description}: LoRA {module} maps {a_shape[1]} -> {b_shape[0]} features but the base layer is "
                f"{in_features} -> {out_features}; is this adapter for another base model?"
            )

    def tensors(self, layer: int, scratch: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        out = dict(self.base.tensors(layer, scratch))
        ffn, prefix = self.adapter.ffn, self.adapter.ffn_prefix(layer)
        up, down = out["up"], out["down"]
        if ffn.kind == "gated":
            inter = up.shape[0] // 2
            parts = [(ffn.gate, slice(0, inter)), (ffn.up, slice(inter, 2 * inter))]
        else:
            parts = [(ffn.up, slice(0, up.shape[0]))]
        new_up = None
        for proj, rows in parts:
            delta = self.delta(f"{prefix}.{proj}", rows.stop - rows.start, up.shape[1])
            if delta is not None and ffn.kind == "fused" and not ffn.gate_first:
                delta = torch.cat(delta.chunk(2, 0)[::-1], 0)  # the fused rows were put gate-first
            if delta is not None:
                new_up = up.float().clone() if new_up is None else new_up
                new_up[rows] += delta
        if new_up is not None:
            out["up"] = new_up.to(up.dtype)
        delta = self.delta(f"{prefix}.{ffn.down}", down.shape[0], down.shape[1])
        if delta is not None:
            out["down"] = (down.float() + delta).to(down.dtype)
        return out


def checkpoint_source(
    path: str | Path,
    adapter: ArchAdapter,
    name: str,
    names: KeyNames,
    base=None,
    lora_scale: float = 1.0,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
):
    """The expert source at `path`: a LoRA adapter directory (merged onto `base`) or a checkpoint; its tensors are
    refused when they hold NaN/Inf unless `allow_nonfinite`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"expert {name!r}: source {str(path)!r} does not exist (use 'base' for a copy of the base FFN)"
        )
    if (path / "adapter_config.json").is_file():
        if base is None:
            raise CheckpointError(f"expert {name!r}: a LoRA adapter needs the base model's FFN")
        source = LoraSource(base, path, adapter, f"expert {name!r} (LoRA adapter {path})", lora_scale, allow_pickle)
        source.reader.allow_nonfinite = allow_nonfinite
        return source
    reader = CheckpointReader(path, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    return CheckpointSource(reader, names, adapter, f"expert {name!r} ({path})")
