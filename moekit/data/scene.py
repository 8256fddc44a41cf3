"""Multi-view 3D scenes in a ScanNet-style folder: frames for the student, depth / intrinsics / poses for geometry.

Layout (what the ScanNet SensReader export writes; moekit's synthetic scenes use the same):

    scene/
      color/0.jpg 1.jpg ...        RGB views (.jpg or .png), natural order
      depth/0.png 1.png ...        uint16 depth in millimetres (0 = no depth), same stems as color/
      pose/0.txt 1.txt ...         4x4 camera-to-world matrix (OpenCV camera: x right, y down, z forward)
      intrinsic.txt                3x3 or 4x4 colour intrinsics (pixel (j, i) is column j, row i)
        or intrinsic/intrinsic_color.txt

or the flat `posed_images/<scene_id>/` layout the 3D VLMs use for ScanQA / SQA3D (EmbodiedScan's ScanNet export,
every 10th frame): `00000.jpg` colour, `00000.png` depth (mm), `00000.txt` pose side by side, plus
`intrinsic.txt` (colour, 4x4) and `depth_intrinsic.txt`.

Depth may have another resolution than colour (ScanNet: 640x480 vs 1296x968); it is taken as registered to the
colour view, resampled (nearest) to the size the frames are used at, and the intrinsics are scaled to that size,
so that PolyV's back-projection `[x y z 1] = [D[i,j] * ([j i 1] @ inv(K).T), 1] @ B.T` holds for the returned
arrays. Views whose pose is not finite (ScanNet marks lost tracking with -inf) are dropped before sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from moekit.data.config import FramesSpec
from moekit.data.frames import fit_within, list_frames, load_image, pick

DEPTH_SCALE = 1000.0  # depth PNG units per metre


@dataclass
class SceneFrames:
    """Sampled views of a scene. `depth` [T, H, W] metres and `intrinsics` [3, 3] match the frames' size."""

    frames: list[Image.Image]
    depth: np.ndarray
    intrinsics: np.ndarray
    poses: np.ndarray  # [T, 4, 4] camera-to-world
    indices: list[int]  # which views of the folder were used


def read_matrix(path: Path, shapes: tuple[tuple[int, int], ...] = ((4, 4),)) -> np.ndarray:
    """A whitespace-separated matrix file, checked against the allowed shapes."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    matrix = np.loadtxt(path, dtype=np.float64, ndmin=2)
    if matrix.shape not in shapes:
        raise ValueError(f"{path}: expected a matrix of shape {' or '.join(map(str, shapes))}, got {matrix.shape}")
    return matrix


def _intrinsics(folder: Path) -> np.ndarray:
    """The colour intrinsics as 3x3 (depth is taken as registered to colour, as ScanNet's export nearly is)."""
    shapes = ((3, 3), (4, 4))
    for file in (folder / "intrinsic.txt", folder / "intrinsic" / "intrinsic_color.txt"):
        if file.is_file():
            return read_matrix(file, shapes)[:3, :3]
    raise FileNotFoundError(f"scene {folder}: no intrinsic.txt (or intrinsic/intrinsic_color.txt)")


def scale_intrinsics(k: np.ndarray, old: tuple[int, int], new: tuple[int, int]) -> np.ndarray:
    """K for an image resized from (w, h) `old` to `new`, with pixel centres at integer coordinates."""
    sx, sy = new[0] / old[0], new[1] / old[1]
    out = k.copy()
    out[0, 0], out[1, 1] = k[0, 0] * sx, k[1, 1] * sy
    out[0, 1] = k[0, 1] * sx
    out[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
    out[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
    return out


def read_depth(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Depth in metres (float32 [H, W]); resampled (nearest) to `size` = (w, h) when given."""
    if not path.is_file():
        raise FileNotFoundError(f"depth map {path} not found")
    with Image.open(path) as image:
        if image.mode not in ("I;16", "I", "I;16B", "L"):
            raise ValueError(f"depth map {path}: expected a 16-bit PNG in millimetres, got mode {image.mode}")
        if size is not None and image.size != size:
            image = image.resize(size, resample=Image.Resampling.NEAREST)
        return (np.asarray(image).astype(np.float64) / DEPTH_SCALE).astype(np.float32)


def scene_layout(folder: Path) -> tuple[list[Path], Path, Path]:
    """(colour views, pose folder, depth folder) of either scene layout (module docstring)."""
    if (folder / "color").is_dir():
        return list_frames(folder / "color"), folder / "pose", folder / "depth"
    colors = [p for p in list_frames(folder) if p.suffix.lower() in (".jpg", ".jpeg")]
    if not colors:
        raise FileNotFoundError(
            f"scene {folder}: neither a color/ folder nor posed images (00000.jpg + .png depth + .txt pose)"
        )
    return colors, folder, folder


def read_scene(folder: Path, spec: FramesSpec) -> SceneFrames:
    """Load a scene folder, sampling at most `spec.max_frames` views (uniform or key frames)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"scene folder {folder} not found")
    colors, pose_dir, depth_dir = scene_layout(folder)
    poses = [read_matrix(pose_dir / f"{c.stem}.txt") for c in colors]
    keep = [i for i, pose in enumerate(poses) if np.isfinite(pose).all()]
    if not keep:
        raise ValueError(f"scene {folder}: no view has a finite pose")
    thumbs = None
    if spec.sampling == "keyframe" and len(keep) > spec.max_frames:
        thumbs = np.stack([np.asarray(load_image(colors[i]).convert("L").resize((32, 32))) for i in keep])
    chosen = [keep[i] for i in pick(len(keep), spec, thumbs)]
    k_color = _intrinsics(folder)
    frames, depths, sizes = [], [], set()
    for i in chosen:
        original = load_image(colors[i])
        sizes.add(original.size)
        frame = fit_within(original, spec)
        frames.append(frame)
        depths.append(read_depth(depth_dir / f"{colors[i].stem}.png", frame.size))
    if len(sizes) > 1:
        raise ValueError(f"scene {folder}: views have different sizes {sorted(sizes)}")
    k = scale_intrinsics(k_color, sizes.pop(), frames[0].size)
    return SceneFrames(frames, np.stack(depths), k, np.stack([poses[i] for i in chosen]), chosen)


def write_scene(
    folder: Path, frames: list[np.ndarray], depth: np.ndarray, intrinsics: np.ndarray, poses: np.ndarray
) -> None:
    """Write views (uint8 [H, W, 3]), depth (metres [T, H, W]), K (3x3) and camera-to-world poses [T, 4, 4]."""
    for sub in ("color", "depth", "pose"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    k4 = np.eye(4)
    k4[:3, :3] = intrinsics
    np.savetxt(folder / "intrinsic.txt", k4, fmt="%.17g")
    millimetres = np.round(np.asarray(depth, dtype=np.float64) * DEPTH_SCALE)
    if millimetres.max(initial=0) > 65535:
        raise ValueError("depth beyond 65.535 m does not fit a uint16 PNG in millimetres")
    for t, frame in enumerate(frames):
        Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(folder / "color" / f"{t}.png")
        Image.fromarray(millimetres[t].astype(np.uint16)).save(folder / "depth" / f"{t}.png")
        np.savetxt(folder / "pose" / f"{t}.txt", poses[t], fmt="%.17g")
