"""The one error handler of the command line: a user mistake prints `error: ...` (exit code 1), not a traceback.

Every command runs inside `CommandGroup.invoke`, so commands raise plain exceptions and never handle them
themselves. `MOEKIT_DEBUG=1` lets the traceback through.
"""

from __future__ import annotations

import os

import click
import typer
from typer.core import TyperGroup

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, PermissionError, OSError)


class CommandGroup(TyperGroup):
    """moekit's command group: user errors in one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            if os.environ.get("MOEKIT_DEBUG"):
                raise
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            click.echo(f"error: {message}", err=True)
            raise typer.Exit(1) from None
