"""Built-in distillation teachers, registered through the `moekit` entry point `teachers`.

    vjepa2   V-JEPA 2 video encoder (transformers' VJEPA2Model), temporal features
    vggt     VGGT aggregator (own implementation of the released checkpoint's layout), 3D features
    clip_vision  CLIP / SigLIP image encoder (transformers' CLIPVisionModel / SiglipVisionModel), semantic features

All follow `moekit.attach.teachers.interface`: `build(params)` returns an object with `name`, `dim`, `num_frames` and
`features(TeacherBatch) -> TeacherOutput` (features `[B, N, D]` plus grid, frames used and pooling). Params are
strict pydantic models; weights load only from the local `checkpoint` path. Importing this module is cheap: the
models load when a teacher is built.
"""

from __future__ import annotations

from moekit import Component, hookimpl
from moekit_plugins.teachers.clip_vision import ClipVisionParams, ClipVisionTeacher
from moekit_plugins.teachers.tiny import write_tiny_siglip, write_tiny_vggt, write_tiny_vjepa2
from moekit_plugins.teachers.vggt import VGGTParams, VGGTTeacher
from moekit_plugins.teachers.vjepa2 import VJEPA2Params, VJEPA2Teacher


@hookimpl
def moekit_teachers() -> list[Component]:
    return [
        Component(
            name="vjepa2",
            kind="teacher",
            params=VJEPA2Params,
            build=VJEPA2Teacher,
            description="V-JEPA 2 video encoder tokens (transformers VJEPA2Model), for video -> image distillation",
            tiny=write_tiny_vjepa2,
        ),
        Component(
            name="vggt",
            kind="teacher",
            params=VGGTParams,
            build=VGGTTeacher,
            description="VGGT aggregator tokens from the released checkpoint, for 3D -> image distillation",
            tiny=write_tiny_vggt,
        ),
        Component(
            name="clip_vision",
            kind="teacher",
            params=ClipVisionParams,
            build=ClipVisionTeacher,
            description="CLIP / SigLIP image encoder tokens per frame (transformers), a semantic teacher (Vid-LLM CTA)",
            tiny=write_tiny_siglip,
        ),
    ]
