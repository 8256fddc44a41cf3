"""`moekit data check FILE`: what would fail in a run, found before it starts.

Reports samples that break the schema, media that do not exist (the student's and the teacher's), the modality
counts, and, given a model folder, each sample's token budget: text tokens from the model's tokenizer and chat
template plus the visual tokens its preprocessing gives each medium. For Qwen-VL families the visual count comes
from sizes alone (image headers, a video's frame count and size from its container header, a scene's views and
poses), the arithmetic of `moekit.data.qwen_vision`, so no video is decoded; other families run their processor
on the decoded image. A sample over `max_length` whose media or every answer would be cut fails (as it would in
training); one whose text is only shortened is listed as truncated.

`check_records` is the one implementation: `moekit data check` runs it on a whole file, `moekit validate --data`
(`moekit.pipeline.preflight`) on a seeded random sample of each stage's datasets.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from moekit.data.chat import assemble
from moekit.data.config import DataConfig, FramesSpec
from moekit.data.frames import VIDEO_SUFFIXES, list_frames, load_image, require_av
from moekit.data.media import resolve
from moekit.data.preprocess import Preprocessor, truncate_text
from moekit.data.qwen_vision import smart_resize, video_size
from moekit.data.scene import read_matrix, scene_layout
from moekit.data.schema import IMAGE_TAG, VIDEO_TAG, BadSample, Record, Sample, parse_sample, read_records
from moekit.data.vision import QwenVision

DEFAULT_MAX_LENGTH: int = DataConfig.model_fields["max_length"].default


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
    checked: int = 0  # well-formed samples whose media (and tokens) were checked
    rejected: int = 0  # of those, samples that would fail (missing or unusable media, over the budget)
    sampled: bool = False  # `checked` is a random sample of them, not all

    @property
    def failed(self) -> bool:
        return bool(self.bad or self.missing or self.unusable or self.over_budget)

    def lines(self, limit: int = 20) -> list[str]:
        out = [f"{self.file}: {self.samples} sample(s)"]
        if self.modalities:
            out.append("  " + ", ".join(f"{k}: {v}" for k, v in sorted(self.modalities.items())))
        if self.sampled:
            good = sum(self.modalities.values())
            out.append(f"  schema checked on all; media and tokens on {self.checked} of {good} (random sample)")
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
        colors, pose_dir, _ = scene_layout(path)
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


def image_ids(vision: QwenVision, path: Path) -> list[int]:
    """The token ids of an image for a Qwen-VL model, counted from its header."""
    px = vision.pixels
    width, height = _header_size(path)
    h, w = smart_resize(height, width, px.factor, px.min_pixels, px.max_pixels)
    return vision.wrap_tokens(vision.image_id, (h // px.patch_size) * (w // px.patch_size) // px.merge_size**2)


def clip_ids(vision: QwenVision, kind: str, path: Path, spec: FramesSpec) -> list[int]:
    """The token ids of a video or scene for a Qwen-VL model, counted from headers (nothing is decoded)."""
    px = vision.pixels
    frames, (width, height) = clip_shape(kind, path, spec)
    width, height = fitted_size(width, height, spec)
    h, w = video_size(height, width, px)
    grid_t = math.ceil(frames / px.temporal_patch_size)
    merged = grid_t * (h // px.patch_size) * (w // px.patch_size) // px.merge_size**2
    return vision.wrap_tokens(vision.video_id, merged, grid_t if vision.family == "qwen3_vl" else 1)


class TokenCounter:
    """Token ids of a sample as `Preprocessor.encode` builds them, with the visual tokens counted from sizes.

    `synergy_tokens`: the K tokens training puts after the last image of a paired sample (`data.synergy_tokens`);
    they are counted as K text tokens, since the tokenizer gets them only when the stage's synergy head is built.
    """

    def __init__(self, preprocessor: Preprocessor, spec: FramesSpec, synergy_tokens: int = 0):
        self.pre, self.spec, self.synergy_tokens = preprocessor, spec, synergy_tokens

    def image_ids(self, path: Path) -> list[int]:
        vision = self.pre.vision
        if not isinstance(vision, QwenVision):
            return vision.image(load_image(path)).ids
        return image_ids(vision, path)

    def clip_ids(self, kind: str, path: Path) -> list[int]:
        vision = self.pre.vision
        if not vision.supports_video or not isinstance(vision, QwenVision):
            raise ValueError(f"the model ({self.pre.family}) takes no video input")
        return clip_ids(vision, kind, path, self.spec)

    def ids_and_labels(self, sample: Sample, root: Path) -> tuple[list[int], list[int]]:
        segments: dict[str, list[list[int]]] = {IMAGE_TAG: [], VIDEO_TAG: []}
        if (sample.image_paths or sample.clip) and self.pre.vision is None:
            raise ValueError(f"the model ({self.pre.family}) is text-only but the sample has media")
        for value in sample.image_paths:
            segments[IMAGE_TAG].append(self.image_ids(resolve(root, value)))
        if sample.paired is not None and self.synergy_tokens and segments[IMAGE_TAG]:
            segments[IMAGE_TAG][-1] = segments[IMAGE_TAG][-1] + [self.pre.pad_id] * self.synergy_tokens
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


def _check_sample(
    report: CheckReport, record: Record, sample: Sample, root: Path, counter: TokenCounter | None
) -> None:
    """Media on disk, then (with a counter) the token budget, of one well-formed sample."""
    report.checked += 1
    missing = [resolve(root, p) for p in media_paths(sample) if not resolve(root, p).exists()]
    report.missing += [f"{record.where}: {p} not found" for p in missing]
    report.rejected += bool(missing)
    if counter is None or missing:
        return
    try:
        ids, labels = counter.ids_and_labels(sample, root)
    except (OSError, ValueError) as exc:
        report.unusable.append(f"{record.where}: {exc}")
        report.rejected += 1
        return
    report.tokens.append(len(ids))
    try:
        truncate_text(ids, labels, report.max_length, counter.pre.vision)
    except ValueError as exc:
        report.over_budget.append(f"{record.where}: {exc}")
        report.rejected += 1
        return
    if len(ids) > report.max_length:
        report.truncated.append(f"{record.where}: {len(ids)} tokens, text cut to {report.max_length}")


def check_records(
    file: str | Path,
    records: Iterable[Record],
    root: str | Path,
    counter: TokenCounter | None = None,
    max_length: int | None = None,
    *,
    sample: int | None = None,
    seed: int = 0,
) -> CheckReport:
    """Schema and modality of every record; media and (with `counter`) tokens of every well-formed sample, or of
    `sample` of them drawn at random (seeded, one pass: reservoir sampling), checked in file order."""
    root = Path(root)
    report = CheckReport(file=Path(file), max_length=(max_length or DEFAULT_MAX_LENGTH) if counter else None)
    report.sampled = sample is not None
    rng, kept, good = random.Random(seed), [], 0
    for record in records:
        report.samples += 1
        try:
            parsed = parse_sample(record)
        except BadSample as exc:
            report.bad.append(str(exc))
            continue
        report.modalities[parsed.modality] += 1
        if sample is None:
            _check_sample(report, record, parsed, root, counter)
            continue
        good += 1
        if len(kept) < sample:
            kept.append((record, parsed))
        elif (j := rng.randrange(good)) < sample:
            kept[j] = (record, parsed)
    for record, parsed in sorted(kept, key=lambda pair: pair[0].index):
        _check_sample(report, record, parsed, root, counter)
    report.sampled = report.sampled and report.checked < good
    return report


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
    counter = TokenCounter(Preprocessor.from_dir(model), frames or FramesSpec()) if model is not None else None
    return check_records(path, read_records(path), root, counter, max_length)
