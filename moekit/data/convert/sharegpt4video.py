"""`sharegpt4video`: ShareGPT4Video (`ShareGPT4Video/ShareGPT4Video` on the hub) -> image <-> video pairs.

The released layout (the dataset card and file listing; readers of `sharegpt4video_40k.jsonl` join "video_path"
to the folder the zips were extracted to, and take the caption whose "idx" is "-1" as the whole-video caption):

    ShareGPT4Video/
      sharegpt4video_40k.jsonl                  one GPT4V-captioned video per line
      zip_folder/bdd100k/bdd100k_videos.zip     video zips per source (bdd100k, ego4d, mixit, panda, pexels,
      zip_folder/panda/panda_videos_1.zip ...    pixabay): extract them in place (or anywhere under `videos`)

    {"video_id": "...", "video_path": "...mp4", "zip_folder": "panda_videos_1.zip",
     "captions": [{"idx": "0", "content": "<what changes between keyframes 0 and 1>"}, ...,
                  {"idx": "-1", "content": "<the whole video>"}], ...}

A video is looked up as `videos/video_path`, then `videos/zip_folder/video_path`, then by its file name anywhere
under `videos` (preferring a path through the zip's own folder), since users extract the zips differently.

PolyV's pairing (paper, Appendix B.1: "the first frame of each video serves as the image view and non-adjacent
clips provide the corresponding video segments"): the student's image is frame 0; the teacher's video is the clip
from `clip_start` of the way through the video to its last frame (`clip_frames` frames sampled uniformly), at
least one frame after the image, so the teacher sees how the scene goes on rather than a copy of the image. The
second half (the default) keeps the clip clear of the opening shot yet long enough to carry the motion. Both are
written under OUT/media/sharegpt4video/<video_id>/ (`image.jpg`, `clip/0.jpg ...`, within max_width x
max_height) and the source frame range goes in `meta`. The conversation asks for the whole video from its first
frame; the answer is the "-1" caption. Decoding needs PyAV (`moekit[video]`); frame folders work without it.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import Field

from moekit.config import StrictModel
from moekit.data.config import FramesSpec
from moekit.data.convert.llava_pretrain import unique_id
from moekit.data.convert.sink import Context, Converted, LayoutError, Skipped
from moekit.data.frames import VIDEO_SUFFIXES, fit_within, list_frames, load_image, require_av, uniform_indices
from moekit.data.schema import IMAGE_TAG, Sample

DEFAULT_JSONL = "sharegpt4video_40k.jsonl"
FIELDS = ("video_id", "video_path", "zip_folder", "captions")
WHAT = "JSON lines with 'video_id', 'video_path', 'zip_folder' and 'captions': [{'idx', 'content'}, ...]"
PROMPT = "This is the first frame of a video. Describe the whole video in detail."
MEDIA = "sharegpt4video"


class Options(StrictModel):
    annotations: str = Field(DEFAULT_JSONL, description="the annotation JSONL, relative to SRC")
    videos: str | None = Field(None, description="folder the video paths are relative to (default: SRC)")
    clip_start: float = Field(0.5, gt=0.0, lt=1.0, description="where the clip starts, as a fraction of the video")
    clip_frames: int = Field(16, ge=2, le=32, description="frames sampled uniformly from the clip")
    max_width: int = Field(640, ge=28)
    max_height: int = Field(480, ge=28)


def annotation_file(src: Path, opts: Options) -> Path:
    path = src if src.is_file() else src / opts.annotations
    if not path.is_file():
        raise LayoutError(path, f"no such annotation file; expected {DEFAULT_JSONL} ({WHAT})")
    return path


def video_root(src: Path, opts: Options) -> Path:
    if opts.videos is not None:
        root = Path(opts.videos)
        if not root.is_dir():
            raise LayoutError(root, "no such folder (option videos)")
        return root
    return src if src.is_dir() else src.parent


def problem(rec: Any) -> str | None:
    """What is wrong with a record's fields, or None."""
    if not isinstance(rec, dict):
        return "a line must be a JSON object"
    for field in FIELDS[:3]:
        if not isinstance(rec.get(field), str) or not rec[field]:
            return f"expected field '{field}' (a non-empty string)"
    caps = rec.get("captions")
    if not isinstance(caps, list) or not all(isinstance(c, dict) and "idx" in c and "content" in c for c in caps):
        return "expected field 'captions' (a list of {'idx', 'content'})"
    return None


def whole_caption(rec: dict[str, Any]) -> str | None:
    for cap in rec["captions"]:
        if str(cap["idx"]) == "-1" and isinstance(cap["content"], str) and cap["content"].strip():
            return cap["content"].strip()
    return None


def check_source(src: Path, opts: Options) -> None:
    file = annotation_file(src, opts)
    root = video_root(src, opts)
    with open(file, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LayoutError(file, f"not valid JSON ({exc.msg}); expected {WHAT}", f"line {number}") from None
            if (bad := problem(rec)) is not None:
                raise LayoutError(
                    file,
                    bad,
                    f"line {number}" + (f" video_id {rec.get('video_id')!r}" if isinstance(rec, dict) else ""),
                )
            video = VideoFinder(root).find(rec)
            if video is not None and video.is_file():
                require_av()  # the release is mp4: refuse now rather than skip every record
            return
    raise LayoutError(file, f"the file is empty; expected {WHAT}")


def count(src: Path, opts: Options) -> int:
    with open(annotation_file(src, opts), "rb") as fh:
        return sum(1 for line in fh if line.strip())


class VideoFinder:
    """Finds a record's video under the root; the by-name index over the whole root is built on the first miss."""

    def __init__(self, root: Path):
        self.root = root
        self.index: dict[str, list[Path]] | None = None

    def find(self, rec: dict[str, Any]) -> Path | None:
        for path in (self.root / rec["video_path"], self.root / "zip_folder" / rec["video_path"]):
            if path.exists():
                return path
        if self.index is None:
            self.index = {}
            for path in sorted(self.root.rglob("*")):
                if path.suffix.lower() in VIDEO_SUFFIXES:
                    self.index.setdefault(path.name, []).append(path)
        hits = self.index.get(Path(rec["video_path"]).name, [])
        zip_stem = Path(rec["zip_folder"]).stem
        inside = [p for p in hits if zip_stem in p.parts]
        return (inside or hits)[0] if len(inside or hits) == 1 else None


def clip_indices(total: int, opts: Options) -> list[int]:
    """Frame indices of the clip: from `clip_start` of the video (at least frame 2) to the last frame."""
    start = max(2, math.ceil(opts.clip_start * (total - 1)))
    if start > total - 2:
        return []
    return [start + i for i in uniform_indices(total - start, opts.clip_frames)]


def _frame_count(path: Path) -> int:
    av = require_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)


def _decode(path: Path, wanted: set[int]) -> tuple[dict[int, Image.Image], int]:
    """The wanted frames of a video file, and how many frames were decoded (all of them when one is missing)."""
    av = require_av()
    frames: dict[int, Image.Image] = {}
    decoded = 0
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            decoded = i + 1
            if i in wanted:
                frames[i] = frame.to_image().convert("RGB")
                if len(frames) == len(wanted):
                    break
    return frames, decoded


def read_pair(path: Path, opts: Options) -> tuple[Image.Image, list[Image.Image], list[int], int]:
    """(first frame, clip frames, clip indices, frame count) of a video file or frame folder."""
    if path.is_dir():
        files = list_frames(path)
        total = len(files)
        indices = clip_indices(total, opts)
        if not indices:
            raise _TooShort
        return load_image(files[0]), [load_image(files[i]) for i in indices], indices, total
    total = _frame_count(path)
    for _ in range(2):  # a container whose frame count is wrong is decoded again with the true count
        indices = clip_indices(total, opts)
        if not indices:
            raise _TooShort
        frames, decoded = _decode(path, {0, *indices})
        if len(frames) == len(indices) + 1:
            return frames[0], [frames[i] for i in indices], indices, total
        total = decoded
    raise ValueError(f"{path}: frames could not be decoded")


class _TooShort(Exception):
    """The video has too few frames for a first frame plus a non-adjacent clip."""


def write_pair(ctx: Context, video_id: str, first: Image.Image, clip: list[Image.Image], opts: Options) -> Path:
    spec = FramesSpec(max_frames=opts.clip_frames, max_width=opts.max_width, max_height=opts.max_height)
    name = video_id.replace(os.sep, "_").replace("/", "_")
    with ctx.media_dir(f"{MEDIA}/{name}") as tmp:
        fit_within(first, spec).save(tmp / "image.jpg", quality=95)
        (tmp / "clip").mkdir()
        for k, frame in enumerate(clip):
            fit_within(frame, spec).save(tmp / "clip" / f"{k}.jpg", quality=95)
    return ctx.media / MEDIA / name


def records(src: Path, ctx: Context, opts: Options) -> Iterator[Converted | Skipped]:
    file, finder, seen = annotation_file(src, opts), VideoFinder(video_root(src, opts)), Counter()
    with open(file, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                yield Skipped(f"line {number}", "not valid JSON")
                continue
            base = rec.get("video_id") if isinstance(rec, dict) and isinstance(rec.get("video_id"), str) else None
            key = unique_id(base or f"line {number}", seen)
            if ctx.is_done(key):
                continue
            if (bad := problem(rec)) is not None:
                yield Skipped(key, f"malformed record ({bad})")
                continue
            caption = whole_caption(rec)
            if caption is None:
                yield Skipped(key, "no whole-video caption (idx -1)")
                continue
            video = finder.find(rec)
            if video is None:
                yield Skipped(key, "video not found")
                continue
            try:
                first, clip, indices, total = read_pair(video, opts)
            except _TooShort:
                yield Skipped(key, "video too short for a non-adjacent clip")
                continue
            except (OSError, ValueError) as exc:  # PyAV's errors subclass OSError / ValueError
                yield Skipped(key, f"video unreadable ({type(exc).__name__})")
                continue
            folder = write_pair(ctx, key, first, clip, opts)
            meta = {"source_video": ctx.rel(video), "frames": total, "clip": [indices[0], indices[-1]]}
            sample = Sample.model_validate(
                {
                    "id": key,
                    "image": ctx.rel(folder / "image.jpg"),
                    "paired": {"video": ctx.rel(folder / "clip")},
                    "conversations": [
                        {"from": "human", "value": f"{IMAGE_TAG}\n{PROMPT}"},
                        {"from": "gpt", "value": caption},
                    ],
                    "meta": meta,
                }
            )
            yield Converted(sample)
