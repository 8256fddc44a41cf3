"""Run a recipe chain: a pipeline's prepare steps, its stages in order, and the report after the last one."""

from moekit.pipeline.run import preflight, run_plan

__all__ = ["preflight", "run_plan"]
