"""Action Genome (github:JingweiJ/ActionGenome, over Charades videos) -> image <-> video paired graphs.

Released layout (`dataset/ag/`):

    annotations/object_bbox_and_relationship.pkl   {"VIDEO.mp4/FRAME.png": [object, ...]}
    annotations/person_bbox.pkl                    {"VIDEO.mp4/FRAME.png": {"bbox": float32 [N, 4] xyxy,
                                                     "bbox_score": [N], "bbox_size": (w, h), "bbox_mode": "xyxy",
                                                     "keypoints": ..., "keypoints_logits": ...}}
    frames/VIDEO.mp4/FRAME.png                     the annotated frames (ActionGenome's tools/dump_frames.py)

An object: `class`, `bbox` (x, y, w, h, or None), `visible`, `attention_relationship`, `spatial_relationship`,
`contacting_relationship` (lists of predicates, None when not visible), `metadata` ({"tag", "set": "train" |
"test"}). Every relation has the person as subject. Objects are identified by class (one per class per frame),
so the cross-modal links are the shared classes and "person". The image is a video's first annotated frame;
the clip starts `gap` annotated frames later. The pickles are read with `safe_pickle.load_pickle`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from moekit.config import StrictModel
from moekit.csqa.graphs import (
    Box,
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
from moekit.csqa.safe_pickle import load_pickle

OBJECTS, PERSONS = "object_bbox_and_relationship.pkl", "person_bbox.pkl"
KEY = re.compile(r"^(?P<video>[^/]+\.mp4)/(?P<frame>\d+)\.png$")
KINDS = ("attention", "spatial", "contacting")
PERSON = "person"


class Options(StrictModel):
    split: Literal["train", "test", "all"] = "all"
    gap: int = Field(2, ge=1, description="annotated frames skipped between the image and the clip")
    clip_frames: int = Field(32, ge=2, description="annotated frames per clip at most")
    min_clip: int = Field(3, ge=2, description="fewer annotated frames after the gap: no pair")
    max_videos: int | None = Field(None, ge=1)


class _Meta(SourceRecord):
    set: str


class _Object(SourceRecord):
    class_: str = Field(alias="class")
    bbox: tuple[float, float, float, float] | None
    visible: bool
    attention_relationship: list[str] | None
    spatial_relationship: list[str] | None
    contacting_relationship: list[str] | None
    metadata: _Meta


class _Frame(SourceRecord):
    objects: list[_Object]


def _person_box(file: Path, key: str, entry: Any) -> Box | None:
    if not isinstance(entry, dict) or "bbox" not in entry:
        raise LayoutError(file, "expected a dict with 'bbox' (float [N, 4] xyxy) and 'bbox_size'", key)
    boxes = np.asarray(entry["bbox"], dtype=np.float64)
    if boxes.size == 0:
        return None
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise LayoutError(file, f"field 'bbox': expected shape [N, 4], got {list(boxes.shape)}", key)
    scores = entry.get("bbox_score")
    best = int(np.argmax(scores)) if scores is not None and len(scores) == len(boxes) else 0
    return tuple(float(v) for v in boxes[best])


def _read(root: Path) -> tuple[dict[str, list[_Object]], dict[str, Any], Path, Path]:
    ann = root / "annotations"
    obj_file, person_file = ann / OBJECTS, ann / PERSONS
    for f in (obj_file, person_file):
        if not f.is_file():
            raise LayoutError(f, "not found (expected Action Genome's dataset/ag with annotations/ and frames/)")
    raw, persons = load_pickle(obj_file), load_pickle(person_file)
    for f, data in ((obj_file, raw), (person_file, persons)):
        if not isinstance(data, dict):
            raise LayoutError(f, f"expected a dict keyed by 'VIDEO.mp4/FRAME.png', got {type(data).__name__}")
    frames = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not KEY.match(key):
            raise LayoutError(obj_file, "keys must read 'VIDEO.mp4/FRAME.png'", repr(key))
        expected = (
            "a list of objects with class, bbox (x, y, w, h), visible, the three *_relationship lists, metadata.set"
        )
        frames[key] = check_record(_Frame, {"objects": value}, obj_file, key, expected).objects
    return frames, persons, obj_file, person_file


def _side(modality: str, keys: list[str], frames: dict, persons: dict, person_file: Path, size) -> SideGraph:
    """Objects seen in `keys` (first and last boxes) and relations with the frames they hold in."""
    boxes: dict[str, list[Box | None]] = defaultdict(list)
    held: dict[tuple[str, str, str, str], list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        person = _person_box(person_file, key, persons[key]) if key in persons else None
        if person is not None:
            boxes[PERSON].append(person)
        for o in frames[key]:
            if not o.visible:
                continue
            x, y, w, h = o.bbox if o.bbox is not None else (0, 0, 0, 0)
            boxes[o.class_].append((x, y, x + w, y + h) if o.bbox is not None else None)
            for kind in KINDS:
                for p in getattr(o, f"{kind}_relationship") or []:
                    held[(PERSON, p, o.class_, kind)].append(i)
                    boxes.setdefault(PERSON, [])
    objects = []
    for label, found in sorted(boxes.items()):
        known = [b for b in found if b is not None]
        first, last = (known[0], known[-1]) if known else (None, None)
        objects.append(Obj(id=label, label=label, box=first, box_end=last if modality == "video" else None))
    relations = []
    for (s, p, o, kind), idx in sorted(held.items()):
        spans = _runs(idx, len(keys)) if modality == "video" else None
        relations.append(Relation(subject=s, predicate=p, object=o, kind=kind, spans=spans))
    return SideGraph(modality=modality, objects=objects, relations=relations, size=size)


def _runs(indices: list[int], total: int) -> list[tuple[float, float]]:
    """Consecutive runs of frame positions as fractions of the clip."""
    runs, start = [], indices[0]
    for a, b in zip(indices, indices[1:] + [None]):
        if b is None or b != a + 1:
            runs.append((start / (total - 1), a / (total - 1)))
            start = b
    return runs


def load_pairs(root: str | Path, opts: Options) -> tuple[list[PairedGraph], list[tuple[str, str]]]:
    """Paired graphs of every chosen video, and (record, reason) for videos that give none."""
    root = Path(root)
    frames, persons, _, person_file = _read(root)
    videos: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for key in frames:
        m = KEY.match(key)
        videos[m["video"]].append((int(m["frame"]), key))
    pairs, skipped = [], []
    for video in sorted(videos)[: opts.max_videos]:
        keys = [k for _, k in sorted(videos[video])]
        sets = {o.metadata.set for k in keys for o in frames[k]}
        if opts.split != "all" and opts.split not in sets:
            continue
        clip = keys[1 + opts.gap : 1 + opts.gap + opts.clip_frames]
        if len(clip) < opts.min_clip:
            skipped.append((video, f"fewer than {opts.min_clip} annotated frames after the gap"))
            continue
        for key in (keys[0], *clip):
            if not (root / "frames" / key).is_file():
                raise LayoutError(
                    root / "frames" / key,
                    "frame missing: dump the frames with ActionGenome's tools/dump_frames.py",
                    video,
                )
        entry = persons.get(keys[0])
        size = tuple(int(v) for v in entry["bbox_size"]) if isinstance(entry, dict) and "bbox_size" in entry else None
        image = _side("image", [keys[0]], frames, persons, person_file, size)
        other = _side("video", clip, frames, persons, person_file, size)
        if not image.objects or not other.objects:
            skipped.append((video, "no visible object in the image or in the clip"))
            continue
        ids = {o.id for o in other.objects}
        links = [Link(image=o.id, other=o.id) for o in image.objects if o.id in ids]
        media = PairMedia(image=str(root / "frames" / keys[0]), frames=[str(root / "frames" / k) for k in clip])
        pid = f"ag-{video.removesuffix('.mp4')}"
        pairs.append(PairedGraph(id=pid, source="action-genome", image=image, other=other, links=links, media=media))
    return pairs, skipped
