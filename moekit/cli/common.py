"""Shared CLI plumbing: one clean error line (and exit code 1) instead of a traceback for user mistakes."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import typer

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, PermissionError, OSError)


def fail_on_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print user errors as `error: ...` and exit 1; MOEKIT_DEBUG=1 shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            if os.environ.get("MOEKIT_DEBUG"):
                raise
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"error: {message}", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper
