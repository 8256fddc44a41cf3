"""The small sample list the feature cache reads: one JSON object per line with an `id` and its frames.

Each line holds `id` and exactly one of
    "video": a folder of frames, or a list of image files (in order)
    "image": one image file
    "scene": a folder of (multi-view) frames
Other keys (conversations, depth, poses...) are ignored here. A `.json` file holding a list of such objects
works too. Relative paths resolve against `root` (default: the data file's folder). Frames load with PIL.

This is deliberately self-contained: when moekit's dataset layer exists, `read_samples`/`load_frames` are the
two functions to replace.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
KINDS = ("video", "image", "scene")
Kind = Literal["video", "image", "scene"]


@dataclass(frozen=True)
class FrameSample:
    id: str
    kind: Kind
    paths: tuple[Path, ...]  # frame files, in order
    where: str  # "data.jsonl:12 (id 'abc')", for error messages


def uniform_indices(total: int, count: int | None) -> list[int]:
    """`count` indices spread evenly over `range(total)` (first and last included); all of them if fewer."""
    if total < 1:
        raise ValueError("no frames to sample from")
    if count is None or total <= count:
        return list(range(total))
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _frames_in(folder: Path, where: str) -> tuple[Path, ...]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{where}: {folder} is not a folder of frames")
    frames = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key)
    if not frames:
        raise ValueError(f"{where}: {folder} holds no image files ({', '.join(FRAME_SUFFIXES)})")
    return tuple(frames)


def _file(value: Any, root: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected a file path, got {value!r}")
    path = root / value
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file {path}")
    return path


def _sample(item: Any, root: Path, where: str) -> FrameSample:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if "id" not in item or not isinstance(item["id"], (str, int)) or item["id"] == "":
        raise ValueError(f"{where}: missing or empty 'id' (a string or integer)")
    sample_id = str(item["id"])
    where = f"{where} (id {sample_id!r})"
    kinds = [k for k in KINDS if k in item]
    if len(kinds) != 1:
        found = ", ".join(kinds) or "none"
        raise ValueError(f"{where}: expected exactly one of {', '.join(KINDS)}; found {found}")
    kind = kinds[0]
    value = item[kind]
    if kind == "image":
        paths: tuple[Path, ...] = (_file(value, root, where),)
    elif kind == "video" and isinstance(value, list):
        if not value:
            raise ValueError(f"{where}: 'video' is an empty list")
        paths = tuple(_file(v, root, where) for v in value)
    elif isinstance(value, str) and value:
        paths = _frames_in(root / value, where)
    else:
        raise ValueError(f"{where}: {kind!r} must be a folder path{' or a list of files' * (kind == 'video')}")
    return FrameSample(sample_id, kind, paths, where)


def _items(path: Path) -> list[tuple[str, Any]]:
    """(location, parsed object) per record; bad JSON names its line."""
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        return [(f"{path}[{i}]", item) for i, item in enumerate(data)]
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    return items


def read_samples(path: str | Path, root: str | Path | None = None) -> list[FrameSample]:
    """Every sample of a JSONL (or JSON list) file, checked: ids unique, frame files present."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    base = Path(root) if root is not None else path.parent
    samples: list[FrameSample] = []
    seen: dict[str, str] = {}
    for where, item in _items(path):
        sample = _sample(item, base, where)
        if sample.id in seen:
            raise ValueError(f"{sample.where}: duplicate id {sample.id!r} (first at {seen[sample.id]})")
        seen[sample.id] = where
        samples.append(sample)
    return samples


def _read_image(path: Path, where: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{where}: cannot read image {path}: {exc}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_frames(sample: FrameSample, max_frames: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """The sample's frames as `[T, 3, H, W]` floats in [0, 1] (uniformly sampled down to `max_frames`) and the
    indices of the files used. Frames of another size than the first are resized to it."""
    indices = uniform_indices(len(sample.paths), max_frames)
    frames = [_read_image(sample.paths[i], sample.where) for i in indices]
    size = frames[0].shape[-2:]
    frames = [
        f if f.shape[-2:] == size else F.interpolate(f[None], size=tuple(size), mode="bilinear", antialias=True)[0]
        for f in frames
    ]
    return torch.stack(frames), indices
