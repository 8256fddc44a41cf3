"""What a parsed plan needs from the machine it runs on: the files its plug-in components name (teacher
checkpoints...) must exist, unless a pipeline's `prepare:` step will write them. Parsing checks the YAML itself
(names, keys, types); this runs before `moekit run` starts and in `moekit validate`."""

from __future__ import annotations

import difflib
from pathlib import Path

from moekit.config import ConfigError
from moekit.config.provenance import read_provenance
from moekit.io.atomic import check_writable
from moekit.io.overlap import check_apart
from moekit.plugins.refs import ComponentRef
from moekit.recipe.load import Plan, PlannedStage
from moekit.recipe.schema import Stage
from moekit.train.stage import stage_output


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
        problems += unknown_stage_refs(plan, planned)
        try:
            check_apart(planned.output_dir, stage_inputs(plan, planned))
            check_writable(planned.output_dir)
        except (ValueError, OSError) as exc:
            problems.append(f"{planned.where}: output_dir: {exc}")
    return problems


def unknown_stage_refs(plan: Plan, planned: PlannedStage) -> list[str]:
    """`{stage: NAME}` references to a stage this plan does not define and that has no output on disk (a typo)."""
    problems = []
    defined = [s.stage.name for s in plan.stages]
    for ref in planned.stage.start.stage_refs():
        path = stage_output(plan, planned, ref)
        if ref in defined or read_provenance(path) is not None:
            continue
        near = difflib.get_close_matches(ref, defined, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        problems.append(
            f"{planned.where}.from: no stage named {ref!r} in this plan (its stages: {', '.join(defined)}) and no "
            f"output of one at {path}{hint}"
        )
    return problems


def stage_inputs(plan: Plan, planned: PlannedStage) -> dict[str, str | Path | None]:
    """Every folder or file a stage reads, by YAML path (its output folder may overlap none of them)."""
    stage, where = planned.stage, planned.where
    inputs: dict[str, str | Path | None] = {"the recipe": planned.source, "base": planned.recipe.base}
    inputs[f"{where}.from.path"] = stage.start.path
    if stage.start.upcycle is not None:
        for label, path in stage.start.upcycle.input_paths.items():
            inputs[f"{where}.from.upcycle: {label}"] = path
    for ref in stage.start.stage_refs():
        inputs[f"{where}.from: stage {ref!r}"] = stage_output(plan, planned, ref)
    if stage.data is not None:
        for i, dataset in enumerate(stage.data.datasets):
            inputs[f"{where}.data.datasets[{i}].path"] = dataset.path
            inputs[f"{where}.data.datasets[{i}].media_root"] = dataset.media_root
        inputs[f"{where}.data.teacher_cache"] = stage.data.teacher_cache
    return inputs
