"""Transformer pieces of VGGT's aggregator, with parameter names matching the released checkpoint.

A block is pre-norm attention and MLP, each residual scaled by a learnt per-channel `ls*.gamma`:
    x = x + ls1(attn(norm1(x)));  x = x + ls2(mlp(norm2(x)))
Aggregator blocks normalise queries and keys per head (`attn.q_norm`, `attn.k_norm`) and rotate them with a 2D
RoPE over each token's (row, column) patch position; DINOv2 blocks have neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Rope2D(nn.Module):
    """Rotary embedding over 2D positions: the first half of each head's channels turns with the row index, the
    second half with the column index; within a half, channel i pairs with channel i + half/2 (rotate-half)."""

    def __init__(self, base: float):
        super().__init__()
        self.base = base

    def _rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        # 1 / base^(2i/dim), in this order: base^(-2i/dim) rounds some frequencies one ulp away from VGGT's, which
        # grows to ~7e-6 over the 24 layers (bench/parity_vggt.py); this form matches it bit for bit.
        inv_freq = 1.0 / self.base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
        angles = pos.to(torch.float32)[:, None, :, None] * inv_freq  # [B, 1, N, dim/2]
        angles = torch.cat([angles, angles], dim=-1)
        first, second = x.float().chunk(2, dim=-1)
        turned = torch.cat([-second, first], dim=-1)
        return (x.float() * angles.cos() + turned * angles.sin()).to(x.dtype)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """`x` `[B, heads, N, head_dim]`, `pos` `[B, N, 2]` integer (row, column)."""
        rows, cols = x.chunk(2, dim=-1)
        return torch.cat([self._rotate(rows, pos[..., 0]), self._rotate(cols, pos[..., 1])], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False, rope: Rope2D | None = None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        *,
        eps: float,
        layer_scale: float | None,
        qk_norm: bool = False,
        rope: Rope2D | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos))
        return x + self.ls2(self.mlp(self.norm2(x)))
