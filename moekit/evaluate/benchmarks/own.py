"""moekit's own multiple-choice files (samples with `choices`, the data schema of docs/data.md), scored two ways:
`choices` ranks the choices by answer log-likelihood (what `moekit evaluate` did, meaningful for tiny models),
`choices-generate` asks the model and matches its text to the choices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moekit.data.config import FramesSpec
from moekit.data.media import load_media
from moekit.evaluate.benchmarks.base import Benchmark, Question, Scored, micro
from moekit.evaluate.choices import named_choices, normalise_answer, read_choice_samples, score_choices


def load_choices(data: Path, media_root: Path | None, frames: FramesSpec) -> list[Question]:
    samples = read_choice_samples(data)
    root = media_root or data.parent
    out = []
    for sample in samples:
        texts = sample.human_texts()
        human = [t for t, turn in zip(texts, sample.conversations) if turn.role == "human"]
        out.append(
            Question(
                id=sample.id,
                prompt=human[-1],
                answer=sample.conversations[-1].value,
                category=sample.task or "default",
                media=lambda sample=sample: load_media(sample, root, frames),
                options=list(sample.choices or []),
                fields={"modality": sample.modality, "_sample": sample, "_root": root},
            )
        )
    return out


@torch.no_grad()
def rank_choices(opened: Any, questions: list[Question], frames: FramesSpec, **_: Any) -> list[str]:
    """The choice with the highest summed answer log-likelihood for each question."""
    samples = [q.fields["_sample"] for q in questions]
    root = questions[0].fields["_root"] if questions else Path(".")
    report = score_choices(opened.model, opened.preprocessor, samples, root, frames=frames, encoders=opened.encoders)
    return [d["predicted"] for d in report["samples"]]


def score_choice_text(question: Question, prediction: str) -> Scored:
    """Correct when the normalised text is the answer, or names exactly one choice and that one is the answer."""
    said = normalise_answer(prediction)
    if said == normalise_answer(question.answer):
        return Scored(question.answer, 1.0)
    named = named_choices(said, question.options)
    parsed = named[0] if len(named) == 1 else None
    return Scored(parsed, float(parsed == question.answer))


def aggregate_choices(records: list[dict[str, Any]]) -> dict[str, Any]:
    out = micro(records, "accuracy", "modality")
    out["chance"] = sum(1 / len(r["options"]) for r in records) / len(records) if records else 0.0
    return out


CHOICES = Benchmark(
    name="choices",
    title="multiple choice (likelihood)",
    metric="accuracy, choices ranked by answer log-likelihood",
    load=load_choices,
    score=lambda q, p: Scored(p, float(p == q.answer)),
    aggregate=aggregate_choices,
    files="a moekit JSON/JSONL data file whose samples have `choices`",
    predict=rank_choices,
)

CHOICES_GENERATE = Benchmark(
    name="choices-generate",
    title="multiple choice (generated)",
    metric="accuracy, generated text matched to the choices",
    load=load_choices,
    score=score_choice_text,
    aggregate=aggregate_choices,
    files="a moekit JSON/JSONL data file whose samples have `choices`",
)
