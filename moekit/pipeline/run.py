"""Run a validated plan: its `prepare:` steps, every stage in order (skipping finished ones on resume), then its
report. `run_plan(load_plan("recipe.yaml"))` is what `moekit run` does. Pass `batch_source=` to feed every stage
from your own function instead of the stage's `data_source` (see `moekit.train.sources`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from moekit.config.provenance import read_provenance
from moekit.pipeline.checks import environment_problems
from moekit.pipeline.prepare import run_prepare
from moekit.pipeline.report import build_report, check_models
from moekit.recipe.load import Plan, PlannedStage
from moekit.train.checkpoint import ACCEPTABLE, checkpoint_root, latest_checkpoint
from moekit.train.outputs import output_path
from moekit.train.sources import BatchSource
from moekit.train.stage import main_process, run_stage, stage_output


def preflight(plan: Plan, resume: bool, only: Iterable[str] = ()) -> list[PlannedStage]:
    """Every check that can fail before anything is written; return the stages to run."""
    only = list(only)
    unknown = [n for n in only if plan.get(n) is None]
    if unknown:
        raise ValueError(f"--only names unknown stages {unknown}; this plan has {[s.stage.name for s in plan.stages]}")
    selected = [s for s in plan.stages if not only or s.stage.name in only]
    problems = []
    for planned in selected:
        stage, where = planned.stage, planned.where
        uses_base = stage.start.kind == "base" or (stage.start.upcycle is not None and stage.start.upcycle.base is None)
        if uses_base and not Path(planned.recipe.base, "config.json").is_file():
            problems.append(f"{planned.source}: base: {planned.recipe.base} is not a local checkpoint directory")
        for ref in stage.start.stage_refs():
            if plan.get(ref) in selected or plan.get(ref) is None:  # undefined names: environment_problems
                continue
            path = stage_output(plan, planned, ref)
            if read_provenance(path) is None:
                problems.append(f"{where}.from: stage {ref!r} has no output at {path}; run it first")
        if stage.start.path is not None and not Path(stage.start.path, "config.json").is_file():
            problems.append(f"{where}.from.path: {stage.start.path} is not a local checkpoint directory")
        stage_dir = planned.output_dir
        if not resume and read_provenance(output_path(stage_dir)) is not None:
            problems.append(f"{where}: {output_path(stage_dir)} already exists; pass --resume to skip finished stages")
        elif not resume and latest_checkpoint(stage_dir) is not None:
            problems.append(
                f"{where}: {checkpoint_root(stage_dir)} holds an interrupted run; pass --resume to continue"
            )
        if stage.distributed.mode == "deepspeed":
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                problems.append(
                    f"{where}.distributed.mode: deepspeed is not installed (pip install 'moekit[deepspeed]')"
                )
        if stage.lora is not None and stage.distributed.mode in ("fsdp2", "deepspeed"):
            problems.append(f"{where}.lora: LoRA stages run in single or ddp mode")
    problems += environment_problems(plan, selected)
    if problems:
        raise ValueError("the plan cannot run:\n  " + "\n  ".join(problems))
    return selected


def run_plan(
    plan: Plan,
    *,
    resume: bool = False,
    only: Iterable[str] = (),
    batch_source: BatchSource | None = None,
    accept_changes: Iterable[str] = (),
) -> list[Path]:
    """Run the plan's stages in order (skipping finished ones on resume); return their output directories.

    A pipeline's `prepare:` steps run first (main process; the others wait for their folders) and its `report:`
    is written after the last stage when the whole plan ran.
    """
    accept_changes = tuple(accept_changes)
    unknown = [f for f in accept_changes if f not in ACCEPTABLE]
    if unknown:
        raise ValueError(f"--accept-change {unknown[0]!r}: not a field a resume can take; choose from {ACCEPTABLE}")
    pipeline = plan.pipeline
    if pipeline is not None and pipeline.report is not None:
        check_models(pipeline.report, pipeline.evaluate, [p.stage.name for p in plan.stages])
    if pipeline is not None and pipeline.prepare:
        _prepare(pipeline.prepare)
    selected = preflight(plan, resume, only)
    outputs = []
    for planned in selected:
        target = output_path(planned.output_dir)
        if resume and read_provenance(target) is not None:
            outputs.append(target)
            continue
        outputs.append(
            run_stage(plan, planned, resume=resume, batch_source=batch_source, accept_changes=accept_changes)
        )
    if pipeline is not None and pipeline.report is not None and not only and main_process():
        stages = [(p.stage.name, p.output_dir) for p in plan.stages]
        base = Path(plan.stages[0].recipe.base)
        outputs.append(build_report(pipeline.report, base, stages, evaluate=pipeline.evaluate))
    return outputs


def _prepare(steps: list, timeout: float = 3600.0) -> None:
    if main_process():
        run_prepare(steps)
        return
    deadline = time.monotonic() + timeout
    while not all(Path(step.out).exists() for step in steps):
        if time.monotonic() > deadline:
            raise TimeoutError("gave up waiting for the main process to write the pipeline's prepare: outputs")
        time.sleep(1.0)
