"""Position encoders around a model: built from a recipe, fed each batch's camera geometry, saved beside a
checkpoint and attached again when it is loaded (training, evaluation and routing analysis all use this).

moekit knows encoders only through the `moekit_position_encoders` hookspec. One that can join a stage is an
`nn.Module` that `build(params, model=model)` returns already hooked into the model (its visual tokens, or its
attention as `neo_native_rope` is), with `remove()` and `feed_batch(geometry, video_samples)`: a context manager
for one forward, where `geometry[i]` is the data layer's geometry entry of sample i (see moekit/data/media.py;
None for a sample without one) and `video_samples` lists, in batch order, the samples whose video is in
`pixel_values_videos`.

A checkpoint keeps its encoders as `moekit.json["position_encoders"]` (name and parameters of each) and, for
encoders with weights, `position_encoders.safetensors` (keys `<name>.<parameter>`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moekit.config import ConfigError
from moekit.config.provenance import ENCODERS_FILE, read_provenance
from moekit.config.provenance import FILE as PROVENANCE_FILE

FILE = ENCODERS_FILE
META_KEY = "position_encoders"
META_FILE = PROVENANCE_FILE


def as_refs(refs: Sequence[Any]) -> list[dict[str, Any]]:
    """`[{name, params}]`, the form `moekit.json` keeps, from recipe refs (objects) or dicts."""
    out = []
    for ref in refs:
        if isinstance(ref, Mapping):
            out.append({"name": ref["name"], "params": dict(ref.get("params") or {})})
        else:
            out.append({"name": ref.name, "params": dict(ref.params)})
    return out


def build_encoders(refs: Sequence[dict[str, Any]], model: nn.Module, where: str) -> dict[str, nn.Module]:
    """Encoders named by `refs` (`as_refs` form), attached to `model` (a transformers model, not a peft or
    distributed wrapper); errors name `where[i]`."""
    from moekit.plugins.registry import registry

    encoders: dict[str, nn.Module] = {}
    for index, ref in enumerate(refs):
        name, params = ref["name"], ref["params"]
        loc = f"{where}[{index}]"
        if name in encoders:
            raise ValueError(f"{loc}: position encoder {name!r} is listed twice")
        try:
            encoder = registry().build("position_encoder", name, params, where=loc, model=model)
        except ConfigError:
            _remove(encoders)
            raise
        except ValueError as exc:  # e.g. a family the encoder cannot be wired into
            _remove(encoders)
            kind = type(exc) if type(exc).__init__ is ValueError.__init__ else ValueError
            raise kind(f"{loc}: {exc}") from exc
        if not isinstance(encoder, nn.Module) or not callable(getattr(encoder, "feed_batch", None)):
            _remove(encoders)
            raise TypeError(
                f"{loc}: position encoder {name!r} does not join a model (its component builds a "
                f"{type(encoder).__name__} without feed_batch), so it cannot join a stage; build it from Python"
            )
        encoders[name] = encoder.float()
    return encoders


def _remove(encoders: Mapping[str, nn.Module]) -> None:
    for encoder in encoders.values():
        encoder.remove()


def saved_refs(model_dir: str | Path) -> list[dict[str, Any]]:
    """The encoders a checkpoint was saved with (`[]` when none, or when moekit did not write it)."""
    record = read_provenance(model_dir)
    return [] if record is None else as_refs([r.model_dump() for r in record.position_encoders])


def load_encoders(
    model_dir: str | Path, model: nn.Module, refs: Sequence[Any] | None = None, where: str | None = None
) -> dict[str, nn.Module]:
    """Attach the encoders saved with `model_dir` (or those `refs` name) to `model`, with the weights saved there
    for every encoder whose name and parameters match a saved one."""
    model_dir = Path(model_dir)
    saved = saved_refs(model_dir)
    refs = saved if refs is None else as_refs(refs)
    encoders = build_encoders(refs, model, where or f"{model_dir / META_FILE}: {META_KEY}")
    same = [r["name"] for r in refs if r in saved and encoders[r["name"]].state_dict()]
    try:
        _load_weights(model_dir, {name: encoders[name] for name in same})
    except (OSError, KeyError):
        for encoder in encoders.values():  # leave the model as it was
            encoder.remove()
        raise
    return encoders


def _load_weights(model_dir: Path, encoders: Mapping[str, nn.Module]) -> None:
    if not encoders:
        return
    file = model_dir / FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{model_dir / META_FILE} lists position encoders with weights ({', '.join(encoders)}) but {file} is "
            "missing"
        )
    state = load_file(str(file))
    for name, encoder in encoders.items():
        own = {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}
        wanted = set(encoder.state_dict())
        if set(own) != wanted:
            missing, unexpected = sorted(wanted - set(own)), sorted(set(own) - wanted)
            raise KeyError(
                f"{file}: the weights of position encoder {name!r} do not fit it: missing {missing}, "
                f"unexpected {unexpected}"
            )
        encoder.load_state_dict(own)


def save_weights(target: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Write the encoders' `<name>.<parameter>` weights into `target` (a directory being written), if any."""
    if state:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(target / FILE))


def video_samples(model: nn.Module, input_ids: torch.Tensor | None) -> list[int]:
    """Rows of `input_ids` that hold video tokens (the samples whose video is in `pixel_values_videos`)."""
    config = model.config
    video_id = getattr(config, "video_token_id", None)
    if video_id is None:
        video_id = getattr(getattr(config, "text_config", None), "video_token_id", None)
    if video_id is None or input_ids is None:
        return []
    return [r for r in range(input_ids.shape[0]) if bool((input_ids[r] == video_id).any())]


@contextmanager
def feeding(
    encoders: Mapping[str, nn.Module],
    model: nn.Module,
    input_ids: torch.Tensor | None,
    geometry: Sequence[dict[str, torch.Tensor] | None] | None,
) -> Iterator[None]:
    """Hand one batch's geometry to every encoder for the forward run inside this block."""
    if not encoders:
        yield
        return
    rows = 0 if input_ids is None else input_ids.shape[0]
    geometry = list(geometry) if geometry is not None else [None] * rows
    if len(geometry) != rows:
        raise ValueError(f"the batch has {rows} samples but {len(geometry)} geometry entries")
    videos = video_samples(model, input_ids)
    stray = [r for r, g in enumerate(geometry) if g is not None and r not in videos]
    if stray:
        raise ValueError(
            f"samples {stray} carry 3D geometry but no video tokens; moekit feeds a student 3D scene as a video"
        )
    with ExitStack() as stack:
        for encoder in encoders.values():
            stack.enter_context(encoder.feed_batch(geometry, videos))
        yield
