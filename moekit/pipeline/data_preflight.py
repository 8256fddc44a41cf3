"""`moekit validate RECIPE --data`: each stage's datasets checked for what would stop the run mid-way.

Per dataset of every stage: the schema of every record (the stage checks them all when it opens the file), and for
a seeded random sample of the well-formed ones (`samples`, or all) the media on disk and the token count against
the stage's `max_length`, with the stage's frames and synergy tokens, for the tokenizer and processor the stage
will encode with. The checks are `moekit.data.check.check_records`, the same as `moekit data check`.

A stage that starts from an earlier stage's output encodes with that output's files; before that output exists
the check uses the folder it will inherit them from (in the end the recipe's base), as every PolyV stage keeps
the base's tokenizer and processor (stage 2-1 adds its `<synergy>` tokens, counted here as `synergy_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moekit.data.check import CheckReport, TokenCounter, check_records
from moekit.data.config import DataConfig, DatasetSpec
from moekit.data.preprocess import Preprocessor
from moekit.data.schema import read_records
from moekit.recipe.load import Plan, PlannedStage
from moekit.train.stage import stage_output

DEFAULT_SAMPLES = 64


@dataclass
class DatasetCheck:
    """One dataset of one stage: its report, or why it could not be read."""

    where: str  # YAML path, e.g. "recipes/polyv/stage1_1.yaml: stages[0].data.datasets[0]"
    name: str
    path: Path
    skip_bad: bool  # data.bad_samples: skip (bad samples are dropped, not fatal)
    report: CheckReport | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        if self.error is not None:
            return True
        if self.report is None:
            return False
        if self.skip_bad:  # a run skips bad samples; it stops only when none is usable
            r = self.report
            return (r.samples > 0 and not r.modalities) or (r.checked > 0 and r.rejected == r.checked)
        return self.report.failed

    def summary(self) -> str:
        if self.error is not None:
            return self.error
        r = self.report
        counts = (
            (len(r.bad), "bad sample(s)"),
            (len(r.missing), "missing media"),
            (len(r.unusable), "unusable media"),
            (len(r.over_budget), f"over max_length={r.max_length}"),
        )
        found = ", ".join(f"{n} {what}" for n, what in counts if n)
        return f"{self.path}: {found or 'no usable sample'} (listed above)"

    def lines(self, limit: int = 10) -> list[str]:
        head = f"{self.where} ({self.name}): {self.path}"
        if self.error is not None:
            return [head, f"  FAIL: {self.error}"]
        body = self.report.lines(limit) if self.report is not None else []
        if self.skip_bad and self.report is not None and self.report.failed and not self.failed:
            body[-1] = "OK with data.bad_samples: skip (the samples above would be skipped)"
        return [head, *(f"  {line}" for line in body)]


@dataclass
class DataPreflight:
    """What `check_plan_data` found: one check per dataset of each stage, and model folders it could not load."""

    checks: list[DatasetCheck] = field(default_factory=list)
    no_model: dict[Path, tuple[str, list[str]]] = field(default_factory=dict)  # folder -> (why, stages using it)

    @property
    def problems(self) -> list[str]:
        models = [
            f"{model}: cannot count tokens ({why}); token budgets not checked for {', '.join(wheres)}"
            for model, (why, wheres) in self.no_model.items()
        ]
        return models + [f"{c.where}.path: {c.summary()}" for c in self.checks if c.failed]

    def lines(self) -> list[str]:
        return [line for check in self.checks for line in check.lines()]


def encoding_dir(plan: Plan, planned: PlannedStage) -> Path:
    """The model folder whose tokenizer and processor `planned` encodes its data with (see the module doc)."""
    seen: set[str] = set()
    while True:
        start = planned.stage.start
        if start.path is not None:
            return Path(start.path)
        name = start.stage
        if start.upcycle is not None:
            base = start.upcycle.base
            if isinstance(base, str):
                return Path(base)
            name = base.stage if base is not None else None
        if name is None:
            return Path(planned.recipe.base)
        output = stage_output(plan, planned, name)
        if (output / "config.json").is_file():
            return output
        earlier = plan.get(name)
        if earlier is None or name in seen:
            return Path(planned.recipe.base)
        seen.add(name)
        planned = earlier


def _check_dataset(
    spec: DatasetSpec, data: DataConfig, counter: TokenCounter | None, samples: int | None
) -> tuple[CheckReport | None, str | None]:
    """(report, None), or (None, why the file could not be read); paths as the trainer resolves them."""
    path = Path(spec.path)
    root = Path(spec.media_root) if spec.media_root is not None else path.parent
    try:
        records = read_records(path, spec.max_samples)
        return check_records(path, records, root, counter, data.max_length, sample=samples, seed=data.seed), None
    except FileNotFoundError as exc:
        return None, f"{exc} (convert the dataset first; the recipe's comments give the command)"
    except (OSError, ValueError) as exc:
        return None, str(exc)


def check_plan_data(
    plan: Plan, *, samples: int | None = DEFAULT_SAMPLES, stages: list[PlannedStage] | None = None
) -> DataPreflight:
    """Check every dataset of the plan's stages (`samples` per dataset, None: all of them). A file that several
    stages read the same way (PolyV's LLaVA-3D data: stages 1-1, 1-2 and 2-2) is read once."""
    result = DataPreflight()
    preprocessors: dict[Path, Preprocessor | str] = {}
    done: dict[tuple, tuple[CheckReport | None, str | None]] = {}
    for planned in plan.stages if stages is None else stages:
        data = planned.stage.data
        if planned.stage.data_source != "data" or data is None:
            continue
        model = encoding_dir(plan, planned)
        if model not in preprocessors:
            try:
                preprocessors[model] = Preprocessor.from_dir(model)
            except (OSError, ValueError) as exc:
                preprocessors[model] = str(exc)
        pre = preprocessors[model]
        if isinstance(pre, str):
            result.no_model.setdefault(model, (pre, []))[1].append(planned.where)
        counter = TokenCounter(pre, data.frames, data.synergy_tokens) if isinstance(pre, Preprocessor) else None
        how = (model, data.frames.model_dump_json(), data.max_length, data.synergy_tokens, data.seed, samples)
        for index, spec in enumerate(data.datasets):
            key = (spec.path, spec.media_root, spec.max_samples, *how)
            if key not in done:
                done[key] = _check_dataset(spec, data, counter, samples)
            where = f"{planned.where}.data.datasets[{index}]"
            report, error = done[key]
            result.checks.append(
                DatasetCheck(where, spec.name, Path(spec.path), data.bad_samples == "skip", report, error)
            )
    return result
