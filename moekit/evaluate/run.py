"""`moekit eval`: score a model on a benchmark's released files into an output folder, resumably.

OUT holds
- `run.json`: what is being scored (benchmark, settings, model and data fingerprints), written first;
- `predictions.jsonl`: one record per question as it is answered (`id`, `prompt`, raw `prediction`, `parsed`,
  `answer`, `score`, `category` and the benchmark's own columns); a rerun with the same run.json continues
  after the last complete line;
- `scores.json`: overall and per-category scores, the metric named, fingerprints and the machine, written
  (atomically) only when every question is answered: a folder without it is unfinished.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moekit._version import __version__
from moekit.data.config import FramesSpec
from moekit.evaluate.benchmarks import Benchmark, Question, get_benchmark
from moekit.evaluate.generate import Request, Sampling, batches, generate_batch
from moekit.evaluate.machine import machine_info
from moekit.evaluate.model_dir import open_model_dir
from moekit.io.atomic import atomic_write_text, is_nonempty_dir
from moekit.io.files import weight_files

RUN, PREDICTIONS, SCORES = "run.json", "predictions.jsonl", "scores.json"


@dataclass(frozen=True)
class EvalSettings:
    """What changes the predictions (kept in run.json; a resume must match them)."""

    max_new_tokens: int | None = None  # None: the benchmark's own
    max_frames: int | None = None  # None: the benchmark's own (32)
    limit: int | None = None
    plain_template: bool = False  # allow models without a chat template (moekit's plain one)


def fingerprint_model(path: Path) -> str:
    """sha256 over config.json and, per weight file, its size, its safetensors header and its first and last
    MiB: cheap for a 7B checkpoint and different for any retrained one."""
    digest = hashlib.sha256()
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path}: no config.json; give a model folder")
    digest.update(config.read_bytes())
    for file in weight_files(path):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read())
    return digest.hexdigest()[:16]


def fingerprint_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def annotation_files(data: Path) -> list[Path]:
    """The annotation files under `data` (not media: those are large and named by the annotations)."""
    if data.is_file():
        return [data]
    suffixes = (".parquet", ".json", ".jsonl", ".tsv", ".txt")
    return [p for p in sorted(data.rglob("*")) if p.is_file() and p.suffix in suffixes and p.stat().st_size < 1 << 30]


def _done(path: Path) -> list[dict[str, Any]]:
    """The complete records of predictions.jsonl; a torn last line (an interrupted write) is cut off."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as fh:
            fh.truncate(end)
    return [json.loads(line) for line in data[:end].decode().splitlines() if line.strip()]


def _record(question: Question, prediction: str, benchmark: Benchmark) -> dict[str, Any]:
    scored = benchmark.score(question, prediction)
    record = {
        "id": question.id,
        "prompt": question.prompt,
        "prediction": prediction,
        "parsed": scored.parsed,
        "answer": question.answer,
        "score": scored.score,
        "category": question.category,
    }
    if question.options:
        record["options"] = question.options
    record.update({k: v for k, v in question.fields.items() if not k.startswith("_")})
    return record


def run_eval(
    name: str,
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    media: str | Path | None = None,
    settings: EvalSettings | None = None,
    batch_size: int = 8,
    tokenizer: str | Path | None = None,
    judge: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score `model` on benchmark `name` from `data` (and `media`) into `out`; returns scores.json's content.
    Everything is checked (benchmark, files, media, an unfinished run's settings) before `out` is touched."""
    benchmark = get_benchmark(name)
    settings = settings or EvalSettings()
    model, data, out = Path(model), Path(data), Path(out)
    if benchmark.needs_judge and judge is None:
        raise ValueError(f"{name} is scored by an LLM judge: pass --judge with a local judge model folder")
    frames = FramesSpec(max_frames=settings.max_frames or benchmark.frames)
    questions = benchmark.load(data, None if media is None else Path(media), frames)
    if settings.limit is not None:
        questions = questions[: settings.limit]
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{data}: question ids repeat ({dup}); each question needs its own id")
    plan = {
        "benchmark": name,
        "metric": benchmark.metric,
        "model": str(model),
        "model_fingerprint": fingerprint_model(model),
        "data": str(data),
        "data_fingerprint": fingerprint_files(annotation_files(data)),
        "media": None if media is None else str(media),
        "questions": len(questions),
        "max_new_tokens": settings.max_new_tokens or benchmark.max_new_tokens,
        "max_frames": frames.max_frames,
        "limit": settings.limit,
        "judge": None if judge is None else str(judge),
    }
    previous = _previous_plan(out, overwrite)
    if previous is not None and previous != plan:
        changed = sorted(k for k in plan if previous.get(k) != plan[k])
        raise ValueError(
            f"{out} holds an evaluation with other settings ({', '.join(changed)} differ); pass --overwrite to "
            "start again, or choose another output folder"
        )
    opened = open_model_dir(model, tokenizer)
    if not opened.preprocessor.formatter.use_template and not settings.plain_template:
        raise ValueError(
            f"{model}: its tokenizer has no chat template, which the benchmark prompts assume; add one to "
            "tokenizer_config.json, or pass --plain-template to use moekit's plain User:/Assistant: template"
        )
    out.mkdir(parents=True, exist_ok=True)
    if previous is None:
        for stale in (PREDICTIONS, SCORES):
            (out / stale).unlink(missing_ok=True)
        atomic_write_text(out / RUN, json.dumps(plan, indent=2))
    records = {r["id"]: r for r in _done(out / PREDICTIONS)}
    todo = [q for q in questions if q.id not in records]
    if records:
        log(f"resuming: {len(records)} of {len(questions)} questions already answered in {out / PREDICTIONS}")
    sampling = Sampling(max_new_tokens=plan["max_new_tokens"])
    started = time.perf_counter()
    columns = (TextColumn(name), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar, (out / PREDICTIONS).open("a") as sink:
        task = bar.add_task(name, total=len(questions), completed=len(records))
        for chunk in batches(todo, batch_size):
            if benchmark.predict is not None:
                texts = benchmark.predict(opened, list(chunk), frames)
            else:
                requests = [Request(["human"], [q.prompt], q.media()) for q in chunk]
                texts = generate_batch(opened, requests, sampling, batch_size=batch_size)
            for question, text in zip(chunk, texts):
                record = _record(question, text, benchmark)
                records[question.id] = record
                sink.write(json.dumps(record) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            bar.update(task, advance=len(chunk))
    ordered = [records[i] for i in ids]
    scores = benchmark.aggregate(ordered)
    scores = {
        "benchmark": name,
        **scores,
        **{k: plan[k] for k in ("model", "model_fingerprint", "data", "data_fingerprint", "limit")},
        "moekit": __version__,
        "machine": machine_info(),
        "seconds": time.perf_counter() - started,
    }
    atomic_write_text(out / SCORES, json.dumps(scores, indent=2))
    return scores


def _previous_plan(out: Path, overwrite: bool) -> dict[str, Any] | None:
    """run.json of an evaluation in `out` to continue (None to start afresh); refuses a folder of other files."""
    if overwrite or not is_nonempty_dir(out):
        return None
    run = out / RUN
    if not run.is_file():
        raise FileExistsError(f"{out} is not empty and holds no {RUN}; pass --overwrite or another folder")
    return json.loads(run.read_text())
