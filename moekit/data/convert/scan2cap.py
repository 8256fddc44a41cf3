"""`scan2cap`: Scan2Cap's object captions (the ScanRefer annotations) over ScanNet scenes -> image <-> 3D pairs.

SRC is a ScanRefer annotation file (`ScanRefer_filtered_train.json`, `..._val.json`): a JSON list of
`{"scene_id": "scene0000_00", "object_id": "34", "object_name": "coffee_table", "ann_id": "1",
"description": "...", "token": [...]}` (ScanRefer README, "Data format"). Each record becomes

    {"id": "<scene_id>-<object_id>_<ann_id>",            # ScanRefer's own key
     "image": one view of the scene, "paired": {"scene": the scene folder},
     "conversations": [<image> + "Describe the <object name> in this room.", the description]}

`scenes` names a folder of ScanNet scene folders (posed_images, or OUT/media/scenes of a `scannet` run); samples
point into it, nothing is copied. Which view is the image: with `cameras` (ScanRefer's annotated viewpoints,
`annotated_cameras/<scene_id>.anns.json`: the camera `position` and `lookat` point the annotator used, in the
original, not axis-aligned, ScanNet frame) the view that looks most directly at `lookat` with it inside the image and
not hidden behind nearer depth; else (or when no view sees it) the view whose camera is nearest the annotated
position. Without `cameras` it is the scene's middle view, which need not show the object: ScanNet ships no
per-frame instance masks to tell. `meta.view_source` says which rule chose the view.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field

from moekit.config import StrictModel
from moekit.data.convert.scene_out import (
    View,
    axis_alignment,
    intrinsic_files,
    is_scene_folder,
    kept_views,
    read_json,
    read_matrix,
    scene_views,
)
from moekit.data.convert.sink import Context, Converted, LayoutError, Skipped
from moekit.data.scene import DEPTH_SCALE
from moekit.data.schema import Sample

WHAT = "a ScanRefer annotation file: a JSON list of {scene_id, object_id, object_name, ann_id, description}"
FIELDS: dict[str, tuple[type, ...]] = {
    "scene_id": (str,),
    "object_id": (str, int),
    "object_name": (str,),
    "ann_id": (str, int),
    "description": (str,),
}
OCCLUSION_MARGIN = 0.15  # metres: depth this much nearer than the point means something hides it


class Options(StrictModel):
    scenes: str = Field(description="folder of ScanNet scene folders <scene_id>/ (posed_images or a scannet output)")
    cameras: str | None = Field(None, description="ScanRefer's annotated viewpoints: folder of <scene_id>.anns.json")


def _records(src: Path) -> list[dict[str, Any]]:
    data = read_json(src, WHAT)
    if not isinstance(data, list):
        raise LayoutError(src, f"the top level is a {type(data).__name__}; expected {WHAT}")
    return data


def sample_id(rec: dict[str, Any]) -> str:
    return f"{rec['scene_id']}-{rec['object_id']}_{rec['ann_id']}"


@functools.lru_cache(maxsize=4)
def _cameras(folder: Path | None, scene_id: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(object_id, ann_id) -> annotated camera of one scene ({} without the option or the scene's file)."""
    if folder is None or not (folder / f"{scene_id}.anns.json").is_file():
        return {}
    file = folder / f"{scene_id}.anns.json"
    data = read_json(file, "a list of {object_id, ann_id, camera: {position, lookat}}")
    out = {}
    for i, entry in enumerate(data if isinstance(data, list) else [None]):
        camera = entry.get("camera") if isinstance(entry, dict) else None
        ok = isinstance(camera, dict) and all(
            isinstance(camera.get(k), list)
            and len(camera[k]) == 3
            and all(isinstance(x, int | float) for x in camera[k])
            for k in ("position", "lookat")
        )
        if not ok or "object_id" not in entry or "ann_id" not in entry:
            raise LayoutError(
                file, "expected {object_id, ann_id, camera: {position: [x, y, z], lookat: [x, y, z]}}", f"#{i}"
            )
        out[(str(entry["object_id"]), str(entry["ann_id"]))] = camera
    return out


def check_source(src: Path, opts: Options) -> None:
    scene_geometry.cache_clear()  # a new run reads the folders afresh
    _cameras.cache_clear()
    scenes = Path(opts.scenes)
    if not scenes.is_dir() or not any(is_scene_folder(p) for p in scenes.iterdir() if p.is_dir()):
        raise LayoutError(scenes, "expected a folder of ScanNet scene folders <scene_id>/ (option scenes)")
    if opts.cameras is not None and not Path(opts.cameras).is_dir():
        raise LayoutError(opts.cameras, "expected ScanRefer's annotated_cameras/ folder (<scene_id>.anns.json)")
    seen: set[str] = set()
    for i, rec in enumerate(_records(src)):
        for key, types in FIELDS.items():
            if not isinstance(rec, dict) or not isinstance(rec.get(key), types):
                raise LayoutError(
                    src, f"expected field {key!r} ({' or '.join(t.__name__ for t in types)}); {WHAT}", f"#{i}"
                )
        scene_id = rec["scene_id"]
        folder = scenes / scene_id
        if scene_id in seen or not folder.is_dir():
            continue
        seen.add(scene_id)
        scene_views(folder)
        if intrinsic_files(folder)[0] is None:
            raise LayoutError(folder, "expected intrinsic.txt (or intrinsic/intrinsic_color.txt)")
        _cameras(Path(opts.cameras) if opts.cameras else None, scene_id)


def count(src: Path, opts: Options) -> int:
    return len(_records(src))


@dataclass
class SceneGeometry:
    """The views of a scene folder with finite poses, in ScanNet's original frame, and the colour camera."""

    views: list[View]
    poses: np.ndarray  # [N, 4, 4] camera-to-world, axis alignment undone
    k: np.ndarray  # 3x3 at the colour size
    color_size: tuple[int, int]
    depth_size: tuple[int, int]


@functools.lru_cache(maxsize=2)
def scene_geometry(folder: Path) -> SceneGeometry | None:
    kept = kept_views(scene_views(folder), 1, None, folder.name)
    if not kept:
        return None
    unalign = np.linalg.inv(axis_alignment(folder))
    with Image.open(kept[0][0].color) as color, Image.open(kept[0][0].depth) as depth:
        sizes = color.size, depth.size
    k = read_matrix(intrinsic_files(folder)[0])[:3, :3]
    return SceneGeometry([v for v, _ in kept], np.stack([unalign @ p for _, p in kept]), k, *sizes)


def _depth_at(view: View, u: float, v: float, geo: SceneGeometry) -> float:
    (w, h), (dw, dh) = geo.color_size, geo.depth_size
    col = min(dw - 1, max(0, round((u + 0.5) * dw / w - 0.5)))
    row = min(dh - 1, max(0, round((v + 0.5) * dh / h - 0.5)))
    with Image.open(view.depth) as image:
        return float(np.asarray(image)[row, col]) / DEPTH_SCALE


def annotated_view(geo: SceneGeometry, camera: dict[str, Any]) -> tuple[int, str]:
    """(view index, rule): the view looking most directly at the annotated `lookat`, unoccluded, else the view
    whose camera is nearest the annotated position."""
    lookat, position = np.asarray(camera["lookat"], float), np.asarray(camera["position"], float)
    world_to_cam = np.linalg.inv(geo.poses)
    p = np.einsum("nij,j->ni", world_to_cam[:, :3, :3], lookat) + world_to_cam[:, :3, 3]
    z = p[:, 2]
    safe = np.where(z > 0, z, 1.0)
    u = geo.k[0, 0] * p[:, 0] / safe + geo.k[0, 1] * p[:, 1] / safe + geo.k[0, 2]
    v = geo.k[1, 1] * p[:, 1] / safe + geo.k[1, 2]
    w, h = geo.color_size
    seen = (z > 0.05) & (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)
    distance = np.linalg.norm(geo.poses[:, :3, 3] - position, axis=1)
    angle = np.arctan2(np.hypot(p[:, 0], p[:, 1]), z)
    candidates = sorted(np.flatnonzero(seen), key=lambda i: (angle[i], distance[i]))
    for i in candidates[:8]:
        d = _depth_at(geo.views[i], u[i], v[i], geo)
        if d == 0 or d >= z[i] - max(OCCLUSION_MARGIN, 0.1 * z[i]):
            return int(i), "annotated camera: sees the lookat point"
    if candidates:
        return int(candidates[0]), "annotated camera: lookat point in view, occluded"
    return int(np.argmin(distance)), "annotated camera: nearest camera position"


def records(src: Path, ctx: Context, opts: Options) -> Iterator[Converted | Skipped]:
    scenes = Path(opts.scenes)
    cameras = Path(opts.cameras) if opts.cameras else None
    items = sorted(enumerate(_records(src)), key=lambda item: item[1]["scene_id"])  # one scene's records together
    for _, rec in items:
        key = sample_id(rec)
        if ctx.is_done(key):
            continue
        folder = scenes / rec["scene_id"]
        if not folder.is_dir():
            yield Skipped(key, "scene folder not found under the scenes option")
            continue
        geo = scene_geometry(folder)
        if geo is None:
            yield Skipped(key, "no view of the scene has a finite pose")
            continue
        camera = _cameras(cameras, rec["scene_id"]).get((str(rec["object_id"]), str(rec["ann_id"])))
        index, rule = annotated_view(geo, camera) if camera else (len(geo.views) // 2, "middle view")
        name = rec["object_name"].replace("_", " ")
        yield Converted(
            Sample.model_validate(
                {
                    "id": key,
                    "image": ctx.rel(geo.views[index].color),
                    "paired": {"scene": ctx.rel(folder)},
                    "conversations": [
                        {"from": "human", "value": f"<image>\nDescribe the {name} in this room."},
                        {"from": "gpt", "value": rec["description"].strip()},
                    ],
                    "meta": {
                        "object_id": str(rec["object_id"]),
                        "object_name": rec["object_name"],
                        "view": geo.views[index].number,
                        "view_source": rule,
                    },
                }
            )
        )
