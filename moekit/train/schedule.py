"""Learning-rate schedules: linear warm-up, then cosine (optionally to a floor), constant, or linear decay.

transformers' schedule functions do the arithmetic; this module maps the recipe onto them. The multiplier of
step s (0-based, before the update of step s+1) during warm-up is s / warmup_steps, as in transformers.
"""

from __future__ import annotations

import math

import torch
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from moekit.recipe.schema import Schedule


def warmup_steps(schedule: Schedule, total_steps: int) -> int:
    if schedule.warmup_steps is not None:
        return min(schedule.warmup_steps, total_steps)
    return math.ceil((schedule.warmup_ratio or 0.0) * total_steps)


def build_scheduler(
    schedule: Schedule, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(schedule, total_steps)
    if schedule.kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if schedule.kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup, total_steps, min_lr_rate=schedule.min_lr_ratio
    )
