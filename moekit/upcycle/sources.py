"""Expert weight sources held in memory, and the per-expert perturbations (noise, Drop-Upcycling re-init).

Every source answers `tensors(layer)` with the FFN of that layer in the fused convention of
`moekit.arch.ffn_tensors`: `up` ([2I, H] gated, [I, H] plain), `down` [H, I], optional biases.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from moekit.arch import ArchAdapter, ArchError, ffn_state_keys, ffn_tensors, resolve_arch
from moekit.arch.adapter import fuse_state


class ExpertSource(Protocol):
    description: str

    def tensors(self, layer: int) -> dict[str, torch.Tensor]: ...


class ModuleSource:
    """FFN weights of another in-memory model of the same family (e.g. a stage 1-2 specialist)."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, description: str):
        self.model = model
        self.adapter = adapter
        self.description = description

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        return ffn_tensors(self.adapter.ffn_module(self.model, layer), self.adapter.ffn)


class StateDictSource:
    """FFN weights looked up by module path in a state dict (a full one or only the FFN tensors)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], adapter: ArchAdapter, description: str):
        self.state_dict = state_dict
        self.adapter = adapter
        self.description = description

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        keys = ffn_state_keys(self.adapter.ffn, self.adapter.ffn_prefix(layer))
        parts = {}
        for name, names in keys.items():
            present = [k in self.state_dict for k in names]
            if all(present):
                parts[name] = [self.state_dict[k] for k in names]
            elif name in ("up", "down"):
                missing = names[present.index(False)]
                near = difflib.get_close_matches(missing, list(self.state_dict), n=3)
                raise KeyError(f"{self.description}: no tensor {missing!r} (closest keys: {near or 'none'})")
        return fuse_state(self.adapter.ffn, parts)


def as_source(obj: object, base_adapter: ArchAdapter, name: str) -> ExpertSource:
    """Wrap an in-memory model or state dict given for expert `name`."""
    if isinstance(obj, nn.Module):
        try:
            adapter = resolve_arch(obj) if hasattr(obj, "config") else base_adapter
        except ArchError:
            adapter = base_adapter
        if adapter.layers != base_adapter.layers or adapter.num_layers != base_adapter.num_layers:
            raise ValueError(
                f"expert {name!r}: its model has {adapter.num_layers} layers at {adapter.layers!r}, the base has "
                f"{base_adapter.num_layers} at {base_adapter.layers!r}; specialists must be copies of the same base"
            )
        return ModuleSource(obj, base_adapter, f"expert {name!r} (in-memory {type(obj).__name__})")
    if isinstance(obj, Mapping):
        return StateDictSource(obj, base_adapter, f"expert {name!r} (state dict)")
    raise TypeError(
        f"expert {name!r}: an in-memory source must be an nn.Module or a state dict, got {type(obj).__name__}"
    )


def check_shapes(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor], where: str) -> None:
    """Raise if `candidate` FFN tensors differ from the base's in names or shapes."""
    if set(reference) != set(candidate):
        raise ValueError(f"{where}: FFN tensors {sorted(candidate)} differ from the base's {sorted(reference)}")
    for key, ref in reference.items():
        if tuple(candidate[key].shape) != tuple(ref.shape):
            raise ValueError(
                f"{where}: {key} has shape {tuple(candidate[key].shape)}, the base FFN has {tuple(ref.shape)}"
            )


def perturb(
    tensors: dict[str, torch.Tensor],
    *,
    noise_scale: float,
    reinit_ratio: float,
    gated: bool,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Apply Drop-Upcycling re-initialisation, then Gaussian noise, to one expert's fused FFN tensors.

    Drop-Upcycling (Nakamura et al., 2025) picks `reinit_ratio` of the intermediate units at random and draws
    their rows of the up/gate matrices and columns of the down matrix afresh from a normal with the mean and
    std of the original matrix. Noise adds `noise_scale * std(W)` Gaussian noise to every weight matrix.
    """
    if noise_scale == 0 and reinit_ratio == 0:
        return tensors
    out = {k: v.clone() for k, v in tensors.items()}
    intermediate = out["down"].shape[1]
    if reinit_ratio > 0:
        count = int(round(reinit_ratio * intermediate))
        units = torch.randperm(intermediate, generator=generator)[:count]
        rows = torch.cat([units, units + intermediate]) if gated else units
        up, down = out["up"], out["down"]
        up[rows] = _like(up, (rows.numel(), up.shape[1]), generator)
        down[:, units] = _like(down, (down.shape[0], units.numel()), generator)
    if noise_scale > 0:
        for key in ("up", "down"):
            w = out[key]
            noise = torch.randn(w.shape, generator=generator, dtype=torch.float32) * (noise_scale * w.float().std())
            out[key] = (w.float() + noise).to(w.dtype)
    return out


def _like(weight: torch.Tensor, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    w = weight.float()
    return (torch.randn(shape, generator=generator) * w.std() + w.mean()).to(weight.dtype)
