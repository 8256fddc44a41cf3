"""Sinusoidal features of real-valued positions (metric 3D coordinates, frame indices)."""

from __future__ import annotations

import math

import torch


def sinusoid(values: torch.Tensor, dim: int, min_wavelength: float, max_wavelength: float) -> torch.Tensor:
    """[..., A] positions -> [..., dim] features: per axis, sin and cos at wavelengths spaced geometrically
    from `max_wavelength` down to `min_wavelength` (in the positions' own unit, e.g. metres or frames).

    Axis a fills channels [2n*a, 2n*(a+1)) with n = dim // (2A) (sines then cosines); leftover channels are 0.
    """
    axes = values.shape[-1]
    n = dim // (2 * axes)
    if n < 1:
        raise ValueError(f"a sinusoidal encoding of {axes} axes needs dim >= {2 * axes}, got {dim}")
    if n == 1:
        wavelengths = torch.tensor([max_wavelength], dtype=torch.float64)
    else:
        ratio = math.log(min_wavelength / max_wavelength) / (n - 1)
        wavelengths = max_wavelength * torch.exp(torch.arange(n, dtype=torch.float64) * ratio)
    frequencies = (2 * math.pi / wavelengths).to(values.device)
    angles = values.double()[..., None] * frequencies  # [..., A, n]; float64: metres x 100 rad/m stay exact
    features = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2).float()  # [..., A * 2n]
    return torch.nn.functional.pad(features, (0, dim - features.shape[-1]))
