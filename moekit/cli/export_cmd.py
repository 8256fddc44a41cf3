"""`moekit export --native`: a checkpoint that stock transformers MoE classes load without moekit."""

from __future__ import annotations

from pathlib import Path

import typer


def export(
    source: Path = typer.Argument(None, help="a moekit MoE checkpoint directory"),
    output: Path = typer.Argument(None, help="where to write the exported checkpoint"),
    native: bool = typer.Option(False, "--native", help="write transformers' stock MoE twin of the family"),
    list_twins: bool = typer.Option(False, "--list", help="print what each family can become, and why others cannot"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output directory"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="write NaN/Inf weights instead of stopping at the first tensor with one"
    ),
) -> None:
    """Export a moekit checkpoint as its family's stock MoE twin (e.g. Qwen3-VL -> Qwen3-VL-MoE), in the tensor
    layout of the twin's released checkpoints, loadable by stock transformers, vLLM, SGLang and llama.cpp.

    Qwen2.5-VL (PolyV) has no stock twin: vLLM serves the moekit checkpoint itself through plugins/moekit-vllm
    (docs/serving.md)."""
    if list_twins:
        from moekit.upcycle.twins import REFUSED, TWINS

        for twin in TWINS.values():
            layers = "any MoE layers" if twin.sparsity != "every_layer" else "every layer MoE"
            typer.echo(f"{', '.join(twin.sources):16s} -> {twin.model_type:14s} ({layers}; layout of {twin.released})")
            typer.echo(f"{'':20s}serving: {twin.serving}")
        for family, reason in REFUSED.items():
            if reason:
                typer.echo(f"{family:16s} -> none: {reason}")
        return
    if source is None or output is None:
        raise ValueError("give SOURCE and OUTPUT (or --list)")
    if not native:
        raise ValueError("choose an export format: --native (the only one so far)")
    from moekit.upcycle.export import export_native

    out = export_native(source, output, overwrite=overwrite, progress=not quiet, allow_nonfinite=allow_nonfinite)
    typer.echo(f"wrote {out}")
