"""`moekit eval BENCHMARK MODEL --data PATH -o OUT`: a benchmark from its released files, by its official metric."""

from __future__ import annotations

from pathlib import Path

import typer


def eval_benchmark(
    benchmark: str = typer.Argument(
        ..., help="mmstar, cvbench, vsibench, videomme, scanqa, sqa3d, choices, choices-generate"
    ),
    model: Path = typer.Argument(..., help="model folder (dense or moekit MoE)"),
    data: Path = typer.Option(..., "--data", help="the benchmark's released annotation file or its folder"),
    out: Path = typer.Option(..., "-o", "--out", help="folder for run.json, predictions.jsonl and scores.json"),
    media: Path = typer.Option(None, "--media", help="folder of the videos / scenes (default: beside the data)"),
    limit: int = typer.Option(None, "--limit", min=1, help="only the first N questions (a quick look)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="questions generated together"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="default: the benchmark's own"),
    max_frames: int = typer.Option(None, "--max-frames", min=1, help="video / scene frames (default 32)"),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="folder with the tokenizer (default: MODEL)"),
    judge: Path = typer.Option(None, "--judge", help="local judge model folder, for LLM-judged benchmarks"),
    plain_template: bool = typer.Option(
        False, "--plain-template", help="allow a model without a chat template (moekit's plain one)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="start again instead of resuming OUT"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Score MODEL on BENCHMARK. OUT gets predictions.jsonl (one record per question) and, once every question
    is answered, scores.json; an interrupted run continues where it stopped. docs/evaluation.md lists where to
    get each benchmark's files and the layout they are read in."""
    from moekit.evaluate.run import EvalSettings, run_eval

    settings = EvalSettings(
        max_new_tokens=max_new_tokens, max_frames=max_frames, limit=limit, plain_template=plain_template
    )
    scores = run_eval(
        benchmark,
        model,
        data,
        out,
        media=media,
        settings=settings,
        batch_size=batch_size,
        tokenizer=tokenizer,
        judge=judge,
        overwrite=overwrite,
        progress=not quiet,
        log=typer.echo,
    )
    typer.echo(f"{benchmark}: {scores['overall']:.4f} ({scores['metric']}; {scores['count']} questions)")
    for key, value in scores.items():
        if key.startswith("per_") and isinstance(value, dict):
            for group, row in value.items():
                if isinstance(row, dict):
                    typer.echo(f"  {key[4:]} {group}: {row['score']:.4f} ({row['count']})")
    typer.echo(f"wrote {out}/scores.json")
