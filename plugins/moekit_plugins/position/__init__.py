"""Built-in position encoders: PolyV 3D sinusoidal, temporal frame embedding, NEO-ov native RoPE, Vid-LLM 3D
patches. Registered through the `moekit` entry-point group (`position = "moekit_plugins.position"`)."""

from __future__ import annotations

from moekit import Component, hookimpl
from moekit_plugins.position.geometry import CameraGeometry, GeometryError, back_project, world_coords
from moekit_plugins.position.neo_attention import NeoNativeRope
from moekit_plugins.position.neo_rope import NativeRope, NativeRopeParams
from moekit_plugins.position.polyv3d import PolyV3DEncoder, PolyV3DParams
from moekit_plugins.position.temporal import TemporalFrameEncoder, TemporalParams
from moekit_plugins.position.vidllm import VidLLMPatchEncoder, VidLLMPatchParams

__all__ = [
    "CameraGeometry",
    "GeometryError",
    "NativeRope",
    "NeoNativeRope",
    "PolyV3DEncoder",
    "TemporalFrameEncoder",
    "VidLLMPatchEncoder",
    "back_project",
    "world_coords",
]


@hookimpl
def moekit_position_encoders() -> list[Component]:
    return [
        Component(
            "polyv_3d",
            "position_encoder",
            PolyV3DParams,
            PolyV3DEncoder,
            "PolyV: sinusoids of each visual token's world point (depth + intrinsics + camera-to-world pose)",
        ),
        Component(
            "temporal_frame",
            "position_encoder",
            TemporalParams,
            TemporalFrameEncoder,
            "per-frame embedding (sinusoidal or learned) added to video tokens",
        ),
        Component(
            "neo_native_rope",
            "position_encoder",
            NativeRopeParams,
            _neo_native_rope,
            "NEO-ov: (t, h, w) RoPE with new H/W query/key channels and the mixed mask (Qwen2-VL, Qwen2.5-VL, Qwen3-VL); "
            "without a model, the index builder",
        ),
        Component(
            "vidllm_3d_patch",
            "position_encoder",
            VidLLMPatchParams,
            VidLLMPatchEncoder,
            "Vid-LLM: MLP of each visual token's back-projected point added to the token",
        ),
    ]


def _neo_native_rope(params: NativeRopeParams, model=None, **_) -> NativeRope | NeoNativeRope:
    """In a stage (`model=`): wired into the model's attention; from Python without one: the index builder."""
    return NativeRope(params) if model is None else NeoNativeRope(params, model)
