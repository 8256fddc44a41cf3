"""`3rscan`: 3RScan RGB-D sequences -> moekit scene folders and image <-> 3D pairs described by their objects.

SRC is the 3RScan data folder (or one scan) with each scan's `sequence.zip` extracted into `sequence/` (as
3RScan's setup.sh and EmbodiedScan's generate_image_3rscan.py do):

    <scan_id>/sequence/_info.txt                  m_colorWidth/Height, m_depthWidth/Height and the 4x4 row-major
                                                  m_calibrationColorIntrinsic / m_calibrationDepthIntrinsic
    <scan_id>/sequence/frame-000000.color.jpg     RGB
    <scan_id>/sequence/frame-000000.depth.pgm     16-bit binary PGM, millimetres, registered to the colour view
    <scan_id>/sequence/frame-000000.pose.txt      4x4 camera(RGB)-to-world, metres (OpenCV camera axes)
    <scan_id>/semseg.v2.json                      segGroups: objectId + label of every instance

(3RScan FAQ and rio_lib's sequence.cc / frame_config.h). Each scan becomes OUT/media/scenes/<scan_id>/ with depth
rewritten as uint16 millimetre PNGs, poses and a 4x4 intrinsic.txt. `rotate: upright` turns every view 90 degrees
clockwise (3RScan's frames are stored sideways; 3DSSG rotates them the same way, `np.rot90(image, 3)`) and
rotates depth, K and the camera frame with it, so geometry is unchanged; colour is then re-encoded (JPEG quality
95), otherwise hard-linked. `intrinsics: depth` (default) writes the depth camera's K scaled to the colour size,
the camera 3RScan's own back-projection uses.

Samples (PolyV's image <-> 3D pairs): `images_per_scan` views spread over the kept ones, each
`{"image": that view, "paired": {"scene": the scan}}`, asked which objects the room holds and answered from the
scan's labels: 3DSSG's objects.json (`objects`) if given, else the scan's semseg.v2.json, plus up to
`max_relations` "subject predicate object" triples from 3DSSG's relationships.json (`relationships`).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from moekit.config import StrictModel
from moekit.data.convert.scene_out import (
    FileMode,
    View,
    kept_views,
    key_values,
    place,
    read_json,
    read_record,
    write_matrix,
    write_record,
)
from moekit.data.convert.sink import Context, Converted, LayoutError, Skipped
from moekit.data.scene import scale_intrinsics
from moekit.data.schema import Sample

INFO_KEYS = ("m_colorWidth", "m_colorHeight", "m_depthWidth", "m_depthHeight")
QUESTION = "<image>\nThis is one view of a room that was scanned in 3D. Which objects does the room contain?"
# camera axes after a 90-degree clockwise image rotation: x' = -y, y' = x, z' = z
UPRIGHT = np.array([[0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


class Options(StrictModel):
    every: int = Field(1, ge=1, description="keep frames whose number is a multiple of this")
    max_views: int | None = Field(None, ge=1, description="then at most this many views, spread uniformly")
    images_per_scan: int = Field(1, ge=1, description="paired samples per scan (student images)")
    objects: str | None = Field(None, description="3DSSG objects.json (labels; default: each scan's semseg.v2.json)")
    relationships: str | None = Field(None, description="3DSSG relationships.json (relation triples in the answer)")
    max_relations: int = Field(10, ge=0, description="relation triples per answer")
    rotate: Literal["upright", "none"] = Field("upright", description="turn the sideways frames upright")
    intrinsics: Literal["depth", "color"] = Field("depth", description="which camera's K the scene folder gets")
    files: FileMode = Field("link", description="hard-link unchanged colour files, or copy them")


def scan_folders(src: Path) -> list[Path]:
    if not src.is_dir():
        raise LayoutError(src, "expected the 3RScan data folder (<scan_id>/sequence/...)")
    if (src / "sequence").is_dir():
        return [src]
    found = []
    for p in sorted(src.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if (p / "sequence").is_dir():
            found.append(p)
        elif (p / "sequence.zip").is_file():
            raise LayoutError(p / "sequence.zip", "not extracted: unzip it into sequence/ (frame-*.color.jpg, ...)")
    if not found:
        raise LayoutError(src, "no scans: expected <scan_id>/sequence/_info.txt and frame-000000.color.jpg, ...")
    return found


def read_info(path: Path) -> dict[str, Any]:
    """The fields of `_info.txt` moekit needs: sizes, 3x3 colour and depth K, depth units per metre."""
    if not path.is_file():
        raise LayoutError(path, "expected the sequence's camera calibration _info.txt")
    raw = key_values(path)
    out: dict[str, Any] = {}
    try:
        for key in INFO_KEYS:
            out[key] = int(raw[key])
        for key in ("m_calibrationColorIntrinsic", "m_calibrationDepthIntrinsic"):
            values = [float(x) for x in raw[key].split()]
            if len(values) != 16:
                raise ValueError
            out[key] = np.asarray(values).reshape(4, 4)[:3, :3]
        out["m_depthShift"] = float(raw.get("m_depthShift", 1000.0))
    except (KeyError, ValueError):
        raise LayoutError(
            path, f"expected {', '.join(INFO_KEYS)} and 16-number m_calibrationColorIntrinsic / DepthIntrinsic lines"
        ) from None
    return out


def sequence_views(scan: Path) -> list[View]:
    seq = scan / "sequence"
    names = set(p.name for p in seq.iterdir())
    views = []
    for name in sorted(names):
        if not (name.startswith("frame-") and name.endswith(".color.jpg")):
            continue
        stem = name.removesuffix(".color.jpg")
        number = stem.removeprefix("frame-")
        if not number.isdigit():
            raise LayoutError(seq / name, "expected frame-<6 digits>.color.jpg")
        for suffix, what in ((".depth.pgm", "a 16-bit depth PGM in millimetres"), (".pose.txt", "a 4x4 pose")):
            if stem + suffix not in names:
                raise LayoutError(seq / f"{stem}{suffix}", f"missing: every colour frame needs {what}")
        views.append(View(int(number), seq / name, seq / f"{stem}.depth.pgm", seq / f"{stem}.pose.txt"))
    if not views:
        raise LayoutError(seq, "no frames: expected frame-000000.color.jpg, .depth.pgm, .pose.txt")
    return sorted(views, key=lambda v: v.number)


def read_pgm_depth(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        if image.format != "PPM" or image.mode not in ("I", "I;16", "I;16B"):
            raise LayoutError(path, f"expected a 16-bit PGM depth map, got {image.format} mode {image.mode}")
        return np.asarray(image).astype(np.uint32)


def _scan_list(path: Path, field: str, what: str) -> dict[str, Any]:
    """3DSSG's {"scans": [{"scan": id, field: ...}]} as scan id -> entries (a scan may appear in several splits)."""
    data = read_json(path, what)
    scans = data.get("scans") if isinstance(data, dict) else None
    if not isinstance(scans, list):
        raise LayoutError(path, f"expected {{'scans': [...]}}: {what}")
    out: dict[str, list] = {}
    for i, entry in enumerate(scans):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("scan"), str)
            or not isinstance(entry.get(field), list)
        ):
            raise LayoutError(path, f"expected 'scan' and a list '{field}': {what}", f"scans[{i}]")
        out.setdefault(entry["scan"], []).extend(entry[field])
    return out


OBJECTS = "3DSSG objects.json: {'scans': [{'scan', 'objects': [{'id', 'label'}]}]}"
RELATIONS = "3DSSG relationships.json: {'scans': [{'scan', 'relationships': [[subject, object, index, name]]}]}"


@functools.lru_cache(maxsize=2)
def _objects(path: Path) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for scan, objects in _scan_list(path, "objects", OBJECTS).items():
        if not all(isinstance(o, dict) and "id" in o and isinstance(o.get("label"), str) for o in objects):
            raise LayoutError(path, f"expected every object to have 'id' and 'label': {OBJECTS}", scan)
        out[scan] = [(str(o["id"]), o["label"]) for o in objects]
    return out


@functools.lru_cache(maxsize=2)
def _relations(path: Path) -> dict[str, list[tuple[str, str, str]]]:
    out = {}
    for scan, rels in _scan_list(path, "relationships", RELATIONS).items():
        if not all(isinstance(r, list) and len(r) == 4 and isinstance(r[3], str) for r in rels):
            raise LayoutError(path, f"expected [subject, object, index, name] relations: {RELATIONS}", scan)
        out[scan] = list(dict.fromkeys((str(r[0]), str(r[1]), r[3]) for r in rels))
    return out


def scan_labels(scan: Path, opts: Options) -> list[tuple[str, str]] | None:
    """(instance id, label) of a scan's objects: 3DSSG objects.json, else semseg.v2.json, else None."""
    if opts.objects is not None:
        return _objects(Path(opts.objects)).get(scan.name)
    semseg = scan / "semseg.v2.json"
    if not semseg.is_file():
        return None
    groups = read_json(semseg, "3RScan semseg.v2.json with segGroups").get("segGroups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "label" in g for g in groups):
        raise LayoutError(semseg, "expected 'segGroups': [{'objectId', 'label'}, ...]")
    return [(str(g.get("objectId", g.get("id"))), g["label"]) for g in groups]


def check_source(src: Path, opts: Options) -> None:
    _objects.cache_clear()  # a new run reads the files afresh
    _relations.cache_clear()
    for scan in scan_folders(src):
        info = read_info(scan / "sequence" / "_info.txt")
        views = sequence_views(scan)
        read_pgm_depth(views[0].depth)
        with Image.open(views[0].color) as image:
            if image.size != (info["m_colorWidth"], info["m_colorHeight"]):
                raise LayoutError(views[0].color, f"size {image.size} differs from _info.txt's m_colorWidth/Height")
        scan_labels(scan, opts)
    if opts.relationships is not None:
        _relations(Path(opts.relationships))


def count(src: Path, opts: Options) -> int:
    return len(scan_folders(src)) * opts.images_per_scan


def _k(info: dict[str, Any], opts: Options) -> np.ndarray:
    color = (info["m_colorWidth"], info["m_colorHeight"])
    if opts.intrinsics == "color":
        return info["m_calibrationColorIntrinsic"]
    return scale_intrinsics(info["m_calibrationDepthIntrinsic"], (info["m_depthWidth"], info["m_depthHeight"]), color)


def upright_k(k: np.ndarray, height: int) -> np.ndarray:
    """K of an image of `height` rows after a 90-degree clockwise rotation (pixel (u, v) -> (height-1-v, u))."""
    out = np.eye(3)
    out[0, 0], out[1, 1] = k[1, 1], k[0, 0]
    out[0, 2], out[1, 2] = height - 1 - k[1, 2], k[0, 2]
    return out


def write_scan(scan: Path, target: Path, opts: Options, kept: list[tuple[View, np.ndarray]]) -> list[int]:
    """Fill `target` with the scan's kept views (module docstring); returns their frame numbers."""
    info = read_info(scan / "sequence" / "_info.txt")
    k, camera = _k(info, opts), np.eye(4)
    if opts.rotate == "upright":
        k, camera = upright_k(k, info["m_colorHeight"]), np.linalg.inv(UPRIGHT)
    k4 = np.eye(4)
    k4[:3, :3] = k
    for view, pose in kept:
        stem = f"{view.number:06d}"
        depth = read_pgm_depth(view.depth) * (1000.0 / info["m_depthShift"])
        color_path = target / "color" / f"{stem}.jpg"
        if opts.rotate == "upright":
            depth = np.rot90(depth, 3)
            color_path.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(view.color) as image:
                image.transpose(Image.Transpose.ROTATE_270).save(color_path, quality=95)
        else:
            place(view.color, color_path, opts.files)
        (target / "depth").mkdir(parents=True, exist_ok=True)
        millimetres = np.clip(np.round(depth), 0, 65535).astype(np.uint16)
        Image.fromarray(np.ascontiguousarray(millimetres)).save(target / "depth" / f"{stem}.png")
        write_matrix(target / "pose" / f"{stem}.txt", pose @ camera)
    write_matrix(target / "intrinsic.txt", k4)
    frames = [view.number for view, _ in kept]
    write_record(
        target,
        {
            "format": "3rscan",
            "scene_id": scan.name,
            "source": str(scan.resolve()),
            "frames": frames,
            "rotate": opts.rotate,
            "intrinsics": opts.intrinsics,
            "axis_aligned": False,
        },
    )
    return frames


def describe(scan: Path, labels: list[tuple[str, str]], opts: Options) -> str:
    """The answer: every object label (with its count), then relation triples between labelled objects."""
    counts = Counter(label for _, label in labels)
    parts = [label if counts[label] == 1 else f"{label} ({counts[label]})" for label in dict.fromkeys(counts)]
    text = "The room contains: " + ", ".join(parts) + "."
    if opts.relationships is not None and opts.max_relations:
        names = dict(labels)
        rels = _relations(Path(opts.relationships)).get(scan.name, [])
        triples = [f"{names[s]} {p} {names[o]}" for s, o, p in rels if s in names and o in names]
        if triples:
            text += " Relations: " + "; ".join(list(dict.fromkeys(triples))[: opts.max_relations]) + "."
    return text


def image_positions(total: int, count: int) -> list[int]:
    """`count` distinct positions spread over `range(total)`, centred (one image: the middle view)."""
    count = min(count, total)
    return [int((j + 0.5) * total / count) for j in range(count)]


def records(src: Path, ctx: Context, opts: Options) -> Iterator[Converted | Skipped]:
    for scan in scan_folders(src):
        if ctx.is_done(scan.name):
            continue
        labels = scan_labels(scan, opts)
        if not labels:
            yield Skipped(scan.name, "no object labels (objects.json entry or semseg.v2.json)")
            continue
        rel = Path("scenes") / scan.name
        if (ctx.media / rel).is_dir():  # complete: folders appear atomically
            frames = read_record(ctx.media / rel)["frames"]
        else:
            kept = kept_views(sequence_views(scan), opts.every, opts.max_views, scan.name)
            if not kept:
                yield Skipped(scan.name, "no view with a finite pose")
                continue
            with ctx.media_dir(rel) as tmp:
                frames = write_scan(scan, tmp, opts, kept)
        answer = describe(scan, labels, opts)
        for pos in image_positions(len(frames), opts.images_per_scan):
            number = frames[pos]
            yield Converted(
                Sample.model_validate(
                    {
                        "id": f"{scan.name}-{number:06d}",
                        "image": ctx.rel(ctx.media / rel / "color" / f"{number:06d}.jpg"),
                        "paired": {"scene": ctx.rel(ctx.media / rel)},
                        "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": answer}],
                        "meta": {"scan": scan.name, "view": number, "labels": "3dssg" if opts.objects else "semseg"},
                    }
                )
            )
