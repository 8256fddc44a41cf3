"""Vid-LLM's 3D patches: back-project each visual token's pixels (eq. 3), encode the point with an MLP and add
it to the token (eq. 4)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from moekit.config import StrictModel
from moekit_plugins.position.feed import GeometryEncoder, token_width
from moekit_plugins.position.geometry import CameraGeometry, back_project


class VidLLMPatchParams(StrictModel):
    hidden: int = Field(256, ge=1, description="width of the coordinate MLP")
    coord_scale: float = Field(1.0, gt=0.0, description="multiplier of the coordinates before the MLP")
    zero_init: bool = Field(True, description="start the MLP's last layer at zero, so the model is unchanged at first")


class VidLLMPatchEncoder(GeometryEncoder):
    """T_3D = T + MLP(P): P is the mean back-projected point of the token's pixels with a depth measurement."""

    def __init__(self, params: VidLLMPatchParams, model: nn.Module | None = None, dim: int | None = None):
        super().__init__()
        dim = token_width(model, dim, "vidllm_3d_patch")
        self.params = params
        self.mlp = nn.Sequential(nn.Linear(3, params.hidden), nn.GELU(), nn.Linear(params.hidden, dim))
        if params.zero_init:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        if model is not None:
            self.attach(model)

    @staticmethod
    def points(geometry: CameraGeometry) -> torch.Tensor:
        rotation, translation = geometry.world_to_cam()
        return back_project(geometry.depth, geometry.intrinsics, rotation, translation)

    def encode(self, coords: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
        weight = self.mlp[0].weight
        out = self.mlp(coords.to(weight.device, weight.dtype) * self.params.coord_scale)
        return out * valid[:, None].to(out.dtype)
