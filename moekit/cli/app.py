"""The `moekit` command line."""

from __future__ import annotations

import typer

from moekit.cli import (
    calibrate_cmd,
    csqa_cmd,
    data_cmd,
    eval_cmd,
    evaluate_cmd,
    export_cmd,
    generate_cmd,
    inspect_cmd,
    plugins_cmd,
    recipe_cmd,
    routes_cmd,
    synth_cmd,
    teach_cmd,
    tiny_cmd,
    tiny_vlm_cmd,
    upcycle_cmd,
    verify_cmd,
)
from moekit.cli.errors import CommandGroup

app = typer.Typer(
    name="moekit",
    help="Upcycle dense Hugging Face vision-language models into sparse Mixture-of-Experts models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=CommandGroup,
)

app.command("run")(recipe_cmd.run)
app.command("validate")(recipe_cmd.validate)
app.command("upcycle")(upcycle_cmd.upcycle)
app.command("verify")(verify_cmd.verify)
app.command("inspect")(inspect_cmd.inspect)
app.command("export")(export_cmd.export)
app.command("calibrate-router")(calibrate_cmd.calibrate_router)
app.command("generate")(generate_cmd.generate)
app.command("eval")(eval_cmd.eval_benchmark)
app.command("evaluate")(evaluate_cmd.evaluate)
app.command("routes")(routes_cmd.routes)
app.command("teach")(teach_cmd.teach)
app.command("synth")(synth_cmd.synth)
app.command("tiny-vlm")(tiny_vlm_cmd.tiny_vlm)
app.command("tiny")(tiny_cmd.tiny)
app.command("plugins")(plugins_cmd.plugins)
app.add_typer(data_cmd.app, name="data")
app.add_typer(csqa_cmd.app, name="csqa")


@app.command("version")
def version() -> None:
    """Print moekit's version."""
    from moekit._version import __version__

    typer.echo(__version__)


def main() -> None:
    from moekit.io.atomic import handle_sigterm

    handle_sigterm()  # SIGTERM (Slurm, Kubernetes) cleans up like Ctrl-C: no partial output is left behind
    app()
