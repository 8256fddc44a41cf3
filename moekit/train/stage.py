"""One training stage, from its starting model to its output: build the model (base, an earlier stage, a path,
or an upcycle step), attach position encoders, synergy heads, teachers and LoRA, train it, and write its output
for the stages that follow. `moekit.pipeline` runs the stages of a plan in order.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from torch import nn

from moekit.attach.position import META_FILE, META_KEY, as_refs, load_encoders, saved_refs
from moekit.attach.synergy import build_heads, inherit_heads, placeholder_tokens
from moekit.attach.teachers.batch import build_teachers
from moekit.config.provenance import Provenance
from moekit.recipe.load import Plan, PlannedStage
from moekit.recipe.schema import Distributed, Stage, StageRef
from moekit.train import embeddings
from moekit.train.engine import AccelerateEngine, Engine, Fsdp2Engine, bound_host_heap, process_state, resolve_mode
from moekit.train.groups import hf_model
from moekit.train.loop import EXTRAS, StageRun, train_stage
from moekit.train.module import TrainModule
from moekit.train.outputs import load_model, load_tokenizer, output_path, read_ffn_state, save_output
from moekit.train.sources import BatchRequest, BatchSource, get_batch_source
from moekit.upcycle import ExpertSpec, UpcycleSpec, upcycle


def stage_output(plan: Plan, planned: PlannedStage, name: str) -> Path:
    """Where the output of stage `name` is (in this plan, or beside `planned`'s own output on disk)."""
    other = plan.get(name)
    root = Path((other or planned).recipe.output_dir)
    return output_path(root / name)


def make_engine(
    config: Distributed, precision: str, grad_accum: int, micro_batch: int, max_grad_norm: float | None
) -> Engine:
    """The engine for `distributed.mode` (auto: single in one process, ddp in several). Chosen here, not in
    `engine`, which `deepspeed_engine` builds on: the DeepSpeed engine is imported only when asked for."""
    args = (config, precision, grad_accum, micro_batch, max_grad_norm)
    mode = resolve_mode(config, process_state().num_processes)
    if mode in ("single", "ddp"):
        return AccelerateEngine(*args, mode=mode)
    if mode == "fsdp2":
        return Fsdp2Engine(*args)
    from moekit.train.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(*args)


def build_start(plan: Plan, planned: PlannedStage, source: BatchSource, where: str) -> tuple[nn.Module, Path]:
    """The model a stage starts from and the directory its tokenizer/processor files come from."""
    start, recipe = planned.stage.start, planned.recipe
    bound_host_heap(resolve_mode(planned.stage.distributed, process_state().num_processes))  # before loading
    sharded = sharded_load(planned.stage)
    if start.kind == "base":
        return load_model(recipe.base, where=f"{planned.source}: base", sharded=sharded), Path(recipe.base)
    if start.kind == "path":
        return load_model(start.path, where=f"{where}.from.path", sharded=sharded), Path(start.path)
    if start.kind == "stage":
        path = stage_output(plan, planned, start.stage)
        return load_model(path, where=f"{where}.from.stage", sharded=sharded), path
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
    return upcycle(dense, upcycle_spec, sources=sources, calibration=calibration), base


def sharded_load(stage: Stage) -> bool:
    """Whether each process reads only its shard of the starting model's decoder layers: under FSDP2 and
    ZeRO-3 unless `distributed.load: whole`, and not with LoRA (peft would add its weights to layers still on
    the meta device). An upcycle step always builds from the whole dense model."""
    mode = resolve_mode(stage.distributed, process_state().num_processes)
    partitions = mode == "fsdp2" or (mode == "deepspeed" and stage.distributed.zero_stage == 3)
    return partitions and stage.distributed.load == "auto" and stage.lora is None


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
    plan: Plan,
    planned: PlannedStage,
    *,
    resume: bool = False,
    batch_source: BatchSource | None = None,
    accept_changes: tuple[str, ...] = (),
) -> Path:
    """Train one stage and write its output; every process of a distributed run calls this. On resume the
    recipe must match the checkpoint's, except for the `accept_changes` fields (moekit.train.checkpoint)."""
    stage, where = planned.stage, planned.where
    set_seed(stage.seed)
    source = batch_source or get_batch_source(stage, where)
    model, source_dir = build_start(plan, planned, source, where)
    tokenizer = load_tokenizer(source_dir)
    original_rows = model.get_input_embeddings().num_embeddings
    encoders, encoder_refs = _encoders(stage, where, model, source_dir)
    heads = build_heads(stage.losses.synergy, model, tokenizer, f"{where}.losses.synergy")
    inherit_heads(source_dir, heads, f"{where}.losses.synergy")
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
    run = StageRun(
        stage,
        planned.output_dir,
        module,
        engine,
        source,
        tokenizer,
        teachers,
        where,
        resume,
        source_dir,
        synergy_tokens=placeholder_tokens(heads),
        accept_changes=tuple(accept_changes),
    )
    position = train_stage(run)

    target = write_output(planned, engine, module, tokenizer, source_dir, position, encoder_refs, run.synergy_tokens)
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
    synergy_tokens: list[str] | None = None,
) -> Path:
    """Gather the trained weights (every process calls this) and write the stage output on the main process."""
    stage = planned.stage
    # Without LoRA to merge, a full save can take the decoder layers one tensor at a time (FSDP2).
    stream = engine.layer_stream() if stage.save == "full" and stage.lora is None else None
    state = engine.full_state_dict(skip=stream.saved if stream else ())
    target = output_path(planned.output_dir)
    if not engine.is_main:
        if stream is not None:
            stream.drain()
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
    record = Provenance(
        made_by="moekit run",
        stage=stage.name,
        recipe=planned.source,
        started_from=stage.start.model_dump(mode="json", exclude_none=True) or "base",
        steps=position.step,
        tokens=position.tokens,
        synergy_tokens=synergy_tokens or [],
        resumed=position.resumes,
    )
    return save_output(
        target,
        stage.save,
        save_model,
        embeddings.merged_state(model_state),
        heads=head_state,
        encoders=(encoder_refs or [], encoder_state),
        tokenizer=tokenizer,
        source_dir=source_dir,
        record=record,
        recipe=recipe,
        stream=stream,
    )


def _encoders(
    stage: Stage, where: str, model: nn.Module, source_dir: Path
) -> tuple[dict[str, nn.Module], list[dict[str, Any]]]:
    """The stage's position encoders (by default those saved with the model it starts from), attached to the
    model, with saved weights where name and parameters match; and their refs for the output's moekit.json."""
    if stage.position_encoders is None:
        refs = saved_refs(source_dir)
        loc = f"{where}.from: {source_dir / META_FILE}: {META_KEY}"
    else:
        refs = as_refs(stage.position_encoders)
        loc = f"{where}.position_encoders"
    return load_encoders(source_dir, hf_model(model), refs, where=loc), refs


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
