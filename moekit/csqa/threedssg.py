"""3DSSG (github:ShunChengWu/3DSSG) over 3RScan scans (github:WaldJohannaU/3RScan) -> image <-> 3D paired graphs.

Released layout:

    3DSSG/objects.json        {"scans": [{"scan": id, "objects": [{"id": "1", "global_id", "label", "ply_color",
                                "attributes": {"color": [...], "state": [...], ...}, ...}]}]}
    3DSSG/relationships.json  {"scans": [{"scan": id, "objects": {"1": "floor", ...},
                                "relationships": [[subject_id, object_id, predicate_id, "predicate"], ...]}]}
                              (a scan may appear in several entries, e.g. one per `split`: they are merged)
    3RScan/<scan>/semseg.v2.json   {"segGroups": [{"id", "objectId", "label", "obb": {"centroid",
                                     "axesLengths", "normalizedAxes"}}]}
    3RScan/<scan>/sequence/   (sequence.zip unpacked) _info.txt (m_colorWidth, m_colorHeight,
                              m_calibrationColorIntrinsic = 16 numbers, row-major 4x4, ...), and per frame
                              frame-000000.color.jpg, .depth.pgm (uint16 mm), .pose.txt (camera-to-world, metres)

The image is one sampled view; the 3D side is `views` other views (a moekit scene folder is written from
them). The 3D objects are put into the image by projecting each object's oriented box (semseg.v2.json) with
the view's pose and colour intrinsics: an object is in the image when its centre projects inside the frame in
front of the camera and the depth map there is not nearer than the box's front (occlusion test); its image
box is the frame-clipped rectangle around its 8 projected corners. Relations whose two objects are in the
image are inherited by the image side. Cross-modal links are the shared instance ids.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

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
    SceneView,
    SideGraph,
    SourceRecord,
    check_record,
)
from moekit.data.convert.rscan import read_info as read_rscan_info
from moekit.data.frames import uniform_indices

STRUCTURE = {"wall", "floor", "ceiling"}
OCCLUSION_MARGIN = 0.1  # metres


class Options(StrictModel):
    graphs: str | None = Field(None, description="folder with objects.json and relationships.json (default: SOURCE)")
    images_per_scan: int = Field(1, ge=1, description="sampled views per scan, one pair each")
    views: int = Field(16, ge=2, le=64, description="views of the 3D side")
    min_visible: int = Field(1, ge=1, description="objects the image must show for a pair")
    structure: bool = Field(False, description="keep wall, floor and ceiling as objects")
    max_scans: int | None = Field(None, ge=1)


class _Object(SourceRecord):
    id: str | int
    label: str
    attributes: dict[str, list[str]] = {}


class _ObjectScan(SourceRecord):
    scan: str
    objects: list[_Object]


class _RelScan(SourceRecord):
    scan: str
    objects: dict[str, str] = {}
    relationships: list[tuple[int, int, int, str]]


class _Scans(SourceRecord):
    scans: list[dict]


class _Obb(SourceRecord):
    centroid: tuple[float, float, float]
    axesLengths: tuple[float, float, float]
    normalizedAxes: list[float] | None = Field(None, min_length=9, max_length=9)


class _Group(SourceRecord):
    id: int | None = None
    objectId: int | None = None
    label: str
    obb: _Obb


class _Semseg(SourceRecord):
    segGroups: list[_Group]


def _json(file: Path) -> object:
    if not file.is_file():
        raise LayoutError(file, "not found")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise LayoutError(file, f"not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _scans(file: Path, model: type, what: str) -> list:
    top = check_record(_Scans, _json(file), file, None, "a top-level 'scans' list (3DSSG release)")
    return [
        check_record(model, s, file, str(s.get("scan", i)) if isinstance(s, dict) else str(i), what)
        for i, s in enumerate(top.scans)
    ]


def read_info(file: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """Colour intrinsics (3x3) and (width, height) from a 3RScan `_info.txt` (read by the 3rscan converter's
    reader, the one place that knows the file)."""
    info = read_rscan_info(file)
    return info["m_calibrationColorIntrinsic"], (info["m_colorWidth"], info["m_colorHeight"])


def _pose(file: Path) -> np.ndarray:
    try:
        pose = np.loadtxt(file, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise LayoutError(file, f"expected a 4x4 camera-to-world matrix ({exc})") from None
    if pose.shape != (4, 4):
        raise LayoutError(file, f"expected a 4x4 camera-to-world matrix, got shape {pose.shape}")
    return pose


def _depth(file: Path) -> np.ndarray | None:
    if not file.is_file():
        return None
    with Image.open(file) as image:
        return np.asarray(image).astype(np.float64) / 1000.0


def _corners(obb: _Obb) -> np.ndarray:
    centre, half = np.asarray(obb.centroid), np.asarray(obb.axesLengths) / 2
    axes = np.asarray(obb.normalizedAxes).reshape(3, 3) if obb.normalizedAxes else np.eye(3)
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
    return centre + (signs * half) @ axes


def project(obb: _Obb, pose: np.ndarray, k: np.ndarray, size: tuple[int, int], depth: np.ndarray | None):
    """(box, distance) of an object in a view, or None when it is not in the image."""
    world_to_cam = np.linalg.inv(pose)
    pts = np.c_[np.vstack([obb.centroid, _corners(obb)]), np.ones(9)] @ world_to_cam.T
    z = pts[0, 2]
    if z <= 0.1:
        return None
    uv = (pts[:, :3] @ k.T)[:, :2] / np.maximum(pts[:, 2:3], 1e-6)
    (u, v), (w, h) = uv[0], size
    if not (0 <= u < w and 0 <= v < h):
        return None
    if depth is not None:
        dh, dw = depth.shape
        seen = depth[min(dh - 1, int(v * dh / h)), min(dw - 1, int(u * dw / w))]
        if 0 < seen < z - max(obb.axesLengths) / 2 - OCCLUSION_MARGIN:
            return None
    front = uv[1:][pts[1:, 2] > 0.1]
    x1, y1 = np.clip(front.min(axis=0), 0, [w, h])
    x2, y2 = np.clip(front.max(axis=0), 0, [w, h])
    return (float(x1), float(y1), float(x2), float(y2)), float(z)


def _scan_pairs(scan: str, folder: Path, objs: list[_Object], rels: list, opts: Options) -> list[PairedGraph]:
    semseg_file = folder / "semseg.v2.json"
    groups = check_record(_Semseg, _json(semseg_file), semseg_file, scan, "3RScan's segGroups with obb")
    obbs = {str(g.objectId if g.objectId is not None else g.id): g.obb for g in groups.segGroups}
    seq = folder / "sequence"
    if not seq.is_dir():
        raise LayoutError(seq, "not found: unpack the scan's sequence.zip into sequence/", scan)
    k, size = read_info(seq / "_info.txt")
    stems = sorted(p.name.removesuffix(".color.jpg") for p in seq.glob("frame-*.color.jpg"))
    if len(stems) < opts.views + opts.images_per_scan:
        return []
    keep = [o for o in objs if opts.structure or o.label not in STRUCTURE]
    attrs = {str(o.id): sorted({a for values in o.attributes.values() for a in values}) for o in keep}
    room_objects = [Obj(id=str(o.id), label=o.label, attributes=attrs[str(o.id)]) for o in keep]
    ids = {o.id for o in room_objects}
    relations = [
        Relation(subject=str(s), predicate=p, object=str(o)) for s, o, _, p in rels if str(s) in ids and str(o) in ids
    ]
    room = SideGraph(modality="3d", objects=room_objects, relations=relations)
    count = opts.images_per_scan
    picks = [round((i + 0.5) * len(stems) / count - 0.5) for i in range(count)]
    rest = [s for i, s in enumerate(stems) if i not in picks]
    views = [
        SceneView(
            color=str(seq / f"{s}.color.jpg"),
            depth=str(seq / f"{s}.depth.pgm"),
            pose=_pose(seq / f"{s}.pose.txt").tolist(),
        )
        for s in (rest[i] for i in uniform_indices(len(rest), opts.views))
    ]
    pairs = []
    for i in picks:
        stem = stems[i]
        pose, depth = _pose(seq / f"{stem}.pose.txt"), _depth(seq / f"{stem}.depth.pgm")
        shown = []
        for o in room_objects:
            found = project(obbs[o.id], pose, k, size, depth) if o.id in obbs else None
            if found is not None:
                shown.append(Obj(id=o.id, label=o.label, attributes=o.attributes, box=found[0], depth=found[1]))
        if len(shown) < opts.min_visible:
            continue
        seen = {o.id for o in shown}
        inherited = [r for r in relations if r.subject in seen and r.object in seen]
        image = SideGraph(modality="image", objects=shown, relations=inherited, size=size)
        media = PairMedia(image=str(seq / f"{stem}.color.jpg"), views=views, intrinsics=k.tolist())
        links = [Link(image=o.id, other=o.id) for o in shown]
        pairs.append(
            PairedGraph(id=f"3dssg-{scan}-{stem}", source="3dssg", image=image, other=room, links=links, media=media)
        )
    return pairs


def load_pairs(root: str | Path, opts: Options) -> tuple[list[PairedGraph], list[tuple[str, str]]]:
    """Paired graphs of every scan that both 3DSSG files list and `root` holds; (record, reason) for the rest."""
    root = Path(root)
    graphs = Path(opts.graphs) if opts.graphs else root
    obj_what = "objects with id, label and attributes"
    rel_what = "relationships as [subject_id, object_id, predicate_id, predicate]"
    objects = {s.scan: s.objects for s in _scans(graphs / "objects.json", _ObjectScan, obj_what)}
    rels: dict[str, list] = defaultdict(list)
    for s in _scans(graphs / "relationships.json", _RelScan, rel_what):
        rels[s.scan] += [r for r in s.relationships if r not in rels[s.scan]]
    pairs, skipped = [], []
    for scan in sorted(rels)[: opts.max_scans]:
        if scan not in objects:
            skipped.append((scan, "not in objects.json"))
        elif not (root / scan).is_dir():
            skipped.append((scan, "scan folder not in the 3RScan folder"))
        else:
            found = _scan_pairs(scan, root / scan, objects[scan], rels[scan], opts)
            pairs += found
            if not found:
                skipped.append((scan, "too few views, or too few objects in the sampled views"))
    if not pairs and rels and all(reason == "scan folder not in the 3RScan folder" for _, reason in skipped):
        raise LayoutError(root, "holds none of the scans that relationships.json lists (expected 3RScan/<scan>/)")
    return pairs, skipped
