"""The recipe language: a base model, stages in order, and per stage what starts, what trains and how.

Every model here is strict (unknown keys are errors) and every problem is reported with its YAML path, e.g.
`stages[2].optimizer.lr: Input should be greater than 0`. docs/training.md documents every key.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from moekit.config import StrictModel
from moekit.data.config import DataConfig
from moekit.moe.experts import IMPLEMENTATIONS
from moekit.plugins import registry as plugin_registry
from moekit.plugins.refs import PositionEncoderRef, SynergyHeadRef, TeacherRef, checks_components
from moekit.recipe.prepare import PrepareStep
from moekit.upcycle.spec import ExpertSpec, UpcycleSpec

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

GroupName = Literal[
    "projector",
    "vision_tower",
    "embeddings",
    "new_token_embeddings",
    "lm_head",
    "decoder",
    "ffn",
    "router",
    "experts",
    "synergy_heads",
    "position_encoders",
    "lora",
    "all",
]
GROUP_NAMES: tuple[str, ...] = GroupName.__args__  # type: ignore[attr-defined]


def _check_name(value: str, what: str) -> str:
    if not NAME.match(value):
        raise ValueError(f"{what} names use letters, digits, '_', '-', '.' (e.g. stage1_1); got {value!r}")
    return value


class Group(StrictModel):
    """A trainable group: a name from `GROUP_NAMES` (written as a plain string) or `{pattern: REGEX}`, the
    parameters whose name (as in `model.named_parameters()`) matches the regular expression."""

    name: GroupName | None = None
    pattern: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            if data not in GROUP_NAMES:
                raise ValueError(f"unknown group {data!r}; valid: {', '.join(GROUP_NAMES)}, or {{pattern: REGEX}}")
            return {"name": data}
        return data

    @model_validator(mode="after")
    def _one(self) -> Group:
        if (self.name is None) == (self.pattern is None):
            raise ValueError("a group is a name or {pattern: REGEX}")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {exc}") from None
        return self

    def __str__(self) -> str:
        return self.name or f"pattern:{self.pattern}"


TrainableGroup = Group


class StageRef(StrictModel):
    """The output of a stage run earlier (in this recipe, an earlier recipe of the pipeline, or on disk)."""

    stage: str


class RecipeExpert(ExpertSpec):
    """An expert of an upcycle step; `source` may also name a stage: `{stage: stage1_2_image}`."""

    source: str | StageRef = Field("base", description="'base', a checkpoint directory, or {stage: NAME}")


class RecipeUpcycle(UpcycleSpec):
    """An `UpcycleSpec` whose `base` and expert sources may name earlier stages' outputs."""

    base: str | StageRef | None = Field(None, description="dense model to upcycle (default: the recipe's base)")
    experts: list[RecipeExpert] = Field(default_factory=list)
    calibration_batches: int = Field(8, ge=1, description="batches of the stage's data for router.init: prototype")

    def stage_refs(self) -> list[str]:
        refs = [self.base.stage] if isinstance(self.base, StageRef) else []
        return refs + [e.source.stage for e in self.experts if isinstance(e.source, StageRef)]


class StartFrom(StrictModel):
    """What a stage starts from: `base` (the recipe's base model), `{stage: NAME}`, `{path: DIR}` or
    `{upcycle: {...}}` (an MoE model built from dense checkpoints and earlier stages' FFNs)."""

    stage: str | None = None
    path: str | None = None
    upcycle: RecipeUpcycle | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            if data == "base":
                return {}
            raise ValueError("expected 'base', {stage: NAME}, {path: DIR} or {upcycle: {...}}")
        return data

    @model_validator(mode="after")
    def _one(self) -> StartFrom:
        given = [k for k in ("stage", "path", "upcycle") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of stage, path or upcycle, not {' and '.join(given)}")
        return self

    @property
    def kind(self) -> Literal["base", "stage", "path", "upcycle"]:
        return next((k for k in ("stage", "path", "upcycle") if getattr(self, k) is not None), "base")  # type: ignore[return-value]

    def stage_refs(self) -> list[str]:
        if self.stage is not None:
            return [self.stage]
        return self.upcycle.stage_refs() if self.upcycle is not None else []


class Phase(StrictModel):
    """A part of a stage with its own trainable groups (PolyV stage 2-1: router + alignment, then + experts).

    The optimizer, schedule and data stream run on across phases; only what receives gradients changes.
    """

    name: str
    steps: int | None = Field(None, ge=1, description="optimizer steps of this phase")
    fraction: float | None = Field(None, gt=0.0, le=1.0, description="share of the stage's steps")
    trainable: list[TrainableGroup] = Field(min_length=1)

    @model_validator(mode="after")
    def _length(self) -> Phase:
        if self.steps is not None and self.fraction is not None:
            raise ValueError("give steps or fraction, not both")
        return self


class Optimizer(StrictModel):
    """AdamW. Biases and other 1-D parameters (norms) get no weight decay unless `decay_1d`."""

    name: Literal["adamw"] = "adamw"
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    decay_1d: bool = False

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"betas must lie in [0, 1), got {list(value)}")
        return value


class Schedule(StrictModel):
    """Learning rate: linear warm-up, then cosine decay (to `min_lr_ratio * lr`), constant or linear decay."""

    kind: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_ratio: float | None = Field(None, ge=0.0, lt=1.0, description="share of the steps spent warming up")
    warmup_steps: int | None = Field(None, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine floor as a share of lr")

    @model_validator(mode="after")
    def _warmup(self) -> Schedule:
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise ValueError("give warmup_ratio or warmup_steps, not both")
        return self


class SynergyLoss(SynergyHeadRef):
    """A synergy head (plug-in kind `synergy_head`) whose named loss terms join the total."""

    weight: float = Field(1.0, ge=0.0, description="multiplies every term of this head")
    terms: dict[str, float] = Field(default_factory=dict, description="per-term weights (default 1.0 each)")


class TeacherSlot(TeacherRef):
    """The teacher of one batch slot and what it reads from each sample."""

    input: Literal["video", "scene", "student"] | None = Field(
        None,
        description="the sample's paired video, its paired scene, or the student's own frames (its images, or its "
        "video / scene views: Vid-LLM's teachers); default: the slot's name",
    )


class Losses(StrictModel):
    """Weights of the loss terms. CE counts answer tokens only (labels != -100)."""

    ce: float = Field(1.0, ge=0.0)
    load_balancing: float | None = Field(
        None, ge=0.0, description="alpha of L_aux; default: the aux_loss_coef the model was upcycled with"
    )
    z_loss: float | None = Field(None, ge=0.0, description="router z-loss weight; default: the model's z_loss_coef")
    synergy: list[SynergyLoss] = Field(default_factory=list)


class Lora(StrictModel):
    """LoRA adapters through peft; `save: full` merges them, `save: lora_adapter` writes only the adapter."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=list)
    target_parameters: list[str] = Field(default_factory=list, description="e.g. mlp.experts.gate_up_proj")

    @model_validator(mode="after")
    def _targets(self) -> Lora:
        if not self.target_modules and not self.target_parameters:
            raise ValueError("name target_modules (e.g. [q_proj, v_proj]) or target_parameters")
        return self


class Distributed(StrictModel):
    """How the stage runs on several processes (launch them with torchrun or accelerate launch).

    `auto` is `single` in one process and `ddp` in several.
    """

    mode: Literal["auto", "single", "ddp", "fsdp2", "deepspeed"] = "auto"
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    deepspeed_config: str | None = Field(None, description="DeepSpeed JSON/YAML merged under the recipe's values")
    reshard_after_forward: bool = Field(True, description="FSDP2: free gathered weights after forward (ZeRO-3)")
    load: Literal["auto", "whole"] = Field(
        "auto", description="FSDP2, ZeRO-3: auto reads each process's part of the decoder layers; whole loads all first"
    )
    gather: Literal["auto", "whole"] = Field(
        "auto",
        description="FSDP2, ZeRO-3, saving the output: auto gathers the decoder layers one tensor at a time as they are "
        "written; whole gathers the model on the main process first",
    )
    frozen_weights: Literal["auto", "fp32"] = Field(
        "auto",
        description="FSDP2 with precision bf16: auto keeps frozen parameters the checkpoint stores in bf16 as bf16 "
        "shards (computed in bf16 either way); fp32 keeps every shard in fp32",
    )
    find_unused_parameters: bool = Field(
        False, description="DDP; not needed for moekit's own modules, which touch every trainable parameter"
    )


SaveKind = Literal["full", "ffn_only", "lora_adapter"]


class Stage(StrictModel):
    """One training stage. Its output (`<output_dir>/<name>/model`) feeds later stages and `moekit upcycle`."""

    name: str
    start: StartFrom = Field(default_factory=StartFrom, alias="from")
    trainable: list[TrainableGroup] | None = Field(None, min_length=1)
    phases: list[Phase] = Field(default_factory=list)
    lora: Lora | None = None
    losses: Losses = Field(default_factory=Losses)
    teachers: dict[str, TeacherSlot] = Field(
        default_factory=dict,
        description="teacher per batch slot, keyed by the synergy head path it feeds (video -> temporal and scene "
        "-> spatial, any other name as is); skipped for cached features",
    )
    position_encoders: list[PositionEncoderRef] | None = Field(
        None,
        description="visual-token position encoders (plug-in kind position_encoder); default: those saved with the "
        "model the stage starts from; [] for none",
    )
    data: DataConfig | None = None
    data_source: str = Field("data", description="batch source: 'data' (moekit.data) or a batch_source plug-in")
    data_params: dict[str, Any] = Field(
        default_factory=dict, validate_default=True, description="parameters of a non-default data_source"
    )
    optimizer: Optimizer
    schedule: Schedule = Field(default_factory=Schedule)
    precision: Literal["fp32", "bf16"] = "fp32"
    batch_size: int = Field(1, ge=1, description="micro-batch per process")
    grad_accum: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    steps: int | None = Field(None, ge=1, description="optimizer steps")
    epochs: float | None = Field(None, gt=0.0, description="passes over the data (needs a sized data source)")
    seed: int = 0
    save_every: int | None = Field(None, ge=1, description="checkpoint every N optimizer steps (and at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    save: SaveKind = "full"
    log_every: int = Field(1, ge=1)
    experts_implementation: Literal[IMPLEMENTATIONS] | None = None  # type: ignore[valid-type]
    distributed: Distributed = Field(default_factory=Distributed)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "stage")

    @field_validator("data_params")
    @classmethod
    def _source_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        source = info.data.get("data_source")
        if source is not None and source != "data" and checks_components(info.context):
            reg = plugin_registry.registry()
            reg.get("batch_source", source, where="data_source")
            reg.params_for("batch_source", source, params, context=info.context)
        return params

    @model_validator(mode="after")
    def _consistent(self) -> Stage:
        problems = []
        if (self.trainable is None) == (not self.phases):
            problems.append("give either trainable (the groups this stage trains) or phases, not both / neither")
        if (self.steps is None) == (self.epochs is None):
            problems.append("give either steps or epochs")
        if self.phases:
            names = [p.name for p in self.phases]
            if len(set(names)) != len(names):
                problems.append(f"phase names must be unique, got {names}")
            open_ended = [p.name for p in self.phases if p.steps is None and p.fraction is None]
            if len(open_ended) > 1 or (open_ended and open_ended[0] != self.phases[-1].name):
                problems.append("only the last phase may omit steps/fraction (it takes the remaining steps)")
            if self.steps is not None and not open_ended:
                fixed = sum(p.steps or 0 for p in self.phases)
                if fixed and fixed != self.steps and all(p.steps for p in self.phases):
                    problems.append(f"phase steps add up to {fixed}, the stage has steps={self.steps}")
            if self.distributed.mode == "deepspeed":
                problems.append("phases are not supported with DeepSpeed (its optimizer fixes the trainable set)")
        groups = {g.name for g in self.all_groups()}
        if "lora" in groups and self.lora is None:
            problems.append("trainable group 'lora' needs a lora: section")
        if "synergy_heads" in groups and not self.losses.synergy:
            problems.append("trainable group 'synergy_heads' needs losses.synergy")
        if "position_encoders" in groups and self.position_encoders == []:
            problems.append("trainable group 'position_encoders' but position_encoders: [] turns them off")
        if self.save == "lora_adapter" and self.lora is None:
            problems.append("save: lora_adapter needs a lora: section")
        if self.data_source == "data" and self.data is None:
            problems.append("the data section is required (or name another data_source)")
        student = [slot for slot, ref in self.teachers.items() if ref.input == "student"]
        if student and self.data_source == "data" and self.data is not None and not self.data.student_frames:
            problems.append(
                f"teachers.{student[0]}.input: student needs data.student_frames: true (the data layer then hands "
                "each sample's own frames to the teachers)"
            )
        if self.data_source != "data" and self.data is not None and self.data_params:
            problems.append("give data (for data_source: data) or data_params (for other sources), not both")
        for section, names in (
            ("losses.synergy", [h.name for h in self.losses.synergy]),
            ("position_encoders", [e.name for e in self.position_encoders or []]),
        ):
            if len(set(names)) != len(names):
                problems.append(f"{section}: each may appear once, got {names}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def all_groups(self) -> list[TrainableGroup]:
        return list(self.trainable or []) + [g for p in self.phases for g in p.trainable]


class Recipe(StrictModel):
    """A base model and the stages that train it, in order."""

    name: str | None = None
    base: str = Field(description="local directory of the dense base model")
    output_dir: str = Field(description="stage outputs go to <output_dir>/<stage name>/")
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> Recipe:
        seen: list[str] = []
        problems = []
        for stage in self.stages:
            if stage.name in seen:
                problems.append(f"stage name {stage.name!r} is used twice")
            for ref in stage.start.stage_refs():
                if ref == stage.name:
                    problems.append(f"stage {stage.name!r} starts from itself")
                elif ref in [s.name for s in self.stages] and ref not in seen:
                    problems.append(f"stage {stage.name!r} uses {ref!r}, which runs later; reorder the stages")
            seen.append(stage.name)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ReportSpec(StrictModel):
    """What `moekit run` writes after the last stage (moekit.pipeline.report)."""

    out: str = Field(description="report folder (report.md, report.json, PNG plots)")
    eval: str | None = Field(None, description="held-out multiple-choice questions (JSON/JSONL with `choices`)")
    compare: list[str] = Field(
        default_factory=lambda: ["base"], description="models evaluated besides the last stage: 'base' or stage names"
    )
    routes: list[str] = Field(default_factory=list, description="data files whose routing the final MoE model reports")
    routes_max_samples: int | None = Field(None, ge=1, description="samples per routing data file (default: all)")


class EvaluateStep(StrictModel):
    """A benchmark to score after the stages (`moekit eval` on each model), written into the report's table."""

    benchmark: Literal["mmstar", "cvbench", "vsibench", "videomme", "scanqa", "sqa3d", "choices", "choices-generate"]
    data: str = Field(description="the benchmark's released annotation file or folder (docs/evaluation.md)")
    media: str | None = Field(None, description="folder of its videos / scenes (default: beside the data)")
    models: list[str] = Field(default_factory=list, description="'base' or stage names (default: the last stage)")
    limit: int | None = Field(None, ge=1, description="only the first N questions")
    max_new_tokens: int | None = Field(None, ge=1, description="default: the benchmark's own")
    max_frames: int | None = Field(None, ge=1, description="video / scene frames (default 32)")
    out: str | None = Field(None, description="folder of the runs (default: eval/<benchmark> beside the report)")


class Pipeline(StrictModel):
    """Recipe files run in order; their stages share one namespace, so later recipes may use earlier outputs."""

    prepare: list[PrepareStep] = Field(default_factory=list, description="inputs made when missing, before any stage")
    recipes: list[str] = Field(min_length=1, description="recipe files, relative to the pipeline file")
    base: str | None = Field(None, description="when given, replaces the base of every recipe")
    output_dir: str | None = Field(None, description="when given, replaces the output_dir of every recipe")
    steps: int | None = Field(None, ge=1, description="when given, every stage trains this many steps (smoke runs)")
    evaluate: list[EvaluateStep] = Field(
        default_factory=list, description="benchmarks scored after the last stage, shown in the report"
    )
    report: ReportSpec | None = None

    @model_validator(mode="after")
    def _evaluate_needs_report(self) -> Pipeline:
        if self.evaluate and self.report is None:
            raise ValueError("evaluate: needs a report: section, whose table shows the scores")
        return self
