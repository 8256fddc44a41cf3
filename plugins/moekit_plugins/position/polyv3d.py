"""PolyV's 3D position encoding: world coordinates per pixel (eq. 12), averaged per visual token, encoded with
sinusoids and added to the visual tokens in LLM space."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from moekit.config import StrictModel
from moekit_plugins.position.feed import GeometryEncoder
from moekit_plugins.position.geometry import CameraGeometry, world_coords
from moekit_plugins.position.sinusoid import sinusoid


class PolyV3DParams(StrictModel):
    """Wavelengths are in the unit of the depth maps and poses (metres for ScanNet-style data)."""

    min_wavelength: float = Field(0.05, gt=0.0, description="shortest sinusoid wavelength")
    max_wavelength: float = Field(20.0, gt=0.0, description="longest sinusoid wavelength (about the scene size)")
    scale: float = Field(1.0, description="multiplier of the encoding before it is added to the tokens")

    @model_validator(mode="after")
    def _order(self) -> PolyV3DParams:
        if self.min_wavelength >= self.max_wavelength:
            raise ValueError(f"min_wavelength {self.min_wavelength} must be below max_wavelength {self.max_wavelength}")
        return self


class PolyV3DEncoder(GeometryEncoder):
    """Adds `scale * sinusoid(x, y, z)` of each visual token's mean world point to that token.

    A token's point is the mean of eq. 12 over the pixels it covers (Qwen2.5-VL: 28x28 pixels of 2 consecutive
    frames) that have a depth measurement; a token without any gets nothing added.
    """

    def __init__(self, params: PolyV3DParams, model: nn.Module | None = None):
        super().__init__()
        self.params = params
        if model is not None:
            self.attach(model)

    @staticmethod
    def points(geometry: CameraGeometry) -> torch.Tensor:
        return world_coords(geometry.depth, geometry.intrinsics, geometry.cam_to_world())

    def encode(self, coords: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
        """[N, 3] world points (and [N] validity) -> [N, dim] encoding; invalid tokens get zeros."""
        p = self.params
        return sinusoid(coords, dim, p.min_wavelength, p.max_wavelength) * p.scale * valid[:, None]
