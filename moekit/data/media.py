"""Load one sample's media: the student's images / video / scene, and the teacher's paired video / scene.

Teacher inputs per sample (the `teacher` entry of a batch, None when the sample has none):

    {"video": {"frames": float [T, 3, H, W] in [0, 1]},
     "scene": {"frames": [T, 3, H, W], "depth": [T, H, W] metres, "intrinsics": [T, 3, 3], "poses": [T, 4, 4]},
     "student": {"frames": [T, 3, H, W]},       # the sample's own images, or its video / scene views
     "features": {teacher_name: [N, D]}}        # from a feature cache, instead of the media it replaces

`student` is there only when asked for (`data.student_frames`: teachers with `input: student`, e.g. Vid-LLM's
geometry and semantic teachers, which see what the student sees); images of another size than the first are
resized to it.

Student geometry for a 3D scene (the `geometry` entry, None for other samples), aligned with the frames the
vision tower sees (resized, padded to a whole temporal patch by repeating the last view):

    {"depth": [T, H, W], "intrinsics": [3, 3], "poses": [T, 4, 4], "grid_thw": [3], "views": [T] view indices}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from moekit.data.config import FramesSpec
from moekit.data.frames import load_image, read_video
from moekit.data.scene import SceneFrames, read_scene, scale_intrinsics
from moekit.data.schema import Sample
from moekit.data.teacher_features import TeacherFeatureReader


@dataclass
class Media:
    images: list[Image.Image]
    clip: list[Image.Image] | None  # frames of the student's video or scene views
    scene: SceneFrames | None  # geometry of the student's scene
    teacher: dict[str, Any] | None


def resolve(root: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def frames_tensor(frames: list[Image.Image]) -> torch.Tensor:
    """PIL frames -> float [T, 3, H, W] in [0, 1]."""
    array = np.stack([np.asarray(f.convert("RGB")) for f in frames]).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def scene_tensors(scene: SceneFrames) -> dict[str, torch.Tensor]:
    count = len(scene.frames)
    return {
        "frames": frames_tensor(scene.frames),
        "depth": torch.from_numpy(scene.depth),
        "intrinsics": torch.from_numpy(scene.intrinsics).float().expand(count, 3, 3).contiguous(),
        "poses": torch.from_numpy(scene.poses).float(),
    }


def load_media(
    sample: Sample,
    root: Path,
    spec: FramesSpec,
    features: TeacherFeatureReader | None = None,
    student_frames: bool = False,
) -> Media:
    """Everything a sample refers to, decoded. Raises FileNotFoundError / ValueError / OSError on bad media."""
    images = [load_image(resolve(root, p)) for p in sample.image_paths]
    clip, scene = None, None
    if sample.clip is not None:
        kind, value = sample.clip
        if kind == "video":
            clip = read_video(resolve(root, value), spec)
        else:
            scene = read_scene(resolve(root, value), spec)
            clip = scene.frames
    teacher = _teacher(sample, root, spec, features)
    own = images + list(clip or [])
    if student_frames and own and not (teacher and "features" in teacher):
        size = own[0].size
        frames = [f if f.size == size else f.resize(size, Image.Resampling.BILINEAR) for f in own]
        teacher = {**(teacher or {}), "student": {"frames": frames_tensor(frames)}}
    return Media(images, clip, scene, teacher)


def _teacher(sample: Sample, root: Path, spec: FramesSpec, features: TeacherFeatureReader | None) -> dict | None:
    cached = features.teacher_features(sample.id) if features is not None else None
    if cached:
        return {"features": cached}
    if sample.paired is None:
        return None
    out: dict[str, Any] = {}
    if sample.paired.video is not None:
        out["video"] = {"frames": frames_tensor(read_video(resolve(root, sample.paired.video), spec))}
    if sample.paired.scene is not None:
        out["scene"] = scene_tensors(read_scene(resolve(root, sample.paired.scene), spec))
    return out


def student_geometry(
    scene: SceneFrames, size: tuple[int, int], grid: torch.Tensor, temporal_patch: int
) -> dict[str, torch.Tensor]:
    """Depth / intrinsics / poses matching the student's resized, temporally padded scene frames."""
    depth = [np.asarray(Image.fromarray(d).resize(size, resample=Image.Resampling.NEAREST)) for d in scene.depth]
    poses = list(scene.poses)
    views = list(scene.indices)
    while len(depth) % temporal_patch:
        depth.append(depth[-1])
        poses.append(poses[-1])
        views.append(views[-1])
    frame_size = scene.frames[0].size
    return {
        "depth": torch.from_numpy(np.stack(depth)),
        "intrinsics": torch.from_numpy(scale_intrinsics(scene.intrinsics, frame_size, size)).float(),
        "poses": torch.from_numpy(np.stack(poses)).float(),
        "grid_thw": grid.reshape(-1).clone(),
        "views": torch.tensor(views),
    }
