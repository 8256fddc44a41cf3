"""The `moekit` command line."""

from __future__ import annotations

import typer

from moekit.cli import inspect_cmd, recipe_cmd

app = typer.Typer(
    name="moekit",
    help="Upcycle dense Hugging Face vision-language models into sparse Mixture-of-Experts models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("inspect")(inspect_cmd.inspect)
app.command("validate")(recipe_cmd.validate)
app.command("run")(recipe_cmd.run)


@app.command("version")
def version() -> None:
    """Print moekit's version."""
    from moekit import __version__

    typer.echo(__version__)


def main() -> None:
    app()
