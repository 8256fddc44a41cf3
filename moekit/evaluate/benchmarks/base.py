"""What a benchmark is to moekit: questions read from its released files, a prompt per question, the official
answer extraction and metric, and how scores aggregate (overall and per category).

A benchmark module defines a `Benchmark` subclass-free object (composition: a `Benchmark` holds functions) and
`moekit.evaluate.benchmarks.BENCHMARKS` lists them by name.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.data.config import FramesSpec
from moekit.data.media import Media


def no_media() -> Media:
    return Media([], None, None, None)


@dataclass
class Question:
    """One benchmark question: `prompt` is the text the model gets (its media first, by the LLaVA convention,
    unless placeholders say otherwise), `answer` the gold answer as the benchmark stores it."""

    id: str
    prompt: str
    answer: Any
    category: str
    media: Callable[[], Media] = no_media  # decoded on demand: media are read only when the question is asked
    options: list[str] = field(default_factory=list)  # option texts in letter order (A, B, ...), if any
    fields: dict[str, Any] = field(default_factory=dict)  # benchmark columns kept in predictions.jsonl


@dataclass(frozen=True)
class Scored:
    """The parsed answer of one prediction and its score (1/0 for accuracy, in [0, 1] for MRA)."""

    parsed: Any
    score: float


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: `load(data, media_root, frames)` -> questions (errors name the file, row and what is
    missing); `score(question, prediction)`; `aggregate(records)` -> the scores.json body (overall first).

    `predict` replaces generation for benchmarks that rank instead (the likelihood ranking); `needs_judge`
    marks those scored by an LLM judge (given with --judge)."""

    name: str
    title: str
    metric: str
    load: Callable[[Path, Path | None, FramesSpec], list[Question]]
    score: Callable[[Question, str], Scored]
    aggregate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    max_new_tokens: int = 16
    frames: int = 32
    files: str = ""  # the released files, for --help and errors
    predict: Callable[..., list[str]] | None = None
    needs_judge: bool = False


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def grouped(records: Sequence[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        out[str(record.get(key))].append(record)
    return dict(sorted(out.items()))


def accuracy_by(records: Sequence[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    """`{group: {score, count}}`: mean score per value of `key` (a column of predictions.jsonl)."""
    return {
        g: {"score": mean(r["score"] for r in rows), "count": len(rows)} for g, rows in grouped(records, key).items()
    }


def micro(records: Sequence[dict[str, Any]], metric: str, *keys: str) -> dict[str, Any]:
    """The usual body: overall mean score and the mean per `keys` (category first)."""
    out: dict[str, Any] = {"metric": metric, "overall": mean(r["score"] for r in records), "count": len(records)}
    for key in ("category", *keys):
        out[f"per_{key}"] = accuracy_by(records, key)
    return out
