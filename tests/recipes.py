"""Helpers for training tests: a tiny saved base model and recipes built as dicts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from moekit.pipeline import run_plan
from moekit.plugins.registry import registry
from moekit.recipe import load_plan
from moekit.train.logger import read_metrics

TINY = {"kinds": ["text", "image"], "num_samples": 16}


def stage(name: str, **fields: Any) -> dict[str, Any]:
    """A stage on the tiny batch source, one step of lr 1e-2 unless overridden."""
    out = {
        "name": name,
        "data_source": "tiny",
        "data_params": copy.deepcopy(TINY),
        "optimizer": {"lr": 1e-2},
        "schedule": {"kind": "constant"},
        "steps": 1,
    }
    out.update(fields)
    return out


def write_recipe(tmp: Path, base: Path, stages: list[dict], name: str = "recipe.yaml", out: str = "runs") -> Path:
    path = tmp / name
    data = {"base": str(base), "output_dir": str(tmp / out), "stages": stages}
    path.write_text(f"# moekit run {path}\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def run(path: Path, *overrides: str, resume: bool = False, **kwargs: Any) -> list[Path]:
    return run_plan(load_plan(path, list(overrides)), resume=resume, **kwargs)


def losses(stage_dir: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(stage_dir / "logs" / "metrics.jsonl")]


def tiny_source(request):
    """The built-in `tiny` batch source for `request`'s stage (its data_params), as the trainer builds it."""
    return registry().build("batch_source", "tiny", request.stage.data_params, request=request)
