"""Images and video frames from disk: PIL images, frame folders, mp4 (through the optional `av` extra).

Frame sampling follows `FramesSpec`: at most `max_frames` frames, picked uniformly or as key frames (the frames
with the largest change from their predecessor, plus the first frame), each scaled down to fit within
`max_width` x `max_height` (PolyV: 32 frames at 640x480).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from moekit.data.config import FramesSpec

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
THUMB = 32  # key-frame scoring compares frames at THUMB x THUMB grey levels


class MissingExtraError(ValueError):
    """An optional dependency is needed for this input; the message names the extra to install."""


def load_image(path: Path) -> Image.Image:
    """An RGB PIL image, fully decoded (so a truncated file fails here, not later)."""
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def fit_within(image: Image.Image, spec: FramesSpec) -> Image.Image:
    """Scale `image` down (never up) to fit within max_width x max_height, keeping its aspect ratio."""
    scale = min(1.0, spec.max_width / image.width, spec.max_height / image.height)
    if scale >= 1.0:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, resample=Image.Resampling.BICUBIC)


def uniform_indices(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over `range(total)`, first and last included; all of them if fewer."""
    if total < 1:
        raise ValueError("no frames to sample from")
    if total <= count:
        return list(range(total))
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def keyframe_indices(thumbs: np.ndarray, count: int) -> list[int]:
    """Key frames of a clip given grey thumbnails `[T, h, w]`: frame 0 plus the frames that differ most from
    the frame before them. Ties go to the frames nearest the uniform grid, so a static clip samples uniformly."""
    total = len(thumbs)
    if total <= count:
        return list(range(total))
    change = np.abs(np.diff(thumbs.astype(np.float32), axis=0)).mean(axis=(1, 2))
    grid = np.asarray(uniform_indices(total, count))
    candidates = np.arange(1, total)
    distance = np.abs(candidates[:, None] - grid[None]).min(axis=1)
    order = np.lexsort((candidates, distance, -np.round(change, 6)))
    return sorted([0, *candidates[order[: count - 1]].tolist()])


def _thumb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L").resize((THUMB, THUMB), resample=Image.Resampling.BILINEAR))


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def list_frames(folder: Path) -> list[Path]:
    """Image files of a frame folder in natural order (frame_2 before frame_10)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"frame folder {folder} not found")
    frames = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key)
    if not frames:
        raise ValueError(f"frame folder {folder} holds no image files ({', '.join(FRAME_SUFFIXES)})")
    return frames


def pick(total: int, spec: FramesSpec, thumbs: np.ndarray | None = None) -> list[int]:
    """Frame indices to use out of `total` under `spec` (`thumbs` needed for key-frame sampling)."""
    if spec.sampling == "keyframe" and total > spec.max_frames:
        if thumbs is None:
            raise ValueError("key-frame sampling needs thumbnails of every frame")
        return keyframe_indices(thumbs, spec.max_frames)
    return uniform_indices(total, spec.max_frames)


def folder_indices(files: list[Path], spec: FramesSpec) -> list[int]:
    """Which files of a frame folder to load (reads every frame as a thumbnail for key-frame sampling)."""
    thumbs = None
    if spec.sampling == "keyframe" and len(files) > spec.max_frames:
        thumbs = np.stack([_thumb(load_image(f)) for f in files])
    return pick(len(files), spec, thumbs)


def read_video(path: Path, spec: FramesSpec) -> list[Image.Image]:
    """Sampled frames of a frame folder or a video file, each fitted within the spec's size."""
    if path.is_dir():
        files = list_frames(path)
        return [fit_within(load_image(files[i]), spec) for i in folder_indices(files, spec)]
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return _read_video_file(path, spec)
    if not path.exists():
        raise FileNotFoundError(f"video {path} not found")
    raise ValueError(f"video {path}: expected a folder of frames or a file ending in {', '.join(VIDEO_SUFFIXES)}")


def require_av() -> Any:
    """The `av` module, or `MissingExtraError` naming the extra to install."""
    try:
        import av
    except ImportError:
        raise MissingExtraError(
            "reading video files needs PyAV: pip install 'moekit[video]' (or use folders of frames)"
        ) from None
    return av


def _read_video_file(path: Path, spec: FramesSpec) -> list[Image.Image]:
    if not path.is_file():
        raise FileNotFoundError(f"video {path} not found")
    return read_video_stream(lambda: str(path), str(path), spec)


def read_video_stream(source: Callable[[], Any], name: str, spec: FramesSpec) -> list[Image.Image]:
    """Sampled frames of a video that `source()` opens (a path, or a file object such as a member of a zip
    archive); `name` is for errors. Two decoding passes (count + thumbnails, then the chosen frames) keep
    memory bounded for long videos."""
    av = require_av()
    thumbs = []
    with av.open(source()) as container:
        for frame in container.decode(video=0):
            thumbs.append(frame.to_ndarray(format="gray", width=THUMB, height=THUMB))
    if not thumbs:
        raise ValueError(f"video {name} has no decodable frames")
    wanted = set(pick(len(thumbs), spec, np.stack(thumbs)))
    frames = []
    with av.open(source()) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames.append(fit_within(frame.to_image().convert("RGB"), spec))
    return frames
