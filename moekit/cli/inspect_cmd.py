"""`moekit inspect`: layer map, experts, top-k and total vs activated parameters, from config alone."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def inspect(
    path: Path = typer.Argument(..., help="checkpoint directory or config.json (weights are never read, headers are)"),
    layers: str = typer.Option(None, "--layers", help="for a dense config: project this MoE layout, e.g. interval:4"),
    num_experts: int = typer.Option(4, "--num-experts", help="experts per MoE layer for --layers"),
    top_k: int = typer.Option(2, "--top-k", help="experts per token for --layers"),
    shared_expert: bool = typer.Option(False, "--shared-expert", help="add a shared expert for --layers"),
) -> None:
    """Show a model's layer map (dense / MoE) and its total vs activated parameters; for a checkpoint folder, check
    its shard headers against config.json and its index against the shards (exit 1 when they disagree)."""
    from moekit.arch import resolve_arch
    from moekit.config.record import MoeRecord
    from moekit.modeling.meta_model import meta_model, read_config
    from moekit.moe.accounting import account, billions
    from moekit.upcycle import UpcycleSpec, upcycle
    from moekit.upcycle.checks import checkpoint_problems

    config = read_config(path)
    model = meta_model(config)
    problems, weights = checkpoint_problems(path, model, config) if path.is_dir() else ([], "")
    kind = config.model_type
    record = MoeRecord.of(config)
    dense = None
    adapter = resolve_arch(model)
    if record is None:
        dense = account(model, adapter)
        if layers:
            spec = UpcycleSpec(layers=layers, num_experts=num_experts, top_k=top_k, shared_expert=shared_expert)
            model = upcycle(model, spec)
            record = MoeRecord.of(model.config)
    result = account(model, adapter)
    console = Console()
    console.print(
        f"[bold]{path}[/bold]  model type [cyan]{kind}[/cyan], {len(result.layers)} decoder layers at {adapter.layers}"
    )
    console.print(
        "layer map: " + "".join("M" if r.kind == "moe" else "." for r in result.layers) + "   (M = MoE, . = dense)"
    )
    if record is not None:
        console.print(
            f"MoE layers {result.moe_layers}: {record.num_experts} experts {record.experts}, top-{record.top_k}"
            + (", shared expert" if record.shared_expert else "")
        )
    table = Table("", "total", "activated")
    if dense is not None:
        table.add_row("dense", billions(dense.total), billions(dense.active))
    if record is not None:
        table.add_row("MoE", billions(result.total), billions(result.active))
        if dense is not None:
            table.add_row(
                "increment", "+" + billions(result.total - dense.total), "+" + billions(result.active - dense.active)
            )
    console.print(table)
    if weights and not problems:
        console.print(f"weights: {weights}, shapes match config.json: healthy")
    if problems:
        raise ValueError(f"{path} is not a healthy checkpoint ({weights}):\n  " + "\n  ".join(problems))
