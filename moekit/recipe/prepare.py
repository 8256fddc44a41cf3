"""The `prepare:` steps of a pipeline: inputs made on the spot when missing (tiny bundle, synthetic data, tiny
teacher checkpoints), so the tiny PolyV pipeline runs from nothing but its YAML. `moekit.pipeline.prepare` runs
them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from moekit.config import StrictModel
from moekit.demo.synth.writer import SynthSpec


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
