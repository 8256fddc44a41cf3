"""PVSG (Panoptic Video Scene Graphs, github:LilyDaytoy/OpenPVSG) -> image <-> video paired graphs.

Released layout (after OpenPVSG's `tools/unzip_and_extract.py`):

    data/pvsg.json                            {"objects": {"thing": [...], "stuff": [...]}, "relations": [...],
                                               "split": {"vidor": {"train": [ids], "val": [ids]}, "epic_kitchen":
                                               ..., "ego4d": ...}, "data": [video, ...]}
    data/<source>/frames/<video_id>/0000.png  every frame, 4-digit, from 0
    data/<source>/masks/<video_id>/0000.png   panoptic masks (palette PNG, pixel value = object_id)

A video record: `video_id`, `meta` (`num_frames`, `width`, `height`, `fps`), `objects` ([{`object_id`, `category`,
`is_thing`, `status`}]) and `relations` ([subject_id, object_id, predicate, [[first, last], ...]], frames
inclusive). The image is frame 0; each clip starts `gap` frames later (non-adjacent) and has at most
`clip_frames` frames. Presence and boxes come from the masks of frame 0 and of `probe_frames` frames spread
over the clip; without masks, an object counts as present where one of its relations holds (no boxes then).
Cross-modal links are the shared `object_id`s. Relations whose predicate is not in `relations`, or that name
an unknown object, are left out, as OpenPVSG's own loader does for predicates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from moekit.config import StrictModel
from moekit.csqa.graphs import (
    LayoutError,
    Link,
    Obj,
    PairedGraph,
    PairMedia,
    Relation,
    SideGraph,
    SourceRecord,
    check_record,
)
from moekit.data.frames import uniform_indices

SOURCES = ("vidor", "epic_kitchen", "ego4d")
EXPECTED = "the video records of PVSG's pvsg.json (video_id, meta.num_frames, objects, relations)"


class Options(StrictModel):
    split: Literal["train", "val", "all"] = "all"
    gap: int = Field(10, ge=1, description="frames between the image (frame 0) and a clip's first frame")
    clip_frames: int = Field(32, ge=2, description="frames per clip")
    clips_per_video: int = Field(1, ge=1, description="clips (pairs) per video, spread over the video")
    probe_frames: int = Field(5, ge=2, description="mask frames read per clip for presence and boxes")
    stuff: bool = Field(False, description="keep stuff classes (wall, floor, sky, ...) as objects")
    max_videos: int | None = Field(None, ge=1)


class _Meta(SourceRecord):
    num_frames: int = Field(ge=1)
    width: int | None = None
    height: int | None = None


class _Object(SourceRecord):
    object_id: int
    category: str
    is_thing: bool = True
    status: list[str] = []


class _Video(SourceRecord):
    video_id: str
    meta: _Meta
    objects: list[_Object]
    relations: list[tuple[int, int, str, list[tuple[int, int]]]]


class _Split(SourceRecord):
    train: list[str] = []
    val: list[str] = []


class _Top(SourceRecord):
    objects: dict[str, list[str]]
    relations: list[str]
    split: dict[str, _Split]
    data: list[dict]


def _boxes(mask_file: Path) -> dict[int, tuple[float, float, float, float]]:
    """object_id -> (x1, y1, x2, y2) of every id in a panoptic mask."""
    with Image.open(mask_file) as image:
        mask = np.asarray(image)
    out = {}
    for oid in np.unique(mask):
        if oid == 0:
            continue
        rows, cols = np.nonzero(mask == oid)
        out[int(oid)] = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
    return out


def _frame(folder: Path, t: int) -> Path:
    return folder / f"{t:04d}.png"


class _VideoPairs:
    def __init__(self, video: _Video, folder: Path, predicates: set[str], opts: Options):
        self.v, self.opts = video, opts
        self.frames, self.masks = folder / "frames" / video.video_id, folder / "masks" / video.video_id
        self.objects = {o.object_id: o for o in video.objects if opts.stuff or o.is_thing}
        self.relations = [
            r for r in video.relations if r[2] in predicates and r[0] in self.objects and r[1] in self.objects
        ]
        self.has_masks = self.masks.is_dir()

    def _present(self, t: int) -> dict[int, tuple | None]:
        if self.has_masks:
            mask = _frame(self.masks, t)
            if not mask.is_file():
                raise LayoutError(mask, "mask frame missing (the masks folder must hold every frame)")
            return {k: v for k, v in _boxes(mask).items() if k in self.objects}
        found: dict[int, tuple | None] = {}
        for s, o, _, spans in self.relations:
            if any(a <= t <= b for a, b in spans):
                found[s] = found[o] = None
        return found

    def _obj(self, oid: int, box, box_end=None) -> Obj:
        o = self.objects[oid]
        return Obj(id=str(oid), label=o.category, attributes=list(o.status), box=box, box_end=box_end)

    def pair(self, start: int, length: int) -> PairedGraph:
        size = (self.v.meta.width, self.v.meta.height) if self.v.meta.width and self.v.meta.height else None
        first = self._present(0)
        image = SideGraph(modality="image", objects=[self._obj(k, b) for k, b in sorted(first.items())], size=size)
        image.relations = [
            Relation(subject=str(s), predicate=p, object=str(o))
            for s, o, p, spans in self.relations
            if s in first and o in first and any(a <= 0 <= b for a, b in spans)
        ]
        end = start + length - 1
        seen: dict[int, list] = {}
        for t in (start + i for i in uniform_indices(length, self.opts.probe_frames)):
            for k, box in self._present(t).items():
                seen.setdefault(k, []).append(box)
        video = SideGraph(
            modality="video", objects=[self._obj(k, b[0], b[-1]) for k, b in sorted(seen.items())], size=size
        )
        for s, o, p, spans in self.relations:
            inside = [(max(a, start), min(b, end)) for a, b in spans if a <= end and b >= start]
            if inside and s in seen and o in seen:
                frac = [((a - start) / (length - 1), (b - start) / (length - 1)) for a, b in inside]
                video.relations.append(Relation(subject=str(s), predicate=p, object=str(o), spans=frac))
        links = [Link(image=str(k), other=str(k)) for k in sorted(first) if k in seen]
        media = PairMedia(
            image=str(_frame(self.frames, 0)), frames=[str(_frame(self.frames, t)) for t in range(start, end + 1)]
        )
        return PairedGraph(
            id=f"pvsg-{self.v.video_id}-{start:04d}", source="pvsg", image=image, other=video, links=links, media=media
        )


def _starts(total: int, opts: Options) -> tuple[list[int], int]:
    length = min(opts.clip_frames, total - opts.gap)
    if length < 2:
        return [], 0
    last = total - length
    count = opts.clips_per_video
    starts = sorted({round(opts.gap + i * (last - opts.gap) / max(1, count - 1)) for i in range(count)})
    return starts, length


def load_pairs(root: str | Path, opts: Options) -> tuple[list[PairedGraph], list[tuple[str, str]]]:
    """Paired graphs of every chosen video, and (record, reason) for videos that give none."""
    root = Path(root)
    file = root / "pvsg.json" if root.is_dir() else root
    root = file.parent
    if not file.is_file():
        raise LayoutError(file, "not found (expected PVSG's data folder holding pvsg.json and vidor/, ...)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise LayoutError(file, f"not valid JSON ({exc.msg}, line {exc.lineno})") from None
    top = check_record(_Top, raw, file, None, "PVSG's keys objects, relations, split and data")
    source_of = {vid: src for src, split in top.split.items() for vid in [*split.train, *split.val]}
    wanted = None
    if opts.split != "all":
        wanted = {vid for split in top.split.values() for vid in getattr(split, opts.split)}
    pairs, skipped = [], []
    videos = [check_record(_Video, r, file, _record_name(r, i), EXPECTED) for i, r in enumerate(top.data)]
    used = 0
    for video in videos:
        if wanted is not None and video.video_id not in wanted:
            continue
        if opts.max_videos is not None and used >= opts.max_videos:
            break
        used += 1
        folder = _source_folder(root, video.video_id, source_of.get(video.video_id))
        image = _frame(folder / "frames" / video.video_id, 0)
        if not image.is_file():
            raise LayoutError(
                image, "frame missing: extract the frames with OpenPVSG's tools/unzip_and_extract.py", video.video_id
            )
        starts, length = _starts(video.meta.num_frames, opts)
        if not starts:
            skipped.append((video.video_id, "too short for a clip after the gap"))
            continue
        maker = _VideoPairs(video, folder, set(top.relations), opts)
        for start in starts:
            missing = [t for t in (start, start + length - 1) if not _frame(maker.frames, t).is_file()]
            if missing:
                raise LayoutError(
                    _frame(maker.frames, missing[0]), "frame missing (meta.num_frames says it exists)", video.video_id
                )
            pair = maker.pair(start, length)
            if not pair.image.objects or not pair.other.objects:
                skipped.append((pair.id, "no object in the image or in the clip"))
                continue
            pairs.append(pair)
    return pairs, skipped


def _record_name(raw: object, index: int) -> str:
    return str(raw.get("video_id", f"data[{index}]")) if isinstance(raw, dict) else f"data[{index}]"


def _source_folder(root: Path, video_id: str, source: str | None) -> Path:
    for name in [source] if source else SOURCES:
        if (root / name / "frames" / video_id).is_dir():
            return root / name
    where = source or "/".join(SOURCES)
    raise LayoutError(root / where / "frames" / video_id, "frame folder not found", video_id)
