"""Camera geometry of one image or video: depth, intrinsics, poses, checked; pixels lifted to world coordinates.

Pixel (i, j) is row i, column j (integer indices, as in the papers' formulas). Two formulas, one per paper:
PolyV eq. 12 with a camera-to-world matrix B, and Vid-LLM eq. 3 with a world-to-camera pose (R, t). For the
same camera they agree: B = [[R^-1, -R^-1 t], [0, 1]] (tests check it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Convention = Literal["cam_to_world", "world_to_cam"]


class GeometryError(ValueError):
    """Depth, intrinsics or a pose that cannot be right; the message names the frame and the check."""


@dataclass
class CameraGeometry:
    """Per-frame depth [F, H, W] (or [H, W]), intrinsics [3, 3] or [F, 3, 3], extrinsics [4, 4] or [F, 4, 4].

    `convention` says what the extrinsics map: `cam_to_world` (PolyV's B, ScanNet's pose files) or
    `world_to_cam` (Vid-LLM's [R | t]). Depth <= 0 or non-finite marks a pixel without a measurement.
    Construction validates everything (see `validate`), so a bad scene fails before any forward pass.
    """

    depth: torch.Tensor
    intrinsics: torch.Tensor
    extrinsics: torch.Tensor
    convention: Convention = "cam_to_world"
    tolerance: float = 1e-3

    def __post_init__(self) -> None:
        if self.depth.dim() == 2:
            self.depth = self.depth[None]
        frames = self.depth.shape[0]
        self.intrinsics = _per_frame(self.intrinsics, (3, 3), frames, "intrinsics")
        self.extrinsics = _per_frame(self.extrinsics, (4, 4), frames, "extrinsics")
        self.validate()

    @property
    def frames(self) -> int:
        return self.depth.shape[0]

    def validate(self) -> None:
        """Depth [F, H, W]; every K invertible; every pose rigid: R^T R = I, det R = +1, last row [0, 0, 0, 1]."""
        if self.depth.dim() != 3:
            raise GeometryError(f"depth must be [frames, H, W] or [H, W], got shape {tuple(self.depth.shape)}")
        if self.convention not in ("cam_to_world", "world_to_cam"):
            raise GeometryError(f"convention must be 'cam_to_world' or 'world_to_cam', got {self.convention!r}")
        for f in range(self.frames):
            check_intrinsics(self.intrinsics[f], f"frame {f}")
            check_rigid(self.extrinsics[f], f"frame {f} ({self.convention})", self.tolerance)

    def cam_to_world(self) -> torch.Tensor:
        """B [F, 4, 4] (camera-to-world) whatever the convention given."""
        return self.extrinsics if self.convention == "cam_to_world" else rigid_inverse(self.extrinsics)

    def world_to_cam(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(R [F, 3, 3], t [F, 3]) with x_cam = R x_world + t."""
        pose = self.extrinsics if self.convention == "world_to_cam" else rigid_inverse(self.extrinsics)
        return pose[:, :3, :3], pose[:, :3, 3]

    def valid(self) -> torch.Tensor:
        """[F, H, W] True where the depth is a measurement (finite and > 0)."""
        return torch.isfinite(self.depth) & (self.depth > 0)


def _per_frame(matrix: torch.Tensor, shape: tuple[int, int], frames: int, what: str) -> torch.Tensor:
    matrix = torch.as_tensor(matrix)
    if tuple(matrix.shape) == shape:
        return matrix.expand(frames, *shape)
    if matrix.dim() == 3 and tuple(matrix.shape[1:]) == shape and matrix.shape[0] in (1, frames):
        return matrix.expand(frames, *shape)
    raise GeometryError(
        f"{what} must be {list(shape)} or [frames={frames}, {shape[0]}, {shape[1]}], got {list(matrix.shape)}"
    )


def check_intrinsics(k: torch.Tensor, where: str) -> None:
    """Refuse a non-finite or (numerically) singular intrinsics matrix."""
    k64 = k.double()
    if not torch.isfinite(k64).all():
        raise GeometryError(f"intrinsics of {where} are not finite: {k.tolist()}")
    scale = k64.abs().max().clamp_min(1e-30)
    det = torch.linalg.det(k64 / scale)
    if det.abs() < 1e-9:
        raise GeometryError(
            f"intrinsics of {where} are not invertible (det ~ {float(det * scale**3):.3g}): {k.tolist()}; "
            "expected [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with fx, fy != 0"
        )


def check_rigid(pose: torch.Tensor, where: str, tolerance: float = 1e-3) -> None:
    """Refuse a pose that is not a rigid transform [[R, t], [0, 0, 0, 1]] with R a rotation (within tolerance)."""
    p = pose.double()
    if not torch.isfinite(p).all():
        raise GeometryError(
            f"pose of {where} is not finite (lost tracking is often marked with inf/nan): {pose.tolist()}"
        )
    last = p[3]
    if (last - p.new_tensor([0, 0, 0, 1])).abs().max() > tolerance:
        raise GeometryError(f"pose of {where} has last row {last.tolist()}, expected [0, 0, 0, 1]")
    r = p[:3, :3]
    error = (r.T @ r - torch.eye(3, dtype=p.dtype)).abs().max()
    if error > tolerance:
        raise GeometryError(
            f"pose of {where} is not rigid: max |R^T R - I| = {float(error):.3g} > {tolerance} "
            "(scaled or sheared rotation part)"
        )
    det = torch.linalg.det(r)
    if (det - 1).abs() > tolerance:
        raise GeometryError(f"pose of {where} has det R = {float(det):.4g}, expected +1 (a reflection, not a rotation)")


def rigid_inverse(pose: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms [..., 4, 4]: [[R^T, -R^T t], [0, 1]]."""
    r, t = pose[..., :3, :3], pose[..., :3, 3:]
    out = torch.zeros_like(pose)
    out[..., :3, :3] = r.transpose(-1, -2)
    out[..., :3, 3:] = -r.transpose(-1, -2) @ t
    out[..., 3, 3] = 1
    return out


def pixel_grid(height: int, width: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) row and column index of every pixel, each [H, W]."""
    i, j = torch.meshgrid(torch.arange(height, dtype=dtype), torch.arange(width, dtype=dtype), indexing="ij")
    return i, j


def world_coords(depth: torch.Tensor, intrinsics: torch.Tensor, cam_to_world: torch.Tensor) -> torch.Tensor:
    """PolyV eq. 12: `[x y z 1] = [D[i,j] * ([j i 1] @ inv(K).T), 1] @ B.T`, per pixel.

    depth [F, H, W], intrinsics [F, 3, 3], cam_to_world [F, 4, 4] -> world coordinates [F, H, W, 3].
    """
    frames, height, width = depth.shape
    dtype = torch.promote_types(depth.dtype, torch.float32)
    i, j = pixel_grid(height, width, dtype)
    pixels = torch.stack([j, i, torch.ones_like(i)], dim=-1)  # [H, W, 3]
    rays = torch.einsum("hwc,fdc->fhwd", pixels, torch.linalg.inv(intrinsics.to(dtype)))  # [j i 1] @ inv(K).T
    camera = depth.to(dtype)[..., None] * rays
    homogeneous = torch.cat([camera, torch.ones_like(camera[..., :1])], dim=-1)
    world = torch.einsum("fhwc,fdc->fhwd", homogeneous, cam_to_world.to(dtype))  # @ B.T
    return world[..., :3]


def back_project(
    depth: torch.Tensor, intrinsics: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor
) -> torch.Tensor:
    """Vid-LLM eq. 3: `P = R^-1 K^-1 [u, v, 1]^T D(u, v) - R^-1 t`, per pixel, with (R, t) world-to-camera.

    (u, v) is the pixel's (column, row), the same homogeneous pixel PolyV writes [j i 1].
    depth [F, H, W], intrinsics [F, 3, 3], rotation [F, 3, 3], translation [F, 3] -> points [F, H, W, 3].
    """
    frames, height, width = depth.shape
    dtype = torch.promote_types(depth.dtype, torch.float32)
    i, j = pixel_grid(height, width, dtype)
    pixels = torch.stack([j, i, torch.ones_like(i)], dim=-1)
    r_inv = torch.linalg.inv(rotation.to(dtype))
    m = r_inv @ torch.linalg.inv(intrinsics.to(dtype))  # R^-1 K^-1, [F, 3, 3]
    points = torch.einsum("fdc,hwc->fhwd", m, pixels) * depth.to(dtype)[..., None]
    return points - (r_inv @ translation.to(dtype)[..., None])[:, None, None, :, 0]
