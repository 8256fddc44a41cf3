"""Staged training: trainable groups, losses, schedules, distributed engines, checkpoints and stage outputs.

`moekit run recipe.yaml` (or `moekit.train.run_plan(moekit.recipe.load_plan(path))`) runs a recipe.
"""

from moekit.train.runner import run_plan, run_stage
from moekit.train.sources import BatchRequest, register_batch_source

__all__ = ["BatchRequest", "register_batch_source", "run_plan", "run_stage"]
