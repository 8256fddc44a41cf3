"""`moekit verify MOE_DIR --base DENSE_DIR`: does the MoE checkpoint still compute its dense base's function?"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def verify(
    moe: Path = typer.Argument(..., help="a moekit MoE checkpoint directory"),
    base: Path = typer.Option(..., "--base", help="the dense checkpoint it was upcycled from"),
    tolerance: float = typer.Option(1e-4, "--tolerance", help="largest allowed |logit difference| (float32)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Check that an MoE checkpoint computes its dense base's function (logits on a text probe).

    The MoE with every expert set to the base FFN is compared with the dense model (this proves the MoE layout
    exact, whatever the experts learned), and, when every expert started as a copy, the checkpoint as it is.
    Exit 1 when a difference exceeds the tolerance."""
    from transformers.utils import logging

    from moekit.upcycle.verify import verify_checkpoint

    logging.disable_progress_bar()

    report = verify_checkpoint(moe, base, tolerance)
    if as_json:
        typer.echo(json.dumps({**report.__dict__, "ok": report.ok}, indent=2))
    else:
        typer.echo(f"MoE layers {report.layers}, {report.tokens} probe tokens, tolerance {report.tolerance:g}")
        typer.echo(f"  experts set to the base FFN: max |logit diff| {report.replaced:.3g}")
        state = "" if report.copies_only else "  (not a copies-only checkpoint: expected to differ)"
        typer.echo(f"  the checkpoint as it is:     max |logit diff| {report.as_is:.3g}{state}")
        for note in report.notes:
            typer.echo(f"  note: {note}")
        typer.echo("ok: the MoE computes its base's function" if report.ok else "FAILED: the logits differ")
    if not report.ok:
        raise typer.Exit(1)
