"""Outputs never overlap inputs: a folder that is, contains or lies inside an input is refused before anything is
written, so `--overwrite` (which replaces the output) can never delete a checkpoint or a dataset being read."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def overlap(output: str | Path, path: str | Path) -> str | None:
    """How `output` overlaps `path` ("is", "contains", "lies inside"), symlinks resolved; None when apart."""
    out, other = _real(output), _real(path)
    if out == other:
        return "is"
    if out in other.parents:
        return "contains"
    if other in out.parents:
        return "lies inside"
    return None


def check_apart(
    output: str | Path, inputs: Mapping[str, str | Path | None] | Iterable[tuple[str, str | Path | None]]
) -> None:
    """Raise ValueError when `output` is, contains or lies inside one of `inputs` ({label: path}; None skipped),
    or is the current directory or one above it."""
    items = list(inputs.items() if isinstance(inputs, Mapping) else inputs)
    problems = []
    for label, path in items:
        if path is None or str(path) == "":
            continue
        relation = overlap(output, path)
        if relation is not None:
            problems.append(f"{relation} {label} ({path})")
    here = overlap(output, Path.cwd())
    if here in ("is", "contains"):
        problems.append(f"{here} the current directory")
    if problems:
        raise ValueError(
            f"output {output} overlaps an input: it {'; it '.join(problems)}. Nothing was written; choose an output "
            "folder outside every input (--overwrite would have deleted it)"
        )
