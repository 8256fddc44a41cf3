"""`moekit tiny`: write a tiny random checkpoint (and stand-in specialists) to try moekit offline."""

from __future__ import annotations

from pathlib import Path

import typer


def tiny(
    output: Path = typer.Argument(..., help="folder to write: OUT/base plus OUT/<name> per specialist"),
    family: str = typer.Option("qwen2_5_vl", "--family", help="model family (see moekit.demo.tiny.FAMILIES)"),
    specialists: str = typer.Option(
        "", "--specialists", help="comma-separated names of FFN-only specialists, e.g. image,video,3d"
    ),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing folder"),
) -> None:
    """Write a tiny random model of FAMILY and FFN-only specialists (random stand-ins for stage 1-2 outputs)."""
    from moekit.demo.tiny import tiny_config, write_tiny_checkpoint
    from moekit.io.atomic import atomic_dir

    tiny_config(family)  # validates the family name before anything is written
    names = [s.strip() for s in specialists.split(",") if s.strip()]
    with atomic_dir(output, overwrite=overwrite) as tmp:
        paths = write_tiny_checkpoint(tmp, family, names, seed)
    for name in paths:
        typer.echo(f"{name}: {output / name}")
