"""`moekit evaluate MODEL --data FILE`: multiple-choice accuracy by answer log-likelihood, overall and per task.

Deprecated in 0.3 for `moekit eval choices MODEL --data FILE -o OUT` (the same ranking, as one benchmark among
others); it stays for one release."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import typer


def evaluate(
    model: Path = typer.Argument(..., help="model folder (dense or moekit MoE)"),
    data: Path = typer.Option(..., "--data", help="JSON/JSONL with multiple-choice samples (`choices`)"),
    out: Path = typer.Option(None, "-o", "--out", help="write the full report (per-sample scores) as JSON"),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="folder with the tokenizer (default: MODEL)"),
    normalise: Literal["sum", "mean"] = typer.Option(
        "sum", help="rank by the answer's summed ('sum') or per-token ('mean') log-prob"
    ),
) -> None:
    """Deprecated: use `moekit eval choices`. Rank each sample's choices by answer log-likelihood."""
    import torch

    typer.echo(
        "moekit evaluate is deprecated and goes away in 0.4: use `moekit eval choices MODEL --data FILE -o OUT`",
        err=True,
    )

    from moekit.evaluate.choices import read_choice_samples, score_choices
    from moekit.evaluate.model_dir import open_model_dir
    from moekit.io.atomic import atomic_write_text

    samples = read_choice_samples(data)
    opened = open_model_dir(model, tokenizer)  # with the position encoders saved beside it, if any
    with torch.no_grad():  # not set_grad_enabled: the CLI also runs inside other programs (tests, notebooks)
        report = score_choices(
            opened.model, opened.preprocessor, samples, data.parent, normalise=normalise, encoders=opened.encoders
        )
    typer.echo(
        f"accuracy {report['accuracy']:.3f} ({report['correct']}/{report['total']}, chance {report['chance']:.3f})"
    )
    for task, row in report["per_task"].items():
        typer.echo(f"  {task:16s} {row['accuracy']:.3f}  ({row['correct']}/{row['total']}, chance {row['chance']:.3f})")
    if out is not None:
        atomic_write_text(out, json.dumps(report, indent=2))
