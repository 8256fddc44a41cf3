"""Attention backend choice: flash-attn when asked for and installed, else sdpa with a note on the extra."""

from __future__ import annotations

import importlib.util
import warnings

import torch

FLASH = ("flash_attention_2", "flash_attention_3")


def resolve_attn_implementation(requested: str | None) -> str | None:
    """The attention implementation to pass to transformers.

    flash-attn is an optional extra (`pip install "moekit[flash]"`, GPU only). When it is requested but missing,
    or no CUDA device is present, moekit falls back to `sdpa` and says why instead of failing.
    """
    if requested not in FLASH:
        return requested
    if importlib.util.find_spec("flash_attn") is None:
        warnings.warn(
            f'{requested} needs flash-attn: install it with pip install "moekit[flash]" (GPU only); using sdpa',
            stacklevel=2,
        )
        return "sdpa"
    if not torch.cuda.is_available():
        warnings.warn(f"{requested} needs a CUDA device; none is available, using sdpa", stacklevel=2)
        return "sdpa"
    return requested
