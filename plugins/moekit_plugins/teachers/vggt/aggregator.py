"""VGGT's aggregator, written for moekit so the released checkpoint loads without the `vggt` package.

VGGT is neither in transformers nor on PyPI; this module rebuilds its feature trunk from the paper and the
released checkpoint's key layout (`aggregator.*`). Per frame, a DINOv2 ViT-L/14 with registers (`patch_embed`,
or a plain patch convolution) turns the image into patch tokens; a camera token and register tokens are put in
front (one learnt set for the first frame, another for all others); then `depth` pairs of blocks alternate
frame-wise attention (tokens of one frame) and global attention (tokens of all frames). Each pair's two outputs,
concatenated on channels, is what the official aggregator hands its heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit_plugins.teachers.common import IMAGENET_MEAN, IMAGENET_STD, normalize
from moekit_plugins.teachers.vggt.config import VGGTArch
from moekit_plugins.teachers.vggt.layers import Block, Rope2D

LAYER_SCALE_INIT = 0.01  # the released weights overwrite it; only matters for random test models


class PatchConv(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # [N, h*w, dim]


class DinoPatchEmbed(nn.Module):
    """DINOv2 with register tokens: patch tokens after its final norm (class and register outputs dropped)."""

    def __init__(self, arch: VGGTArch):
        super().__init__()
        dim, grid = arch.embed_dim, arch.img_size // arch.patch_size
        self.patch_embed = PatchConv(arch.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, arch.num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # in the checkpoint; unused without masking
        self.blocks = nn.ModuleList(
            Block(dim, arch.dino_num_heads, arch.mlp_ratio, eps=1e-6, layer_scale=1.0) for _ in range(arch.dino_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.registers = arch.num_register_tokens

    def _positions(self, rows: int, cols: int) -> torch.Tensor:
        """The position table resized (bicubic, antialiased, as DINOv2 does) to a rows x cols patch grid."""
        table = self.pos_embed.float()
        side = int((table.shape[1] - 1) ** 0.5)
        if (rows, cols) == (side, side):
            return table
        grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=True, align_corners=False)
        return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def forward(self, images: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self._positions(rows, cols).to(x.dtype)
        x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + self.registers :]


def _per_frame(token: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """`[1, 2, X, C]` learnt tokens -> `[batch * frames, X, C]`: variant 0 for frame 0, variant 1 for the rest."""
    first = token[:, :1].expand(batch, 1, *token.shape[2:])
    rest = token[:, 1:].expand(batch, frames - 1, *token.shape[2:])
    return torch.cat([first, rest], dim=1).reshape(batch * frames, *token.shape[2:])


class Aggregator(nn.Module):
    def __init__(self, arch: VGGTArch):
        super().__init__()
        self.arch = arch
        dim = arch.embed_dim
        self.patch_embed = DinoPatchEmbed(arch) if arch.patch_embed == "dinov2" else PatchConv(arch.patch_size, dim)
        self.rope = Rope2D(arch.rope_freq) if arch.rope_freq > 0 else None

        def blocks() -> nn.ModuleList:
            scale = LAYER_SCALE_INIT if arch.layer_scale else None
            return nn.ModuleList(
                Block(
                    dim,
                    arch.num_heads,
                    arch.mlp_ratio,
                    eps=1e-5,
                    layer_scale=scale,
                    qk_norm=arch.qk_norm,
                    rope=self.rope,
                )
                for _ in range(arch.depth)
            )

        self.frame_blocks = blocks()
        self.global_blocks = blocks()
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, arch.num_register_tokens, dim))

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        batch, frames, _, height, width = images.shape
        patch = self.arch.patch_size
        if height % patch or width % patch:
            raise ValueError(f"VGGT frames must be multiples of the patch size {patch}; got {height}x{width}")
        rows, cols = height // patch, width // patch
        flat = normalize(images, IMAGENET_MEAN, IMAGENET_STD).reshape(batch * frames, 3, height, width)
        if isinstance(self.patch_embed, DinoPatchEmbed):
            patches = self.patch_embed(flat, rows, cols)
        else:
            patches = self.patch_embed(flat)
        special = [_per_frame(self.camera_token, batch, frames), _per_frame(self.register_token, batch, frames)]
        tokens = torch.cat([*(t.to(patches.dtype) for t in special), patches], dim=1)
        # Patch (row, col) positions start at 1; the camera and register tokens sit at (0, 0).
        grid = torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).to(images.device) + 1
        pos = torch.cat([torch.zeros(self.arch.special_tokens, 2, dtype=grid.dtype, device=grid.device), grid])
        return tokens, pos.expand(batch * frames, -1, -1), (rows, cols)

    def forward(
        self, images: torch.Tensor, layers: list[int] | None = None
    ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], tuple[int, int]]:
        """`images` `[B, S, 3, H, W]` in [0, 1] (H, W multiples of the patch size).

        Returns `{layer: (frame_out, global_out)}` for the requested layers (default `[-1]`, the last; negative
        indices count from the end), each `[B, S, P, C]` with P = camera + registers + patches, and the patch grid
        (rows, cols). Layer i pairs frame block i with global block i, as the official aggregator's output list
        does; blocks after the last requested layer are not run.
        """
        batch, frames = images.shape[:2]
        depth, size = self.arch.depth, self.arch.aa_block_size
        requested = layers if layers is not None else [-1]
        if any(not -depth <= layer < depth for layer in requested):
            raise ValueError(
                f"layers {requested} out of range: the aggregator has {depth} (valid -{depth}..{depth - 1})"
            )
        wanted = {layer % depth for layer in requested}
        tokens, pos, grid = self._tokens(images)
        per_frame, dim = tokens.shape[1], tokens.shape[2]
        global_pos = pos.reshape(batch, frames * per_frame, 2)
        frame_outs: dict[int, torch.Tensor] = {}
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for start in range(0, max(wanted) + 1, size):
            tokens = tokens.reshape(batch * frames, per_frame, dim)
            for i in range(start, start + size):
                tokens = self.frame_blocks[i](tokens, pos)
                if i in wanted:
                    frame_outs[i] = tokens.reshape(batch, frames, per_frame, dim)
            tokens = tokens.reshape(batch, frames * per_frame, dim)
            for i in range(start, start + size):
                tokens = self.global_blocks[i](tokens, global_pos)
                if i in wanted:
                    outputs[i] = (frame_outs[i], tokens.reshape(batch, frames, per_frame, dim))
        return {layer: outputs[layer % depth] for layer in requested}, grid
