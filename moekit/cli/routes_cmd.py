"""`moekit routes MODEL --data FILE -o DIR`: expert shares per dataset and per modality, as JSON and plots."""

from __future__ import annotations

from pathlib import Path

import typer


def routes(
    model: Path = typer.Argument(..., help="moekit MoE checkpoint folder"),
    data: list[Path] = typer.Option(
        ..., "--data", help="dataset JSON/JSONL (repeatable) or a YAML with a data: section"
    ),
    out: Path = typer.Option(..., "-o", "--out", help="output folder for routes.json and the PNG plots"),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="folder with the tokenizer (default: MODEL)"),
    batch_size: int = typer.Option(4, help="samples per forward pass"),
    max_samples: int = typer.Option(None, help="at most this many samples per dataset"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip bad samples instead of failing"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder"),
) -> None:
    """Run MODEL over the data and record which experts the routers pick (PolyV Fig. 5 / Fig. 6 views)."""
    import torch

    from moekit.cli.data_args import data_config
    from moekit.data.loader import build_dataset
    from moekit.evaluate.model_dir import open_model_dir
    from moekit.evaluate.routes import write_routes
    from moekit.io.atomic import is_nonempty_dir

    if is_nonempty_dir(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    config, base = data_config(data, max_samples, "skip" if skip_bad else "fail")
    opened = open_model_dir(model, tokenizer, moe=True)  # with the position encoders saved beside it, if any
    dataset = build_dataset(config, opened.preprocessor, base_dir=base)
    with torch.no_grad():  # not set_grad_enabled: the CLI also runs inside other programs (tests, notebooks)
        report = write_routes(
            opened.model,
            dataset,
            out,
            str(model),
            batch_size=batch_size,
            max_samples=max_samples,
            config=config,
            encoders=opened.encoders,
        )
    experts = report["experts"] or []
    typer.echo(f"wrote {out}/routes.json and plots; experts {experts}")
    for group, label in (("datasets", "dataset"), ("modalities", "modality")):
        for name, entry in report[group].items():
            shares = " ".join(f"{100 * s:5.1f}%" for s in entry["expert_share"])
            typer.echo(f"  {label:8s} {name:24s} {entry['samples']:5d} samples  {shares}")
