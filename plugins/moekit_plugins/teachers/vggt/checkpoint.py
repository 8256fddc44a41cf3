"""Load VGGT's aggregator from the released checkpoint (or an aggregator-only export), strictly and by name.

Accepted: a `.safetensors` file, a PyTorch `.pt`/`.pth`/`.bin` state dict (read with `weights_only=True`,
memory-mapped), or a folder holding one of `model.safetensors`, `model.pt`. Keys are those of the full model
(`aggregator.*` plus the heads `camera_head.*`, `depth_head.*`, `point_head.*`, `track_head.*`, which are
ignored) or the aggregator's own keys without the prefix. Only the aggregator's tensors are read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit_plugins.teachers.common import checkpoint_file
from moekit_plugins.teachers.vggt.aggregator import Aggregator
from moekit_plugins.teachers.vggt.config import VGGTArch

PREFIX = "aggregator."
HEADS = ("camera_head.", "depth_head.", "point_head.", "track_head.")
FILES = ("model.safetensors", "model.pt", "model.pth", "pytorch_model.bin")
SHOWN = 12  # key names listed per problem before "... and N more"


def _names(keys: list[str]) -> str:
    head = ", ".join(keys[:SHOWN])
    return head + (f" ... and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def split_keys(keys: list[str], file: Path) -> tuple[dict[str, str], list[str]]:
    """{aggregator key: stored key} and the stored keys that belong to neither the aggregator nor a head."""
    if any(k.startswith(PREFIX) for k in keys):
        chosen = {k[len(PREFIX) :]: k for k in keys if k.startswith(PREFIX)}
        other = [k for k in keys if not k.startswith(PREFIX) and not k.startswith(HEADS)]
        return chosen, other
    rest = [k for k in keys if not k.startswith(HEADS)]
    if not rest:
        raise ValueError(f"{file}: no aggregator tensors (no 'aggregator.*' keys); is this a VGGT checkpoint?")
    return {k: k for k in rest}, []


def _torch_load(file: Path):
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types; all mean "not a plain state dict"
        raise ValueError(f"{file}: cannot be read as a PyTorch state dict with weights_only=True ({exc})") from None


def read_aggregator_state(path: Path) -> dict[str, torch.Tensor]:
    """The aggregator's tensors by their module names; keys outside the aggregator and the heads are errors."""
    file = checkpoint_file(path, FILES, "VGGT")
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(file, framework="pt") as handle:
                chosen, other = split_keys(list(handle.keys()), file)
                state = {name: handle.get_tensor(key) for name, key in chosen.items()} if not other else {}
        except SafetensorError as exc:
            raise ValueError(f"{file}: not a readable safetensors file ({exc})") from None
    else:
        data = _torch_load(file)
        if isinstance(data, dict) and not all(isinstance(v, torch.Tensor) for v in data.values()):
            # a training checkpoint: the weights sit under "model" or "state_dict"
            data = next((data[w] for w in ("model", "state_dict") if isinstance(data.get(w), dict)), data)
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise ValueError(f"{file}: not a state dict of tensors")
        chosen, other = split_keys(list(data), file)
        state = {name: data[key] for name, key in chosen.items()}
    if other:
        raise ValueError(f"{file}: unexpected keys outside the aggregator and the VGGT heads: {_names(sorted(other))}")
    return state


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, arch: VGGTArch) -> None:
    """Raise naming every missing, unexpected or wrongly shaped aggregator key."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} (checkpoint {list(state[k].shape)}, model {list(expected[k])})"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_names([PREFIX + k for k in missing])}")
    if unexpected:
        problems.append(f"unexpected keys: {_names([PREFIX + k for k in unexpected])}")
    if shapes:
        problems.append(f"shape mismatches: {_names([PREFIX + s for s in shapes])}")
    if problems:
        sizes = f"embed_dim={arch.embed_dim}, depth={arch.depth}, dino_depth={arch.dino_depth}, patch_embed={arch.patch_embed}"
        raise ValueError(f"{source}: the aggregator does not match arch ({sizes}); " + "; ".join(problems))


def load_aggregator(
    path: Path, arch: VGGTArch, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Aggregator:
    """Build the aggregator without allocating weights, check the checkpoint against it, then adopt its tensors."""
    state = read_aggregator_state(path)
    with torch.device("meta"):
        model = Aggregator(arch)
    check_state(model, state, str(path), arch)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def aggregator_state(model: Aggregator, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """The aggregator's tensors under the released checkpoint's names (for writing test checkpoints)."""
    return {prefix + k: v.detach().contiguous() for k, v in model.state_dict().items()}
