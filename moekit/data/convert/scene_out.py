"""Shared by the 3D converters: reading ScanNet-style scene folders, writing moekit scene folders.

A scene folder moekit reads (`moekit.data.scene`) is either ScanNet's SensReader export (`color/<i>.jpg`,
`depth/<i>.png`, `pose/<i>.txt`, `intrinsic/intrinsic_color.txt`) or the flat `posed_images/<scene_id>/` layout
(`00000.jpg`, `00000.png`, `00000.txt`, `intrinsic.txt`, `depth_intrinsic.txt`). The converters write the first
layout with a 4x4 `intrinsic.txt` and a `scene.json` record of how the folder was made (which source frames, whether
poses are axis-aligned, which intrinsics). Unchanged colour and depth files are hard links to the source: ScanNet is
terabytes, a link costs no space and the files are never edited; a link across file systems falls back to a copy.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from moekit.data.convert.sink import LayoutError
from moekit.data.frames import uniform_indices

RECORD = "scene.json"
FileMode = Literal["link", "copy"]
COLOR_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class View:
    """One RGB-D view of a scene folder: its frame number and files."""

    number: int
    color: Path
    depth: Path
    pose: Path


def is_scene_folder(folder: Path) -> bool:
    """True when `folder` holds views in either ScanNet layout (it may still lack depth or poses)."""
    if (folder / "color").is_dir():
        return True
    return folder.is_dir() and any(p.suffix.lower() in (".jpg", ".jpeg") for p in folder.iterdir())


def scene_views(folder: Path) -> list[View]:
    """The views of a scene folder in frame order; `LayoutError` names the first missing depth map or pose."""
    if (folder / "color").is_dir():
        colors = [p for p in (folder / "color").iterdir() if p.suffix.lower() in COLOR_SUFFIXES]
        depth_dir, pose_dir, hint = folder / "depth", folder / "pose", "SensReader --export_depth_images/--export_poses"
    else:
        colors = [p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")]
        depth_dir = pose_dir = folder
        hint = "posed_images: <frame>.png depth and <frame>.txt pose beside each <frame>.jpg"
    if not colors:
        raise LayoutError(
            folder, "expected colour views color/<i>.jpg (SensReader export) or <frame>.jpg (posed_images)"
        )
    for sub, what in ((depth_dir, "depth"), (pose_dir, "pose")):
        if not sub.is_dir():
            raise LayoutError(sub, f"expected a {what} folder ({hint})")
    depths, poses = set(os.listdir(depth_dir)), set(os.listdir(pose_dir))
    views = []
    for color in colors:
        if not color.stem.isdigit():
            raise LayoutError(color, "expected numbered frames (<i>.jpg)")
        for names, sub, name, what in (
            (depths, depth_dir, f"{color.stem}.png", "a uint16 depth PNG in millimetres"),
            (poses, pose_dir, f"{color.stem}.txt", "a 4x4 camera-to-world pose"),
        ):
            if name not in names:
                raise LayoutError(sub / name, f"missing: every colour view needs {what} ({hint})")
        views.append(View(int(color.stem), color, depth_dir / f"{color.stem}.png", pose_dir / f"{color.stem}.txt"))
    return sorted(views, key=lambda v: v.number)


def intrinsic_files(folder: Path) -> tuple[Path | None, Path | None]:
    """(colour, depth) intrinsics files of a scene folder in either layout, None where absent."""
    color = next(
        (p for p in (folder / "intrinsic.txt", folder / "intrinsic" / "intrinsic_color.txt") if p.is_file()), None
    )
    depth = next(
        (p for p in (folder / "depth_intrinsic.txt", folder / "intrinsic" / "intrinsic_depth.txt") if p.is_file()), None
    )
    return color, depth


def key_values(path: Path) -> dict[str, str]:
    """The `key = value` lines of a calibration / metadata text file (ScanNet's `<scene>.txt`, 3RScan's
    `_info.txt`); other lines are ignored."""
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            out[key.strip()] = value.strip()
    return out


def read_matrix(path: Path, shape: tuple[int, int] = (4, 4), record: str | None = None) -> np.ndarray:
    """A whitespace-separated matrix; `LayoutError` when unreadable or of another shape (3x3 accepted for 4x4 K)."""
    try:
        matrix = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise LayoutError(path, f"expected a {shape[0]}x{shape[1]} matrix of numbers ({exc})", record) from None
    if matrix.shape == (3, 3) and shape == (4, 4):
        out = np.eye(4)
        out[:3, :3] = matrix
        return out
    if matrix.shape != shape:
        raise LayoutError(path, f"expected a {shape[0]}x{shape[1]} matrix, got {matrix.shape}", record)
    return matrix


def kept_views(views: list[View], every: int, max_views: int | None, record: str) -> list[tuple[View, np.ndarray]]:
    """(view, pose) of the views kept: frame number a multiple of `every`, finite pose, then at most `max_views`
    spread uniformly (first and last kept). Only the candidates' poses are read."""
    candidates = [v for v in views if v.number % every == 0]
    kept = [(v, p) for v in candidates if np.isfinite(p := read_matrix(v.pose, record=record)).all()]
    if max_views is not None and len(kept) > max_views:
        kept = [kept[i] for i in uniform_indices(len(kept), max_views)]
    return kept


def place(src: Path, dst: Path, mode: FileMode) -> None:
    """`dst` becomes a hard link to `src` (a copy where linking is impossible, or when `mode` is "copy")."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def write_matrix(path: Path, matrix: np.ndarray) -> None:
    """Full precision (17 significant digits): the values read back are the values written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, np.asarray(matrix, dtype=np.float64), fmt="%.17g")


def write_record(folder: Path, record: dict[str, Any]) -> None:
    (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")


def read_record(folder: Path) -> dict[str, Any]:
    """The `scene.json` a converter wrote, or {} for a folder it did not make (e.g. the user's posed_images)."""
    path = folder / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def axis_alignment(folder: Path) -> np.ndarray:
    """The axis alignment applied to a scene folder's poses (identity when none was)."""
    matrix = read_record(folder).get("axis_align_matrix")
    return np.asarray(matrix, dtype=np.float64) if matrix is not None else np.eye(4)


def subset_scene(source: Path, numbers: Iterable[int], target: Path, mode: FileMode) -> list[int]:
    """Write into `target` the views of scene folder `source` with the given frame numbers (links where possible);
    returns the numbers not found."""
    views = {v.number: v for v in scene_views(source)}
    wanted = list(dict.fromkeys(numbers))
    missing = [n for n in wanted if n not in views]
    if missing:
        return missing
    for n in wanted:
        view = views[n]
        place(view.color, target / "color" / view.color.name, mode)
        place(view.depth, target / "depth" / view.depth.name, mode)
        place(view.pose, target / "pose" / view.pose.name, mode)
    color_k, _ = intrinsic_files(source)
    if color_k is None:
        raise LayoutError(source, "expected intrinsic.txt (or intrinsic/intrinsic_color.txt)")
    write_matrix(target / "intrinsic.txt", read_matrix(color_k))
    write_record(target, {**read_record(source), "frames": wanted, "subset_of": str(source)})
    return []


@functools.lru_cache(maxsize=4)
def _json(path: str, mtime_ns: int, size: int) -> Any:
    with open(path) as fh:
        return json.load(fh)


def read_json(path: Path, what: str) -> Any:
    """A released JSON file, parsed once per run (check, count and conversion share it); errors name the file."""
    if not path.is_file():
        raise LayoutError(path, f"expected {what}")
    stat = path.stat()
    try:
        return _json(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except json.JSONDecodeError as exc:
        raise LayoutError(path, f"not valid JSON at line {exc.lineno} ({exc.msg}); expected {what}") from None
