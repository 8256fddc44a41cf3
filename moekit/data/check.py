"""`moekit data check FILE`: what would fail in a run, found before it starts.

Reports samples that break the schema, media that do not exist (the student's and the teacher's), the modality
counts, and, given a model folder, each sample's token budget: text tokens from the model's tokenizer and chat
template plus the visual tokens its preprocessing gives each medium. For Qwen-VL families the visual count comes
from sizes alone (image headers, a video's frame count and size from its container header, a scene's views and
poses), the arithmetic of `moekit.data.qwen_vision`, so no video is decoded; other families run their processor
on the decoded image. A sample over `max_length` whose media or every answer would be cut fails (as it would in
training); one whose text is only shortened is listed as truncated.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from moekit.data.chat import assemble
from moekit.data.config import FramesSpec
from moekit.data.frames import VIDEO_SUFFIXES, list_frames, load_image, require_av
from moekit.data.media import resolve
from moekit.data.preprocess import Preprocessor, _truncate
from moekit.data.qwen_vision import smart_resize, video_size
from moekit.data.scene import _views, read_matrix
from moekit.data.schema import IMAGE_TAG, VIDEO_TAG, BadSample, Sample, parse_sample, read_records
from moekit.data.vision import QwenVision

DEFAULT_MAX_LENGTH = 2048  # DataConfig's default


@dataclass
class CheckReport:
    file: Path
    samples: int = 0
    modalities: Counter = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)  # schema problems
    missing: list[str] = field(default_factory=list)  # media paths that do not exist
    unusable: list[str] = field(default_factory=list)  # media the model cannot take, or unreadable headers
    over_budget: list[str] = field(default_factory=list)  # over max_length and would fail
    truncated: list[str] = field(default_factory=list)  # over max_length, text cut (a warning)
    tokens: list[int] = field(default_factory=list)  # per counted sample
    max_length: int | None = None

    @property
    def failed(self) -> bool:
        return bool(self.bad or self.missing or self.unusable or self.over_budget)

    def lines(self, limit: int = 20) -> list[str]:
        out = [f"{self.file}: {self.samples} sample(s)"]
        if self.modalities:
            out.append("  " + ", ".join(f"{k}: {v}" for k, v in sorted(self.modalities.items())))
        if self.tokens:
            mean = sum(self.tokens) / len(self.tokens)
            out.append(f"  tokens per sample: max {max(self.tokens)}, mean {mean:.0f} (max_length {self.max_length})")
        sections = (
            ("bad sample(s)", self.bad),
            ("missing media", self.missing),
            ("unusable media", self.unusable),
            (f"over max_length={self.max_length} (would fail)", self.over_budget),
            (f"over max_length={self.max_length} (text truncated)", self.truncated),
        )
        for title, items in sections:
            if items:
                out.append(f"{len(items)} {title}:")
                out += [f"  {item}" for item in items[:limit]]
                if len(items) > limit:
                    out.append(f"  ... and {len(items) - limit} more")
        out.append("FAIL: a run on this file would stop (or skip the samples above)" if self.failed else "OK")
        return out


def fitted_size(width: int, height: int, spec: FramesSpec) -> tuple[int, int]:
    """(w, h) of a frame after `frames.fit_within` (scaled down, never up, to the spec's box)."""
    scale = min(1.0, spec.max_width / width, spec.max_height / height)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _header_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def clip_shape(kind: str, path: Path, spec: FramesSpec) -> tuple[int, tuple[int, int]]:
    """(frames used, (w, h) of the first frame) of a video or scene, read from headers only."""
    if kind == "scene":
        colors, pose_dir, _ = _views(path)
        total = sum(np.isfinite(read_matrix(pose_dir / f"{c.stem}.txt")).all() for c in colors)
        size = _header_size(colors[0])
    elif path.is_dir():
        files = list_frames(path)
        total, size = len(files), _header_size(files[0])
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        av = require_av()
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            total = int(stream.frames) or sum(1 for packet in container.demux(stream) if packet.size)
            size = (stream.width, stream.height)
    else:
        raise ValueError(f"video {path}: expected a folder of frames or a file ending in {', '.join(VIDEO_SUFFIXES)}")
    if total < 1:
        raise ValueError(f"{path}: no usable frames")
    return min(total, spec.max_frames), size


class TokenCounter:
    """Token ids of a sample as `Preprocessor.encode` builds them, with the visual tokens counted from sizes."""

    def __init__(self, preprocessor: Preprocessor, spec: FramesSpec):
        self.pre, self.spec = preprocessor, spec

    def image_ids(self, path: Path) -> list[int]:
        vision = self.pre.vision
        if not isinstance(vision, QwenVision):
            return vision.image(load_image(path)).ids
        px = vision.pixels
        width, height = _header_size(path)
        h, w = smart_resize(height, width, px.factor, px.min_pixels, px.max_pixels)
        return vision._wrap(vision.image_id, (h // px.patch_size) * (w // px.patch_size) // px.merge_size**2)

    def clip_ids(self, kind: str, path: Path) -> list[int]:
        vision = self.pre.vision
        if not vision.supports_video or not isinstance(vision, QwenVision):
            raise ValueError(f"the model ({self.pre.family}) takes no video input")
        px = vision.pixels
        frames, (width, height) = clip_shape(kind, path, self.spec)
        width, height = fitted_size(width, height, self.spec)
        h, w = video_size(height, width, px)
        grid_t = math.ceil(frames / px.temporal_patch_size)
        merged = grid_t * (h // px.patch_size) * (w // px.patch_size) // px.merge_size**2
        return vision._wrap(vision.video_id, merged, grid_t if vision.family == "qwen3_vl" else 1)

    def ids_and_labels(self, sample: Sample, root: Path) -> tuple[list[int], list[int]]:
        segments: dict[str, list[list[int]]] = {IMAGE_TAG: [], VIDEO_TAG: []}
        if (sample.image_paths or sample.clip) and self.pre.vision is None:
            raise ValueError(f"the model ({self.pre.family}) is text-only but the sample has media")
        for value in sample.image_paths:
            segments[IMAGE_TAG].append(self.image_ids(resolve(root, value)))
        if sample.clip is not None:
            kind, value = sample.clip
            segments[VIDEO_TAG].append(self.clip_ids(kind, resolve(root, value)))
        roles = [t.role for t in sample.conversations]
        return assemble(self.pre.formatter, self.pre.formatter.pieces(roles, sample.human_texts()), segments)


def media_paths(sample: Sample) -> list[str]:
    paths = [*sample.image_paths, *([sample.clip[1]] if sample.clip else [])]
    if sample.paired is not None:
        paths += [p for p in (sample.paired.video, sample.paired.scene) if p is not None]
    return paths


def check_file(
    path: str | Path,
    model: str | Path | None = None,
    *,
    max_length: int | None = None,
    media_root: str | Path | None = None,
    frames: FramesSpec | None = None,
) -> CheckReport:
    """Check a dataset file (JSON list or JSONL of samples); `model` adds the per-sample token budget."""
    path = Path(path)
    root = Path(media_root) if media_root is not None else path.parent
    spec = frames or FramesSpec()
    report = CheckReport(file=path, max_length=(max_length or DEFAULT_MAX_LENGTH) if model is not None else None)
    counter = TokenCounter(Preprocessor.from_dir(model), spec) if model is not None else None
    for record in read_records(path):
        report.samples += 1
        try:
            sample = parse_sample(record)
        except BadSample as exc:
            report.bad.append(str(exc))
            continue
        report.modalities[sample.modality] += 1
        missing = [resolve(root, p) for p in media_paths(sample) if not resolve(root, p).exists()]
        report.missing += [f"{record.where}: {p} not found" for p in missing]
        if counter is None or missing:
            continue
        try:
            ids, labels = counter.ids_and_labels(sample, root)
        except (OSError, ValueError) as exc:
            report.unusable.append(f"{record.where}: {exc}")
            continue
        report.tokens.append(len(ids))
        try:
            _truncate(ids, labels, report.max_length, counter.pre.vision)
        except ValueError as exc:
            report.over_budget.append(f"{record.where}: {exc}")
            continue
        if len(ids) > report.max_length:
            report.truncated.append(f"{record.where}: {len(ids)} tokens, text cut to {report.max_length}")
    return report
