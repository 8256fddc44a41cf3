"""Run a validated plan: for each stage build its model (base, an earlier stage, a path, or an upcycle step),
attach position encoders, synergy heads, teachers and LoRA, train it, and write its output for the stages that
follow.

`run_plan(load_plan("recipe.yaml"))` is what `moekit run` does. Pass `batch_source=` to feed every stage from
your own function instead of the stage's `data_source` (see `moekit.train.sources`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from torch import nn

from moekit.recipe.load import Plan, PlannedStage
from moekit.recipe.schema import Stage, StageRef
from moekit.train import embeddings
from moekit.train.checkpoint import checkpoint_root, latest_checkpoint
from moekit.train.engine import make_engine, process_state
from moekit.train.groups import hf_model
from moekit.train.loop import EXTRAS, StageRun, train_stage
from moekit.train.module import TrainModule
from moekit.train.outputs import load_model, load_tokenizer, output_path, read_ffn_state, read_stage_meta, save_output
from moekit.train.sources import BatchRequest, BatchSource, get_batch_source
from moekit.train.teachers import build_teachers


def stage_output(plan: Plan, planned: PlannedStage, name: str) -> Path:
    """Where the output of stage `name` is (in this plan, or beside `planned`'s own output on disk)."""
    other = plan.get(name)
    root = Path((other or planned).recipe.output_dir)
    return output_path(root / name)


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
            if plan.get(ref) in selected:
                continue
            path = stage_output(plan, planned, ref)
            if read_stage_meta(path) is None:
                problems.append(f"{where}.from: stage {ref!r} has no output at {path}; run it first")
        if stage.start.path is not None and not Path(stage.start.path, "config.json").is_file():
            problems.append(f"{where}.from.path: {stage.start.path} is not a local checkpoint directory")
        stage_dir = planned.output_dir
        if not resume and read_stage_meta(output_path(stage_dir)) is not None:
            problems.append(f"{where}: {output_path(stage_dir)} already exists; pass --resume to skip finished stages")
        elif not resume and latest_checkpoint(stage_dir) is not None:
            problems.append(
                f"{where}: {checkpoint_root(stage_dir)} holds an interrupted run; pass --resume to continue"
            )
        problems += component_problems(stage, where)
        if stage.distributed.mode == "deepspeed":
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                problems.append(
                    f"{where}.distributed.mode: deepspeed is not installed (pip install 'moekit[deepspeed]')"
                )
        if stage.lora is not None and stage.distributed.mode in ("fsdp2", "deepspeed"):
            problems.append(f"{where}.lora: LoRA stages run in single or ddp mode")
    if problems:
        raise ValueError("the plan cannot run:\n  " + "\n  ".join(problems))
    return selected


def component_problems(stage: Stage, where: str, pending: Iterable[str] = ()) -> list[str]:
    """Unknown plug-in components or bad parameters, found before any model is loaded (`pending`: folders the
    pipeline's prepare steps will create)."""
    from moekit.config import ConfigError, parse_config
    from moekit.registry import registry

    wanted = [
        ("synergy_head", h.name, h.params, f"{where}.losses.synergy[{i}]") for i, h in enumerate(stage.losses.synergy)
    ]
    wanted += [("teacher", t.name, t.params, f"{where}.teachers.{slot}") for slot, t in stage.teachers.items()]
    encoders = stage.position_encoders or []
    wanted += [
        ("position_encoder", e.name, e.params, f"{where}.position_encoders[{i}]") for i, e in enumerate(encoders)
    ]
    problems = []
    for section, names in (
        ("losses.synergy", [h.name for h in stage.losses.synergy]),
        ("position_encoders", [e.name for e in encoders]),
    ):
        if len(set(names)) != len(names):
            problems.append(f"{where}.{section}: each may appear once, got {names}")
    for kind, name, params, loc in wanted:
        try:
            component = registry().get(kind, name, loc)
            parse_config(component.params, params, source=loc, context={"pending_paths": list(pending)})
        except ConfigError as exc:
            problems += [f"{loc}.params.{p}: {m}" for p, m in exc.problems]
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def run_plan(
    plan: Plan, *, resume: bool = False, only: Iterable[str] = (), batch_source: BatchSource | None = None
) -> list[Path]:
    """Run the plan's stages in order (skipping finished ones on resume); return their output directories.

    A pipeline's `prepare:` steps run first (main process; the others wait for their folders) and its `report:`
    is written after the last stage when the whole plan ran.
    """
    pipeline = plan.pipeline
    if pipeline is not None and pipeline.prepare:
        _prepare(pipeline.prepare)
    selected = preflight(plan, resume, only)
    outputs = []
    for planned in selected:
        target = output_path(planned.output_dir)
        if resume and read_stage_meta(target) is not None:
            outputs.append(target)
            continue
        outputs.append(run_stage(plan, planned, resume=resume, batch_source=batch_source))
    if pipeline is not None and pipeline.report is not None and not only and main_process():
        from moekit.report import build_report

        stages = [(p.stage.name, p.output_dir) for p in plan.stages]
        outputs.append(build_report(pipeline.report, Path(plan.stages[0].recipe.base), stages))
    return outputs


def _prepare(steps: list, timeout: float = 3600.0) -> None:
    from moekit.recipe.prepare import run_prepare

    if main_process():
        run_prepare(steps)
        return
    deadline = time.monotonic() + timeout
    while not all(Path(step.out).exists() for step in steps):
        if time.monotonic() > deadline:
            raise TimeoutError("gave up waiting for the main process to write the pipeline's prepare: outputs")
        time.sleep(1.0)


def build_start(plan: Plan, planned: PlannedStage, source: BatchSource, where: str) -> tuple[nn.Module, Path]:
    """The model a stage starts from and the directory its tokenizer/processor files come from."""
    import moekit
    from moekit.upcycle import ExpertSpec, UpcycleSpec

    start, recipe = planned.stage.start, planned.recipe
    if start.kind == "base":
        return load_model(recipe.base, where=f"{planned.source}: base"), Path(recipe.base)
    if start.kind == "path":
        return load_model(start.path, where=f"{where}.from.path"), Path(start.path)
    if start.kind == "stage":
        path = stage_output(plan, planned, start.stage)
        return load_model(path, where=f"{where}.from.stage"), path
    spec = start.upcycle
    base = Path(recipe.base) if spec.base is None else _ref_path(plan, planned, spec.base)
    dense = load_model(base, where=f"{where}.from.upcycle.base")
    sources, experts = {}, []
    for index, expert in enumerate(spec.experts):
        path = None if expert.source == "base" else _ref_path(plan, planned, expert.source)
        if path is not None:
            sources[expert.name] = read_ffn_state(path, dense, f"{where}.from.upcycle.experts[{index}]")
        experts.append(ExpertSpec(**expert.model_dump(exclude={"source"}), source=str(path) if path else "base"))
    fields = spec.model_dump(exclude={"experts", "calibration_batches", "base"})
    upcycle_spec = UpcycleSpec(**fields, experts=experts, base=str(base))
    calibration = None
    if upcycle_spec.router.init == "prototype":
        calibration = _calibration(planned.stage, dense, source, spec.calibration_batches, base)
    return moekit.upcycle(dense, upcycle_spec, sources=sources, calibration=calibration), base


def _ref_path(plan: Plan, planned: PlannedStage, ref: str | StageRef) -> Path:
    return stage_output(plan, planned, ref.stage) if isinstance(ref, StageRef) else Path(ref)


def _calibration(
    stage: Stage, model: nn.Module, source: BatchSource, count: int, model_dir: Path
) -> list[dict[str, Any]]:
    """The first batches of the stage as one process would see them: every process must build the same
    router (FSDP2 shards each process's own copy)."""
    request = BatchRequest(
        stage, model, None, stage.batch_size, rank=0, world_size=1, epoch=0, seed=stage.seed, model_dir=model_dir
    )
    batches = []
    for batch in itertools.islice(source(request), count):
        batches.append({k: v for k, v in batch.items() if k not in EXTRAS or k == "sample_modalities"})
    return batches


def run_stage(
    plan: Plan, planned: PlannedStage, *, resume: bool = False, batch_source: BatchSource | None = None
) -> Path:
    """Train one stage and write its output; every process of a distributed run calls this."""
    stage, where = planned.stage, planned.where
    set_seed(stage.seed)
    source = batch_source or get_batch_source(stage.data_source, f"{where}.data_source")
    model, source_dir = build_start(plan, planned, source, where)
    tokenizer = load_tokenizer(source_dir)
    original_rows = model.get_input_embeddings().num_embeddings
    encoders, encoder_refs = _encoders(stage, where, model, source_dir)
    heads = _heads(stage, where, model, tokenizer)
    if any(g.name == "new_token_embeddings" for g in stage.all_groups()):
        embeddings.extend(model, original_rows)
    if stage.lora is not None:
        model = _lora(model, stage)
    if stage.experts_implementation is not None and hasattr(hf_model(model), "set_experts_implementation"):
        hf_model(model).set_experts_implementation(stage.experts_implementation)
    if stage.gradient_checkpointing:
        hf_model(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    module = TrainModule(model, heads, encoders)
    engine = make_engine(stage.distributed, stage.precision, stage.grad_accum, stage.batch_size, stage.max_grad_norm)
    teachers = build_teachers(stage.teachers, where, engine.device)
    run = StageRun(stage, planned.output_dir, module, engine, source, tokenizer, teachers, where, resume, source_dir)
    position = train_stage(run)

    target = write_output(planned, engine, module, tokenizer, source_dir, position, encoder_refs)
    engine.barrier()
    return target


def write_output(
    planned: PlannedStage,
    engine,
    module: TrainModule,
    tokenizer,
    source_dir: Path,
    position,
    encoder_refs: list[dict[str, Any]] | None = None,
) -> Path:
    """Gather the trained weights (every process calls this) and write the stage output on the main process."""
    stage = planned.stage
    state = engine.full_state_dict()
    target = output_path(planned.output_dir)
    if not engine.is_main:
        return target
    model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    head_state = {k.removeprefix("synergy_heads."): v for k, v in state.items() if k.startswith("synergy_heads.")}
    encoder_state = {
        k.removeprefix("position_encoders."): v for k, v in state.items() if k.startswith("position_encoders.")
    }
    trained = engine.unwrapped().model
    save_model = hf_model(trained)
    if stage.save == "lora_adapter":
        save_model = trained
    elif stage.lora is not None:
        save_model = trained.merge_and_unload()
        model_state = save_model.state_dict()
    embeddings.unwrap(save_model)
    recipe = planned.recipe.model_dump(mode="json", by_alias=True)
    recipe["stages"] = [stage.model_dump(mode="json", by_alias=True)]
    meta = {
        "stage": stage.name,
        "recipe": planned.source,
        "started_from": stage.start.model_dump(mode="json", exclude_none=True) or "base",
        "steps": position.step,
        "tokens": position.tokens,
    }
    return save_output(
        target,
        stage.save,
        save_model,
        embeddings.merged_state(model_state),
        heads=head_state,
        encoders=(encoder_refs or [], encoder_state),
        tokenizer=tokenizer,
        source_dir=source_dir,
        meta=meta,
        recipe=recipe,
    )


def _encoders(
    stage: Stage, where: str, model: nn.Module, source_dir: Path
) -> tuple[dict[str, nn.Module], list[dict[str, Any]]]:
    """The stage's position encoders (by default those saved with the model it starts from), attached to the
    model, with saved weights where name and parameters match; and their refs for the output's moekit.json."""
    from moekit.position import META_FILE, META_KEY, as_refs, load_encoders, saved_refs

    if stage.position_encoders is None:
        refs = saved_refs(source_dir)
        loc = f"{where}.from: {source_dir / META_FILE}: {META_KEY}"
    else:
        refs = as_refs(stage.position_encoders)
        loc = f"{where}.position_encoders"
    return load_encoders(source_dir, hf_model(model), refs, where=loc), refs


def _heads(stage: Stage, where: str, model: nn.Module, tokenizer: Any) -> dict[str, nn.Module]:
    """Synergy heads from the plug-in registry, prepared on the model (they may add tokens and resize)."""
    from moekit.registry import registry

    heads = {}
    for index, spec in enumerate(stage.losses.synergy):
        loc = f"{where}.losses.synergy[{index}]"
        head = registry().build("synergy_head", spec.name, spec.params, where=loc)
        if not isinstance(head, nn.Module):
            raise TypeError(f"{loc}: synergy head {spec.name!r} built a {type(head).__name__}, not a torch module")
        head.prepare(model, tokenizer)
        heads[spec.name] = head.float()
    return heads


def _lora(model: nn.Module, stage: Stage) -> nn.Module:
    import peft

    lora = stage.lora
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or None,
        target_parameters=lora.target_parameters or None,
    )
    return peft.get_peft_model(model, config)


def main_process() -> bool:
    return process_state().is_main_process
