"""`moekit synth -o DIR`: write the synthetic offline dataset (every modality, pairs, CSQA, evaluation)."""

from __future__ import annotations

from pathlib import Path

import typer


def synth(
    out: Path = typer.Option(..., "-o", "--out", help="output folder"),
    seed: int = typer.Option(0, help="random seed (the output is a function of the seed and sizes)"),
    images: int = typer.Option(48, help="images for stage 1-2 image instructions"),
    videos: int = typer.Option(24, help="videos for stage 1-2 video instructions"),
    scenes: int = typer.Option(12, help="3D scenes for stage 1-1 alignment and 1-2 3D instructions"),
    video_pairs: int = typer.Option(24, help="image <-> video pairs (stage 2-1 distillation, CSQA)"),
    scene_pairs: int = typer.Option(12, help="image <-> 3D scene pairs (stage 2-1 distillation, CSQA)"),
    eval_per_task: int = typer.Option(16, help="held-out multiple-choice questions per task"),
    width: int = typer.Option(112, help="frame width in pixels"),
    height: int = typer.Option(84, help="frame height in pixels"),
    frames: int = typer.Option(8, help="frames per video"),
    views: int = typer.Option(8, help="views per 3D scene"),
    mp4: bool = typer.Option(False, "--mp4", help="store videos as .mp4 (needs the `video` extra)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder"),
) -> None:
    """Write a small synthetic dataset: shapes, motion clips, 3D scenes with exact depth, pairs, CSQA, eval."""
    values = {k: v for k, v in locals().items() if k not in ("out", "overwrite")}
    from moekit.config import parse_config
    from moekit.demo.synth.writer import SynthSpec, write_synth
    from moekit.io.overlap import check_apart

    check_apart(out, {})  # no inputs, but never the folder you are in (--overwrite would replace it)
    spec = parse_config(SynthSpec, values, source="moekit synth")
    manifest = write_synth(out, spec, overwrite=overwrite)
    total = sum(manifest["files"].values())
    typer.echo(f"wrote {total} samples in {len(manifest['files'])} files to {out}")
    for name, count in manifest["files"].items():
        typer.echo(f"  {name}: {count}")
