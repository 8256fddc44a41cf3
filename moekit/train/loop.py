"""The training loop of one stage, read top to bottom.

Per optimizer step: take `grad_accum` micro-batches from the batch source, count the answer tokens of the
whole step on every process, then for each micro-batch run the forward (model + synergy heads), weight the
loss terms and back-propagate (gradients are reduced only on the last micro-batch), then clip, update and
advance the schedule. CE is normalised by the answer tokens of the whole step, so accumulation and the number
of processes do not change the result (2 micro-batches of 1 == 1 batch of 2 == 2 processes with 1 each).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import send_to_device

from moekit.attach.teachers.batch import resolve_teacher
from moekit.config.record import MoeRecord
from moekit.moe.stats import RoutingStats
from moekit.recipe.schema import Group, Stage
from moekit.train.checkpoint import Position, latest_checkpoint, load_checkpoint, save_checkpoint, training_fields
from moekit.train.engine import Engine
from moekit.train.groups import hf_model, select, set_trainable
from moekit.train.logger import RunLogger
from moekit.train.module import LossWeights, TrainModule, compose
from moekit.train.schedule import build_scheduler
from moekit.train.sources import BatchRequest, BatchSource

EXTRAS = ("labels", "sample_ids", "sample_modalities", "teacher", "geometry")


@dataclass
class PhasePlan:
    name: str | None
    start: int  # first optimizer step (0-based)
    end: int  # one past the last step
    groups: list[Group]
    names: list[str] = field(default_factory=list)


@dataclass
class StageRun:
    """What the loop needs for one stage; built by `moekit.train.stage.run_stage`."""

    stage: Stage
    stage_dir: Path
    module: TrainModule
    engine: Engine
    source: BatchSource
    tokenizer: Any = None
    teachers: dict[str, Any] = field(default_factory=dict)
    where: str = "stage"
    resume: bool = False
    model_dir: Path | None = None
    synergy_tokens: list[str] = field(default_factory=list)
    accept_changes: tuple[str, ...] = ()  # recipe fields a resume may find changed (checkpoint.ACCEPTABLE)


def plan_phases(stage: Stage, total: int, where: str) -> list[PhasePlan]:
    """Step ranges of the stage's phases (one unnamed phase when the stage has `trainable`)."""
    if not stage.phases:
        return [PhasePlan(None, 0, total, list(stage.trainable or []))]
    plans, start = [], 0
    for index, phase in enumerate(stage.phases):
        if phase.steps is not None:
            length = phase.steps
        elif phase.fraction is not None:
            length = max(1, round(phase.fraction * total))
        else:
            length = total - start
        if length < 1 or start + length > total:
            raise ValueError(
                f"{where}.phases[{index}]: phase {phase.name!r} would run steps {start}..{start + length} "
                f"but the stage has {total} steps"
            )
        plans.append(PhasePlan(phase.name, start, start + length, list(phase.trainable)))
        start += length
    if start != total:
        raise ValueError(f"{where}.phases: the phases cover {start} of the stage's {total} steps")
    return plans


def total_steps(stage: Stage, source: BatchSource, request: BatchRequest, where: str) -> int:
    if stage.steps is not None:
        return stage.steps
    batches = source(request)
    if not hasattr(batches, "__len__"):
        raise ValueError(f"{where}.epochs: the batch source does not know its length; give steps instead")
    per_epoch = len(batches) // stage.grad_accum
    if per_epoch < 1:
        raise ValueError(f"{where}: an epoch has {len(batches)} micro-batches per process, fewer than grad_accum")
    return max(1, math.ceil(stage.epochs * per_epoch))


def train_stage(run: StageRun) -> Position:
    """Train one stage to its last step (resuming from its last checkpoint when asked); return the position."""
    stage, engine, module = run.stage, run.engine, run.module
    model = hf_model(module.model)

    def request(epoch: int, start: int) -> BatchRequest:
        return BatchRequest(
            stage=stage,
            model=model,
            tokenizer=run.tokenizer,
            batch_size=stage.batch_size,
            rank=engine.rank,
            world_size=engine.world_size,
            epoch=epoch,
            start=start,
            seed=stage.seed,
            model_dir=run.model_dir,
            synergy_tokens=run.synergy_tokens,
        )

    total = total_steps(stage, run.source, request(0, 0), run.where)
    phases = plan_phases(stage, total, run.where)
    for phase in phases:
        where = run.where + (f".phases[{phases.index(phase)}].trainable" if phase.name else ".trainable")
        phase.names = select(module, phase.groups, where)
    union = {n for phase in phases for n in phase.names}

    # Wrap with the first phase's trainable set: DDP and DeepSpeed fix what they reduce when they wrap.
    set_trainable(module, phases[0].names)
    engine.prepare(
        module,
        union,
        stage.optimizer,
        lambda optimizer: build_scheduler(stage.schedule, optimizer, total),
    )
    position = Position(world_size=engine.world_size, batch_size=stage.batch_size, grad_accum=stage.grad_accum)
    recipe = training_fields(stage)
    checkpoint = latest_checkpoint(run.stage_dir) if run.resume else None
    if checkpoint is not None:
        position = load_checkpoint(engine, checkpoint, position, recipe, run.accept_changes, run.where, stage)
        if position.step > total:
            raise ValueError(
                f"{run.where}.steps: the stage now has {total} steps, fewer than its checkpoint's {position.step} "
                f"({checkpoint}); give at least {position.step} steps, or start again without --resume"
            )
    logger = RunLogger(run.stage_dir, stage.name, total, engine.is_main, resume_step=position.step)
    logger.event(
        "stage_start" if checkpoint is None else "resume",
        step=position.step,
        steps=total,
        trainable=sum(p.numel() for n, p in module.named_parameters() if n in union),
        mode=engine.mode,
        world_size=engine.world_size,
        precision=stage.precision,
        checkpoint=str(checkpoint) if checkpoint else None,
        accepted=position.resumes[-1]["accepted"] if checkpoint else None,
    )

    weights = LossWeights.of(stage.losses, module.model)
    stats = RoutingStats(MoeRecord.of(model.config).experts) if module.is_moe else None
    batches = iter(run.source(request(position.epoch, position.batch)))
    current, active = None, phases[0]  # the phase being logged, the phase whose parameters have gradients
    window_tokens, window_start = 0, time.perf_counter()

    while position.step < total:
        phase = next(p for p in phases if p.start <= position.step < p.end)
        if phase is not current:
            if phase is not active:
                engine.set_trainable(set(phase.names))
                active = phase
            if phase.name is not None:
                logger.event("phase", step=position.step, phase=phase.name, trainable=[str(g) for g in phase.groups])
            current = phase

        # The step's micro-batches, crossing into the next epoch when one ends.
        micro = []
        while len(micro) < stage.grad_accum:
            try:
                micro.append(next(batches))
                position.batch += 1
            except StopIteration:
                if position.batch == 0:
                    raise ValueError(
                        f"{run.where}: the batch source produced no batches for epoch {position.epoch}"
                    ) from None
                position.epoch, position.batch = position.epoch + 1, 0
                batches = iter(run.source(request(position.epoch, 0)))
        missing = [sorted(b) for b in micro if "labels" not in b]
        if missing:
            raise ValueError(f"{run.where}: a batch has no labels (-100 except answer tokens); its keys: {missing[0]}")
        answer_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        seen_tokens = sum(
            int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in micro
        )
        step_counts = engine.all_reduce(torch.tensor([answer_tokens, seen_tokens], dtype=torch.float64))
        ce_scale = engine.world_size / max(float(step_counts[0]), 1.0)

        step_terms: dict[str, torch.Tensor] = {}  # summed over micro-batches, read only when logging
        lr = engine.lr()
        logging_step = (position.step + 1) % stage.log_every == 0 or position.step + 1 == total
        for index, batch in enumerate(micro):
            last = index == len(micro) - 1
            batch = dict(batch)
            labels, modalities, teacher = (
                batch.pop("labels"),
                batch.pop("sample_modalities", None),
                batch.pop("teacher", None),
            )
            batch.pop("sample_ids", None)
            geometry = batch.pop("geometry", None)
            inputs = send_to_device(batch, engine.device)
            teacher = resolve_teacher(send_to_device(teacher, engine.device), run.teachers)
            record = stats is not None and logging_step
            with engine.sync(last):
                with stats.recording(model) if record else contextlib.nullcontext(), engine.autocast():
                    terms = engine.forward(inputs, labels.to(engine.device), teacher, modalities, geometry)
                    loss = compose(terms, weights, ce_scale, 1.0 / stage.grad_accum)
                engine.backward(loss)
            engine.micro_step_done(last)
            for key, value in terms.items():
                step_terms[key] = step_terms.get(key, 0.0) + value.detach().double()
        grad_norm = engine.step()
        position.step += 1
        position.tokens += int(step_counts[1])
        window_tokens += int(step_counts[1])

        if logging_step:
            metrics = step_metrics(step_terms, engine, weights, len(micro))
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            metrics.update(lr=lr, grad_norm=grad_norm, tokens=position.tokens, tokens_per_s=window_tokens / elapsed)
            if stats is not None and stats.counts:
                metrics.update(routing_metrics(stats))
                stats = RoutingStats(stats.expert_names)
            logger.train(position.step, phase.name, metrics)
            window_tokens, window_start = 0, time.perf_counter()
        if stage.save_every and (position.step % stage.save_every == 0 or position.step == total):
            path = save_checkpoint(engine, run.stage_dir, position, stage.keep_checkpoints, recipe)
            logger.event("checkpoint", step=position.step, path=str(path))
    logger.event("stage_end", step=position.step, tokens=position.tokens)
    logger.close()
    return position


def step_metrics(
    step_terms: dict[str, torch.Tensor], engine: Engine, weights: LossWeights, micro_steps: int
) -> dict[str, float]:
    """Step-level loss values, averaged over micro-batches and processes (CE over the step's answer tokens), and
    their total weighted exactly as the back-propagated loss was."""
    keys = sorted(step_terms)
    values = engine.all_reduce(torch.stack([step_terms[k].reshape(()) for k in keys]))
    summed = dict(zip(keys, values.tolist()))
    ce = summed.pop("ce_sum") / max(summed.pop("ce_tokens"), 1.0)
    denominator = micro_steps * engine.world_size
    means = {k: v / denominator for k, v in summed.items()}
    metrics = {"loss/ce": ce}
    total = weights.ce * ce
    for key, value in means.items():
        metrics[f"loss/{key}"] = value
        total += weights.weight(key) * value
        if key == "load_balancing":
            metrics["routing/balance"] = value
    metrics["loss"] = total
    return metrics


def routing_metrics(stats: RoutingStats) -> dict[str, float]:
    """Share of top-k selections per expert, per token kind and over all kinds (this process's tokens)."""
    names = stats.expert_names or []
    out = {}
    counts = sum(stats.counts.values())
    overall = counts.sum(0).double()
    for expert, share in enumerate((overall / overall.sum()).tolist()):
        out[f"routing/share/all/{names[expert] if expert < len(names) else expert}"] = share
    for kind, shares in stats.shares().items():
        for expert, share in enumerate(shares):
            out[f"routing/share/{kind}/{names[expert] if expert < len(names) else expert}"] = share
    return out
