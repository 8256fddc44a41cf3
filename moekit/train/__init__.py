"""Staged training: one stage from its starting model to its output (`stage`), the loop, trainable groups,
losses, schedules, distributed engines, checkpoints and stage outputs. `moekit.pipeline.run_plan` runs a plan's
stages in order.
"""

from moekit.config.deprecation import moved
from moekit.train.sources import BatchRequest
from moekit.train.stage import run_stage

__all__ = ["BatchRequest", "run_stage"]

# Moved in 0.2: running a whole plan (prepare, stages, report) is the pipeline's job.
__getattr__ = moved(__name__, {"run_plan": "moekit.pipeline.run"})
