"""Learning-rate schedules against their closed forms."""

import math

import pytest
import torch

from moekit.recipe.schema import Schedule
from moekit.train.schedule import build_scheduler, warmup_steps


def lrs(schedule: Schedule, total: int, lr: float = 1.0) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(schedule, optimizer, total)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_then_cosine():
    values = lrs(Schedule(kind="cosine", warmup_ratio=0.2), total=10, lr=2e-5)
    warm = 2
    expected = [2e-5 * s / warm for s in range(warm)] + [
        2e-5 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (10 - warm))) for s in range(warm, 10)
    ]
    assert values == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert values[warm] == pytest.approx(2e-5)


def test_cosine_floor():
    values = lrs(Schedule(kind="cosine", warmup_steps=0, min_lr_ratio=0.1), total=5)
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 5)) for s in range(5)]
    assert values == pytest.approx(expected, rel=1e-9)


def test_warmup_then_constant():
    values = lrs(Schedule(kind="constant", warmup_ratio=0.05), total=40, lr=1e-5)
    assert warmup_steps(Schedule(kind="constant", warmup_ratio=0.05), 40) == 2
    assert values == pytest.approx([0.0, 0.5e-5] + [1e-5] * 38)


def test_polyv_stage_warmups_round_up():
    # Table 6: 3% and 5% of the steps; a fraction of a step still warms up for one.
    assert warmup_steps(Schedule(warmup_ratio=0.03), 1000) == 30
    assert warmup_steps(Schedule(warmup_ratio=0.05), 10) == 1
    assert warmup_steps(Schedule(), 10) == 0
