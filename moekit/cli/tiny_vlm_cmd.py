"""`moekit tiny-vlm OUT`: a tiny random Qwen2.5-VL with an offline tokenizer, for the synthetic pipeline."""

from __future__ import annotations

from pathlib import Path

import typer


def tiny_vlm(
    out: Path = typer.Argument(..., help="output folder"),
    hidden_size: int = typer.Option(64, help="text hidden size (a multiple of 16)"),
    layers: int = typer.Option(4, help="decoder layers"),
    seed: int = typer.Option(0, help="seed of the random weights"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder"),
) -> None:
    """Write a tiny Qwen2.5-VL bundle (weights, word-level tokenizer + chat template, pixel config)."""
    from moekit.demo.bundle import write_tiny_vlm

    write_tiny_vlm(out, hidden_size=hidden_size, layers=layers, seed=seed, overwrite=overwrite)
    typer.echo(f"wrote a tiny Qwen2.5-VL bundle to {out}")
