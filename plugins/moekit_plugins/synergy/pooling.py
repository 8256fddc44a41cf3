"""Teacher features pooled to a fixed number of tokens, and the checks every synergy head applies to them."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def pool_tokens(features: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, N, D] -> [B, k, D]: the valid tokens of each sample (all, or where `mask` [B, N] holds) split in
    order into k contiguous, near-equal chunks, each averaged. Teachers emit tokens in (time, row, column) or
    (frame, patch) order, so a chunk is a stretch of time or a group of views.

    A sample with no valid token pools to zeros (the caller masks it out); one with fewer than k is an error.
    """
    batch, length, dim = features.shape
    valid = torch.ones(batch, length, dtype=torch.bool, device=features.device) if mask is None else mask.bool()
    counts = valid.sum(-1)
    short = ((counts > 0) & (counts < k)).nonzero().flatten().tolist()
    if short:
        raise ValueError(
            f"teacher features of sample(s) {short} have fewer valid tokens ({counts[short].tolist()}) than {k}"
        )
    rank = valid.long().cumsum(-1) - 1
    chunk = (rank * k) // counts.clamp_min(1)[:, None]
    chunk = torch.where(valid, chunk, torch.full_like(chunk, k))  # invalid tokens go to a discarded bin
    sums = features.new_zeros(batch, k + 1, dim).scatter_add_(1, chunk[..., None].expand(-1, -1, dim), features)
    sizes = torch.zeros(batch, k + 1, device=features.device).scatter_add_(
        1, chunk, torch.ones_like(chunk, dtype=torch.float)
    )
    return sums[:, :k] / sizes[:, :k, None].clamp_min(1).to(features.dtype)


def last_hidden(hidden_states: torch.Tensor | tuple | list, layer: int = -1) -> torch.Tensor:
    """The [B, L, H] hidden states of `layer` from `outputs.hidden_states` (a tuple) or a tensor as is."""
    if isinstance(hidden_states, (tuple, list)):
        return hidden_states[layer]
    if hidden_states.dim() != 3:
        raise ValueError(
            f"hidden_states must be [B, L, H] or the model's tuple of them, got {tuple(hidden_states.shape)}"
        )
    return hidden_states


def check_teacher_keys(teacher: Mapping[str, object], paths: tuple[str, ...], head: str) -> None:
    """Refuse keys a head does not read (a typo would silently drop a loss term)."""
    allowed = {p + suffix for p in paths for suffix in ("", "_mask", "_tokens_mask")}
    unknown = sorted(set(teacher) - allowed)
    if unknown:
        raise ValueError(f"{head}: unknown teacher key(s) {unknown}; this head reads {sorted(allowed)}")


def sample_mask(teacher: Mapping[str, object], path: str, batch: int, device: torch.device) -> torch.Tensor:
    """[B] bool: samples that carry the `path` teacher (all when features are given without a mask)."""
    if teacher.get(path) is None:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    mask = teacher.get(f"{path}_mask")
    if mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask, device=device).bool()
    if mask.shape != (batch,):
        raise ValueError(f"teacher {path}_mask must be [batch={batch}] bools, got {tuple(mask.shape)}")
    return mask


def masked_mean(per_sample: torch.Tensor, active: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean of `per_sample` [B] over active samples; exactly 0 (still attached to `anchor`'s graph) when none."""
    if not bool(active.any()):
        return anchor.sum() * 0.0
    return per_sample[active].mean()
