"""`moekit data convert FORMAT SRC -o OUT` (released dataset layouts -> moekit's files) and `moekit data check`."""

from __future__ import annotations

from pathlib import Path

import typer

from moekit.cli.data_args import key_values
from moekit.cli.errors import CommandGroup

app = typer.Typer(
    help="Datasets as their authors release them: convert them, check them before a run.",
    no_args_is_help=True,
    cls=CommandGroup,
)


@app.command("convert")
def convert(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="the released layout (see `moekit data formats`)"),
    src: Path = typer.Argument(..., help="the dataset's folder (or annotation file) as downloaded"),
    out: Path = typer.Option(..., "-o", "--out", help="output folder (data.jsonl, media/, convert.json)"),
    option: list[str] = typer.Option([], "--option", help="format option KEY=VALUE (repeatable)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a complete earlier conversion in OUT"),
    no_resume: bool = typer.Option(False, "--no-resume", help="refuse to continue a partial conversion in OUT"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Convert a dataset from its released layout into moekit's dataset file; resumable, atomic."""
    from moekit.data.convert import convert_dataset

    summary = convert_dataset(
        fmt, src, out, key_values(option), resume=not no_resume, overwrite=overwrite, progress=not quiet
    )
    for line in summary.lines():
        typer.echo(line)


@app.command("formats")
def formats() -> None:
    """List the dataset layouts `moekit data convert` reads."""
    from moekit.data.convert import FORMATS

    for name, (_, about) in FORMATS.items():
        typer.echo(f"{name:18} {about}")


@app.command("check")
def check(
    file: Path = typer.Argument(..., help="a moekit dataset file (JSON list or JSONL), e.g. OUT/data.jsonl"),
    model: Path | None = typer.Option(None, "--model", help="model folder: count each sample's tokens for it"),
    max_length: int | None = typer.Option(None, "--max-length", help="token budget per sample (default 2048)"),
    media_root: Path | None = typer.Option(None, "--media-root", help="folder media paths are relative to"),
    max_frames: int = typer.Option(32, "--max-frames", help="frames per video / scene, as data.frames.max_frames"),
) -> None:
    """Report what would fail before a run: bad samples, missing media, samples over the token budget."""
    from moekit.data.check import check_file
    from moekit.data.config import FramesSpec

    if max_length is not None and model is None:
        raise ValueError("--max-length needs --model (the budget is counted in that model's tokens)")
    report = check_file(
        file, model, max_length=max_length, media_root=media_root, frames=FramesSpec(max_frames=max_frames)
    )
    for line in report.lines():
        typer.echo(line)
    if report.failed:
        raise typer.Exit(1)
