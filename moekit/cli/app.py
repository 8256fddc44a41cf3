"""The `moekit` command line."""

from __future__ import annotations

import typer

from moekit.cli import export_cmd, inspect_cmd, teach_cmd, tiny_cmd, upcycle_cmd

app = typer.Typer(
    name="moekit",
    help="Upcycle dense Hugging Face vision-language models into sparse Mixture-of-Experts models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("upcycle")(upcycle_cmd.upcycle)
app.command("inspect")(inspect_cmd.inspect)
app.command("export")(export_cmd.export)
app.command("teach")(teach_cmd.teach)
app.command("tiny")(tiny_cmd.tiny)


@app.command("version")
def version() -> None:
    """Print moekit's version."""
    from moekit import __version__

    typer.echo(__version__)


def main() -> None:
    app()
