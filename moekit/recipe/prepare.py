"""`prepare:` steps of a pipeline: inputs made on the spot when missing (tiny bundle, synthetic data, tiny
teacher checkpoints), so the tiny PolyV pipeline runs from nothing but its YAML.

Each step writes its folder atomically and is skipped when the folder already exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from moekit.config import StrictModel
from moekit.data.synth.writer import SynthSpec


class TinyVlmStep(StrictModel):
    """`moekit tiny-vlm`: a tiny random Qwen2.5-VL with an offline tokenizer over the synthetic vocabulary."""

    kind: Literal["tiny_vlm"]
    out: str
    hidden_size: int = Field(64, ge=16)
    layers: int = Field(4, ge=1)
    seed: int = 0


class SynthStep(StrictModel):
    """`moekit synth`: the synthetic dataset (sizes as `moekit synth`'s options)."""

    kind: Literal["synth"]
    out: str
    spec: SynthSpec = Field(default_factory=SynthSpec)


class TinyTeacherStep(StrictModel):
    """A tiny random checkpoint of a teacher plug-in in its real format (the component's `tiny` writer)."""

    kind: Literal["tiny_teacher"]
    teacher: str = Field(description="teacher component name, e.g. vjepa2 or vggt")
    out: str
    seed: int = 0


PrepareStep = Annotated[TinyVlmStep | SynthStep | TinyTeacherStep, Field(discriminator="kind")]


def run_prepare(steps: list[PrepareStep], log=print) -> None:
    """Create every missing input, in order."""
    from moekit.data.bundle import write_tiny_vlm
    from moekit.data.synth.writer import write_synth
    from moekit.io.atomic import atomic_dir

    for index, step in enumerate(steps):
        out = Path(step.out)
        if out.exists():
            log(f"prepare[{index}] {step.kind}: {out} exists, kept")
            continue
        if step.kind == "tiny_vlm":
            write_tiny_vlm(out, hidden_size=step.hidden_size, layers=step.layers, seed=step.seed)
        elif step.kind == "synth":
            write_synth(out, step.spec)
        else:
            component = tiny_teacher(step.teacher, f"prepare[{index}].teacher")
            with atomic_dir(out) as tmp:
                component.tiny(tmp, step.seed)
        log(f"prepare[{index}] {step.kind}: wrote {out}")


def tiny_teacher(name: str, where: str):
    """The teacher component `name`, which must know how to write a tiny checkpoint."""
    from moekit.registry import registry

    component = registry().get("teacher", name, where)
    if component.tiny is None:
        raise ValueError(f"{where}: teacher {name!r} ({component.plugin}) cannot write a tiny checkpoint")
    return component
