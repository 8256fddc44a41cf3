"""What a parsed plan needs from the machine it runs on: the files its plug-in components name (teacher
checkpoints...) must exist, unless a pipeline's `prepare:` step will write them. Parsing checks the YAML itself
(names, keys, types); this runs before `moekit run` starts and in `moekit validate`."""

from __future__ import annotations

from moekit.config import ConfigError
from moekit.plugins.refs import ComponentRef
from moekit.recipe.load import Plan, PlannedStage
from moekit.recipe.schema import Stage


def stage_refs(stage: Stage) -> list[tuple[str, ComponentRef]]:
    """(YAML path below the stage, ref) of every plug-in component a stage names."""
    refs: list[tuple[str, ComponentRef]] = [(f"losses.synergy[{i}]", h) for i, h in enumerate(stage.losses.synergy)]
    refs += [(f"teachers.{slot}", t) for slot, t in stage.teachers.items()]
    refs += [(f"position_encoders[{i}]", e) for i, e in enumerate(stage.position_encoders or [])]
    return refs


def environment_problems(plan: Plan, stages: list[PlannedStage] | None = None) -> list[str]:
    """Problems of the stages' component params once paths are checked, each with its YAML path."""
    pending = [step.out for step in plan.pipeline.prepare] if plan.pipeline is not None else []
    context = {"pending_paths": pending}
    problems = []
    for planned in plan.stages if stages is None else stages:
        for loc, ref in stage_refs(planned.stage):
            try:
                ref.check(context)
            except ConfigError as exc:
                problems += [f"{planned.where}.{loc}.params.{p}: {m}" for p, m in exc.problems]
    return problems
