"""Sizes of VGGT's aggregator. The defaults are the released VGGT-1B; `VGGTArch.tiny()` is for tests."""

from __future__ import annotations

from typing import Literal

import pydantic

from moekit.config import StrictModel


class VGGTArch(StrictModel):
    """The aggregator's shape; it must match the checkpoint (mismatched tensors are named when loading)."""

    img_size: int = pydantic.Field(default=518, ge=1)  # the size the DINOv2 position table was trained at
    patch_size: int = pydantic.Field(default=14, ge=1)
    embed_dim: int = pydantic.Field(default=1024, ge=4)
    depth: int = pydantic.Field(default=24, ge=1)  # frame blocks = global blocks = depth
    num_heads: int = pydantic.Field(default=16, ge=1)
    mlp_ratio: float = pydantic.Field(default=4.0, gt=0)
    num_register_tokens: int = pydantic.Field(default=4, ge=0)
    qk_norm: bool = True
    rope_freq: float = 100.0  # <= 0 disables the 2D RoPE
    layer_scale: bool = True
    aa_block_size: int = pydantic.Field(default=1, ge=1)  # blocks of one kind before switching frame <-> global
    patch_embed: Literal["dinov2", "conv"] = "dinov2"
    dino_depth: int = pydantic.Field(default=24, ge=0)  # DINOv2 ViT-L/14 with registers
    dino_num_heads: int = pydantic.Field(default=16, ge=1)

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> VGGTArch:
        if self.embed_dim % self.num_heads or self.embed_dim % self.dino_num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads and dino_num_heads")
        if self.rope_freq > 0 and (self.embed_dim // self.num_heads) % 4:
            raise ValueError("with RoPE the head dimension (embed_dim / num_heads) must be a multiple of 4")
        if self.depth % self.aa_block_size:
            raise ValueError(f"depth={self.depth} must be divisible by aa_block_size={self.aa_block_size}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        return self

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def special_tokens(self) -> int:
        """Camera token plus register tokens, placed before each frame's patch tokens."""
        return 1 + self.num_register_tokens

    @classmethod
    def tiny(cls, **overrides) -> VGGTArch:
        """A few-thousand-parameter aggregator with the real structure, for tests."""
        sizes = dict(img_size=28, patch_size=7, embed_dim=16, depth=2, num_heads=2, num_register_tokens=2)
        return cls(**{**sizes, "dino_depth": 1, "dino_num_heads": 2, **overrides})
