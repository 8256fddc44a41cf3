"""`moekit export --native`: a checkpoint that stock transformers MoE classes load without moekit."""

from __future__ import annotations

from pathlib import Path

import typer


def export(
    source: Path = typer.Argument(..., help="a moekit MoE checkpoint directory"),
    output: Path = typer.Argument(..., help="where to write the exported checkpoint"),
    native: bool = typer.Option(
        False, "--native", help="write transformers' stock MoE twin (Qwen3-VL-MoE, Qwen3-MoE, Mixtral)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output directory"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Export a moekit checkpoint. With --native: Qwen3-VL -> Qwen3-VL-MoE, Qwen3 -> Qwen3-MoE, Llama/Mistral ->
    Mixtral (every layer MoE), loadable by stock transformers, vLLM and SGLang."""
    from moekit.upcycle.export import export_native

    if not native:
        raise ValueError("choose an export format: --native (the only one so far)")
    out = export_native(source, output, overwrite=overwrite, progress=not quiet)
    typer.echo(f"wrote {out}")
