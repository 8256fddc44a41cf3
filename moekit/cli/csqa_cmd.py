"""`moekit csqa build SOURCE PATH -o OUT` (paired scene graphs -> CSQA samples) and `moekit csqa templates`."""

from __future__ import annotations

from pathlib import Path

import typer

from moekit.cli.data_args import key_values
from moekit.cli.errors import CommandGroup

app = typer.Typer(
    help="Cross-vision QA (PolyV's CSQA) from paired scene graphs: PVSG, Action Genome, 3DSSG.",
    no_args_is_help=True,
    cls=CommandGroup,
)


@app.command("build")
def build(
    source: str = typer.Argument(..., metavar="SOURCE", help="pvsg | action-genome | 3dssg"),
    path: Path = typer.Argument(..., help="PVSG's data/, Action Genome's dataset/ag/, or the 3RScan scans folder"),
    out: Path = typer.Option(..., "-o", "--out", help="output folder (data.jsonl, report.json, media/)"),
    graphs: Path = typer.Option(None, "--graphs", help="3dssg: folder with objects.json + relationships.json"),
    generator: str = typer.Option("rules", "--generator", help="'rules' or a local model folder"),
    verifier: Path = typer.Option(None, "--verifier", help="a local VLM folder that must agree with each QA"),
    target: int = typer.Option(20000, "--target", help="QA samples wanted, balanced over the families"),
    seed: int = typer.Option(0, "--seed"),
    family: list[str] = typer.Option([], "--family", help="build only this family (repeatable)"),
    templates: Path = typer.Option(None, "--templates", help="YAML merged over the default templates"),
    option: list[str] = typer.Option([], "--option", help="loader option KEY=VALUE (repeatable), e.g. gap=10"),
    media: str = typer.Option("link", "--media", help="link | copy the released images and frames"),
    layout: str = typer.Option("joint", "--layout", help="joint: image + video/scene; paired: image + paired"),
    dedupe: str = typer.Option("pair", "--dedupe", help="pair | global: scope of duplicate questions"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty OUT"),
) -> None:
    """Build CSQA samples from a released scene-graph dataset; print the report's counts."""
    from moekit.config import parse_config
    from moekit.csqa.build import BuildSpec, build_csqa

    options = key_values(option)
    if graphs is not None:
        options["graphs"] = str(graphs)
    values = {
        "source": source,
        "path": str(path),
        "options": options,
        "generator": generator,
        "verifier": None if verifier is None else str(verifier),
        "target": target,
        "seed": seed,
        "families": family or None,
        "templates": None if templates is None else str(templates),
        "media": media,
        "layout": layout,
        "dedupe": dedupe,
    }
    report = build_csqa(parse_config(BuildSpec, values, source="moekit csqa build"), out, overwrite=overwrite)
    typer.echo(f"{report['kept']} QA samples from {report['pairs']} pairs -> {out / 'data.jsonl'}")
    for name, counts in report["families"].items():
        dropped = sum(counts["dropped"].values())
        typer.echo(f"  {name:18} generated {counts['generated']:6}  kept {counts['kept']:6}  dropped {dropped:6}")
    for stage, reasons in report["dropped"].items():
        for reason, count in reasons.items():
            typer.echo(f"  dropped at {stage}: {reason}: {count}")


@app.command("templates")
def templates() -> None:
    """Print the default templates as YAML (edit and pass with --templates)."""
    from moekit.csqa.templates import default_yaml

    typer.echo(default_yaml(), nl=False)
