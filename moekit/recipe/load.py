"""Read a recipe or a pipeline of recipes from YAML into a `Plan`: the stages to run, in order.

A file with a `recipes:` list is a pipeline; a file with `stages:` is one recipe. `--set key=value` overrides
apply to the file named on the command line before validation. Stage names share one namespace across a
pipeline, so a later recipe may start from, or upcycle with, an earlier recipe's stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moekit.config import ConfigError, apply_overrides, load_yaml, parse_config
from moekit.recipe.schema import Pipeline, Recipe, Stage


@dataclass(frozen=True)
class PlannedStage:
    """One stage with the recipe it belongs to and where it was written (for error messages)."""

    stage: Stage
    recipe: Recipe
    source: str  # file the stage was read from
    index: int  # position in its recipe's `stages`

    @property
    def where(self) -> str:
        return f"{self.source}: stages[{self.index}]"

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output_dir) / self.stage.name


@dataclass(frozen=True)
class Plan:
    """Everything `moekit run` will do, validated: stages in the order they run."""

    source: str
    stages: list[PlannedStage]
    pipeline: Pipeline | None = None

    def get(self, name: str) -> PlannedStage | None:
        return next((s for s in self.stages if s.stage.name == name), None)

    def external_refs(self) -> dict[str, list[str]]:
        """Stage names used but not defined in this plan (their outputs must already exist), by user."""
        defined = {s.stage.name for s in self.stages}
        out: dict[str, list[str]] = {}
        for planned in self.stages:
            for ref in planned.stage.start.stage_refs():
                if ref not in defined:
                    out.setdefault(ref, []).append(planned.stage.name)
        return out


def _recipe(
    data: object,
    source: str,
    context: dict,
    base: str | None = None,
    output_dir: str | None = None,
    steps: int | None = None,
) -> Recipe:
    if isinstance(data, dict):
        if base is not None:
            data["base"] = base
        if output_dir is not None:
            data["output_dir"] = output_dir
        if steps is not None:
            for stage in data.get("stages") or []:
                if isinstance(stage, dict):
                    stage.update(steps=steps, epochs=None)
    return parse_config(Recipe, data, source=source, context=context)


def load_plan(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, components: bool = True) -> Plan:
    """Validate a recipe or pipeline file (and every recipe a pipeline lists); raise ConfigError with paths.

    Plug-in components (teachers, position encoders, synergy heads, batch sources) are looked up and their
    params validated while parsing, unless `components=False`. Whether the files their params name exist is
    checked later, before anything runs (`moekit.pipeline.checks.environment_problems`)."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(
            str(path), [("<root>", "expected a mapping with `stages:` (a recipe) or `recipes:` (a pipeline)")]
        )
    data = apply_overrides(data, list(overrides))
    context = {"components": components, "check_paths": False}
    if "recipes" not in data:
        recipe = _recipe(data, str(path), context)
        return Plan(str(path), [PlannedStage(s, recipe, str(path), i) for i, s in enumerate(recipe.stages)])
    pipeline = parse_config(Pipeline, data, source=str(path), context=context)
    problems: list[tuple[str, str]] = []
    stages: list[PlannedStage] = []
    for index, name in enumerate(pipeline.recipes):
        file = path.parent / name
        try:
            recipe = _recipe(load_yaml(file), str(file), context, pipeline.base, pipeline.output_dir, pipeline.steps)
        except FileNotFoundError:
            problems.append((f"recipes[{index}]", f"{file}: no such file"))
            continue
        except ConfigError as exc:
            problems.extend((f"{file}: {loc}", msg) for loc, msg in exc.problems)
            continue
        stages.extend(PlannedStage(s, recipe, str(file), i) for i, s in enumerate(recipe.stages))
    seen: dict[str, PlannedStage] = {}
    for planned in stages:
        name = planned.stage.name
        if name in seen:
            problems.append((f"{planned.where}.name", f"stage {name!r} is also defined in {seen[name].where}"))
        for ref in planned.stage.start.stage_refs():
            later = next((s for s in stages if s.stage.name == ref), None)
            if later is not None and ref not in seen and ref != name:
                problems.append((f"{planned.where}.from", f"uses stage {ref!r}, which runs later ({later.where})"))
        seen.setdefault(name, planned)
    if problems:
        raise ConfigError(str(path), problems)
    return Plan(str(path), stages, pipeline)
