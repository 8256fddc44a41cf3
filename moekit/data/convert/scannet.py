"""`scannet`: ScanNet scenes as exported from their .sens files -> moekit scene folders under OUT/media/scenes/.

SRC is a folder of scenes (or one scene) in either released export:

    <scene_id>/color/<i>.jpg  depth/<i>.png  pose/<i>.txt  intrinsic/intrinsic_color.txt, intrinsic_depth.txt
        ScanNet's SensReader/python/reader.py (--export_color_images --export_depth_images --export_poses
        --export_intrinsics): every frame, colour 1296x968, depth 640x480 uint16 millimetres, poses 4x4
        camera-to-world in metres (`-inf` where tracking was lost), matrices written row by row with "%f".
    <scene_id>/00000.jpg 00000.png 00000.txt intrinsic.txt depth_intrinsic.txt
        EmbodiedScan's generate_image_scannet.py (`posed_images/`, what LLaVA-3D reads): the same files side by
        side, frame numbers zero-padded to 5 digits, every 10th frame with --fast.

Each scene becomes OUT/media/scenes/<scene_id>/ (color/ and depth/ hard-linked, pose/ rewritten, intrinsic.txt,
scene.json): frames whose number is a multiple of `every` (10 = the posed_images sampling), views with a non-finite
pose dropped, then at most `max_views` spread uniformly. With `scans` (ScanNet's `scans/` folder) poses are
multiplied by the scene's `axisAlignment` from `scans/<scene_id>/<scene_id>.txt`, the frame ScanRefer / Scan2Cap /
LLaVA-3D coordinates are given in. `intrinsics: depth` writes the depth camera's K scaled to the colour size, so
back-projecting the (resampled) depth lands exactly where the depth sensor measured (LLaVA-3D uses the depth
intrinsics for the same reason); `color` keeps ScanNet's colour K.

data.jsonl: empty with `describe: none` (a media conversion: point `llava-3d` / `scan2cap` at OUT/media/scenes);
with `describe: scene-type`, one sample per scene asking for its room type, answered by ScanNet's `sceneType`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from moekit.config import StrictModel
from moekit.data.convert.scene_out import (
    FileMode,
    View,
    intrinsic_files,
    is_scene_folder,
    kept_views,
    key_values,
    place,
    read_matrix,
    scene_views,
    write_matrix,
    write_record,
)
from moekit.data.convert.sink import Context, Converted, LayoutError, Skipped
from moekit.data.scene import scale_intrinsics
from moekit.data.schema import Sample

ROOM_PROMPT = "<video>\nWhat kind of room is this?"


class Options(StrictModel):
    every: int = Field(10, ge=1, description="keep frames whose number is a multiple of this")
    max_views: int | None = Field(None, ge=1, description="then at most this many views, spread uniformly")
    intrinsics: Literal["depth", "color"] = Field("depth", description="which camera's K the scene folder gets")
    scans: str | None = Field(None, description="ScanNet's scans/ folder: axis-align poses, room types")
    describe: Literal["none", "scene-type"] = Field("none", description="data.jsonl: nothing, or a room-type QA")
    files: FileMode = Field("link", description="hard-link unchanged colour/depth files, or copy them")

    @model_validator(mode="after")
    def _needs_scans(self) -> Options:
        if self.describe == "scene-type" and self.scans is None:
            raise ValueError(
                "describe: scene-type reads each scene's sceneType from ScanNet's scans/ folder: set scans"
            )
        return self


def scene_folders(src: Path) -> list[Path]:
    """SRC itself when it is a scene, else its sub-folders that hold views (sorted); `LayoutError` when none do."""
    if not src.is_dir():
        raise LayoutError(src, "expected a folder of ScanNet scenes (SensReader export or posed_images)")
    if is_scene_folder(src):
        return [src]
    found = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".") and is_scene_folder(p))
    if not found:
        raise LayoutError(
            src,
            "no scene folders: expected <scene_id>/color/<i>.jpg, depth/<i>.png, pose/<i>.txt (SensReader export) "
            "or <scene_id>/00000.jpg, 00000.png, 00000.txt (posed_images)",
        )
    return found


def scene_meta(path: Path) -> dict[str, str]:
    """ScanNet's per-scene `<scene_id>.txt` ("key = value" lines: axisAlignment, sceneType, colorWidth, ...)."""
    if not path.is_file():
        raise LayoutError(path, "expected ScanNet's scene metadata file (scans/<scene_id>/<scene_id>.txt)")
    return key_values(path)


def axis_align_matrix(meta: dict[str, str], path: Path) -> np.ndarray | None:
    """The 4x4 `axisAlignment` (row-major, applied as A @ X), None when the scene has none (ScanNet's test scenes)."""
    if "axisAlignment" not in meta:
        return None
    try:
        values = [float(x) for x in meta["axisAlignment"].split()]
    except ValueError:
        values = []
    if len(values) != 16:
        raise LayoutError(path, "expected 'axisAlignment = ' followed by 16 numbers")
    return np.asarray(values).reshape(4, 4)


def _intrinsics_file(folder: Path, which: str) -> Path:
    color, depth = intrinsic_files(folder)
    file = color if which == "color" else depth
    if file is None:
        names = "intrinsic.txt or intrinsic/intrinsic_color.txt"
        if which == "depth":
            names = "depth_intrinsic.txt or intrinsic/intrinsic_depth.txt (or pass intrinsics=color)"
        raise LayoutError(folder, f"expected the {which} intrinsics: {names}")
    return file


def check_source(src: Path, opts: Options) -> None:
    for folder in scene_folders(src):
        scene_views(folder)
        read_matrix(_intrinsics_file(folder, opts.intrinsics))
        if opts.scans is not None:
            path = Path(opts.scans) / folder.name / f"{folder.name}.txt"
            meta = scene_meta(path)
            axis_align_matrix(meta, path)
            if opts.describe == "scene-type" and not meta.get("sceneType"):
                raise LayoutError(path, "expected a 'sceneType = ...' line (describe: scene-type)")


def count(src: Path, opts: Options) -> int | None:
    return len(scene_folders(src)) if opts.describe != "none" else None


def scene_intrinsics(folder: Path, first: Path, first_depth: Path, which: str) -> np.ndarray:
    """4x4 K for the colour views: ScanNet's colour K, or the depth K scaled from the depth to the colour size."""
    k = read_matrix(_intrinsics_file(folder, which))
    if which == "color":
        return k
    with Image.open(first) as color, Image.open(first_depth) as depth:
        color_size, depth_size = color.size, depth.size
    out = np.eye(4)
    out[:3, :3] = scale_intrinsics(k[:3, :3], depth_size, color_size)
    return out


def write_scene(
    folder: Path,
    target: Path,
    opts: Options,
    kept: list[tuple[View, np.ndarray]],
    align: np.ndarray | None,
) -> None:
    """Fill `target` with the kept views of one source scene (module docstring)."""
    k = scene_intrinsics(folder, kept[0][0].color, kept[0][0].depth, opts.intrinsics)
    transform = np.eye(4) if align is None else align
    for view, pose in kept:
        stem = view.color.stem
        place(view.color, target / "color" / view.color.name, opts.files)
        place(view.depth, target / "depth" / f"{stem}.png", opts.files)
        write_matrix(target / "pose" / f"{stem}.txt", transform @ pose)
    write_matrix(target / "intrinsic.txt", k)
    write_record(
        target,
        {
            "format": "scannet",
            "scene_id": folder.name,
            "source": str(folder.resolve()),
            "frames": [view.number for view, _ in kept],
            "axis_aligned": align is not None,
            "axis_align_matrix": None if align is None else align.tolist(),
            "intrinsics": opts.intrinsics,
            "files": opts.files,
        },
    )


def records(src: Path, ctx: Context, opts: Options) -> Iterator[Converted | Skipped]:
    for folder in scene_folders(src):
        scene_id = folder.name
        if ctx.is_done(scene_id):
            continue
        meta, align = {}, None
        if opts.scans is not None:
            path = Path(opts.scans) / scene_id / f"{scene_id}.txt"
            meta = scene_meta(path)
            align = axis_align_matrix(meta, path)
        rel = Path("scenes") / scene_id
        if not (ctx.media / rel).is_dir():  # folders appear atomically: one that exists is complete
            kept = kept_views(scene_views(folder), opts.every, opts.max_views, scene_id)
            if not kept:
                yield Skipped(
                    scene_id, f"no view with a finite pose among frames numbered by multiples of {opts.every}"
                )
                continue
            with ctx.media_dir(rel) as tmp:
                write_scene(folder, tmp, opts, kept, align)
        if opts.describe == "scene-type":
            answer = meta["sceneType"].rstrip(".") + "."
            yield Converted(
                Sample.model_validate(
                    {
                        "id": scene_id,
                        "scene": ctx.rel(ctx.media / rel),
                        "conversations": [{"from": "human", "value": ROOM_PROMPT}, {"from": "gpt", "value": answer}],
                        "meta": {"source": "ScanNet sceneType"},
                    }
                )
            )
