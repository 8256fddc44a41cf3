"""NEO-ov native RoPE: separate (t, h, w) indices per token, T/H/W channel groups with their own base
frequencies, and the mixed attention mask (bidirectional inside a visual unit, causal across units).

Visual units are given per token as `units` [B, L]: 0 for text, k > 0 for the k-th image or frame of the sample
(each unit's tokens contiguous, in raster order over its `grids[b][k-1] = (H, W)` token grid).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from moekit.config import StrictModel


class NativeRopeParams(StrictModel):
    """Channel groups of the head: T keeps the LLM's own head dim and RoPE base; H and W are extra spatial
    channels (in a model: new query/key projections, see `neo_attention`)."""

    head_dim_t: int | None = Field(
        None, ge=2, description="channels rotated by t; None: the model's head dim (128 without a model)"
    )
    head_dim_h: int = Field(64, ge=2, description="channels rotated by the row index h")
    head_dim_w: int = Field(64, ge=2, description="channels rotated by the column index w")
    theta_t: float | None = Field(None, gt=1.0, description="None: the model's rope_theta (1e6 without a model)")
    theta_h: float = Field(1e4, gt=1.0)
    theta_w: float = Field(1e4, gt=1.0)
    init_std: float = Field(0.02, gt=0.0, description="in a model: std of the new H/W query projections")

    @model_validator(mode="after")
    def _even(self) -> NativeRopeParams:
        odd = [n for n in ("head_dim_t", "head_dim_h", "head_dim_w") if (getattr(self, n) or 0) % 2]
        if odd:
            raise ValueError(f"{', '.join(odd)} must be even (RoPE rotates channel pairs)")
        return self


class NativeRope:
    """Index builder, rotary tables and mixed mask of NEO-ov (eq. 4 and 7)."""

    def __init__(self, params: NativeRopeParams):
        self.params = p = params
        head_dim_t = 128 if p.head_dim_t is None else p.head_dim_t
        theta_t = 1e6 if p.theta_t is None else p.theta_t
        self.groups = ((head_dim_t, theta_t), (p.head_dim_h, p.theta_h), (p.head_dim_w, p.theta_w))

    @property
    def head_dim(self) -> int:
        return sum(d for d, _ in self.groups)

    def index(
        self,
        units: torch.Tensor,
        grids: list[list[tuple[int, int]]],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[3, B, L] (t, h, w) per token: text advances t by one and has h = w = 0; all tokens of a unit share
        one t and take (row, column) inside the unit's grid; t continues after the unit. Padding gets zeros."""
        units = units.long()
        batch, length = units.shape
        valid = torch.ones_like(units, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        units = units.masked_fill(~valid, 0)
        previous = torch.nn.functional.pad(units, (1, 0), value=0)[:, :-1]
        starts = (units > 0) & (units != previous)
        self._check_units(units, starts, grids)
        steps = ((units == 0) & valid) | starts
        t = (steps.long().cumsum(-1) - 1).clamp_min(0)
        positions = torch.arange(length, device=units.device).expand(batch, length)
        start = torch.cummax(torch.where(starts, positions, torch.zeros_like(positions)), dim=-1).values
        rank = positions - start
        widths = torch.ones(batch, int(units.max()) + 1, dtype=torch.long, device=units.device)
        for b, sample in enumerate(grids):
            for k, (_, width) in enumerate(sample):
                if k + 1 < widths.shape[1]:
                    widths[b, k + 1] = width
        width = widths.gather(1, units)
        visual = units > 0
        h = torch.where(visual, rank // width, 0)
        w = torch.where(visual, rank % width, 0)
        t = torch.where(valid, t, 0)
        return torch.stack([t, h, w])

    @staticmethod
    def _check_units(units: torch.Tensor, starts: torch.Tensor, grids: list[list[tuple[int, int]]]) -> None:
        if len(grids) != units.shape[0]:
            raise ValueError(f"grids has {len(grids)} samples, units has {units.shape[0]}")
        for b in range(units.shape[0]):
            ids, counts = torch.unique(units[b][units[b] > 0], return_counts=True)
            for unit, count in zip(ids.tolist(), counts.tolist()):
                if int(starts[b][units[b] == unit].sum()) != 1:
                    raise ValueError(f"sample {b}: the tokens of visual unit {unit} are not contiguous")
                if unit > len(grids[b]):
                    raise ValueError(f"sample {b}: visual unit {unit} has no grid (grids[{b}] has {len(grids[b])})")
                height, width = grids[b][unit - 1]
                if height * width != count:
                    raise ValueError(f"sample {b}: visual unit {unit} has {count} tokens, its grid {height}x{width}")

    def cos_sin(self, index: torch.Tensor, groups: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """[3, B, L] indices -> cos, sin [B, L, head_dim]: group g holds `cat(f, f)` of its own frequencies
        `theta_g^(-2k/d_g)` times its own index (the rotate-half layout transformers uses). `groups=slice(1, 3)`
        gives the H and W tables only."""
        parts = []
        for (dim, theta), position in zip(self.groups[groups], index[groups]):
            inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=position.device) / dim)
            freqs = position.double()[..., None] * inv
            parts.append(torch.cat([freqs, freqs], dim=-1))
        angles = torch.cat(parts, dim=-1)
        return angles.cos().float(), angles.sin().float()

    def rotate(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: slice = slice(None)
    ) -> torch.Tensor:
        """Rotate queries or keys [B, heads, L, head_dim] group by group (q = [q^T; q^H; q^W], eq. 2)."""
        dims = [d for d, _ in self.groups[groups]]
        if x.shape[-1] != sum(dims):
            names = "+".join("THW"[groups])
            raise ValueError(f"head dim {x.shape[-1]} != {names} channel groups {sum(dims)}")
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
        out, offset = [], 0
        for dim in dims:
            part = x[..., offset : offset + dim]
            half = torch.cat([-part[..., dim // 2 :], part[..., : dim // 2]], dim=-1)
            out.append(part * cos[..., offset : offset + dim] + half * sin[..., offset : offset + dim])
            offset += dim
        return torch.cat(out, dim=-1)

    @staticmethod
    def mask(units: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 7, [B, L, L] bool: query i may see key j iff j <= i or (u_i == u_j > 0); padding keys never."""
        length = units.shape[-1]
        causal = torch.ones(length, length, dtype=torch.bool, device=units.device).tril()
        same_unit = (units[:, :, None] == units[:, None, :]) & (units[:, :, None] > 0)
        allowed = causal | same_unit
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, :]
        return allowed

    @staticmethod
    def additive(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[B, L, L] bool -> [B, 1, L, L] additive mask (0 where allowed, the dtype's minimum elsewhere)."""
        out = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return out[:, None]
