"""Run a pipeline's `prepare:` steps: each writes its folder atomically and is skipped when the folder exists."""

from __future__ import annotations

from pathlib import Path

from moekit.demo.bundle import write_tiny_vlm
from moekit.demo.synth.writer import write_synth
from moekit.io.atomic import atomic_dir
from moekit.plugins import registry as plugin_registry
from moekit.recipe.prepare import PrepareStep


def run_prepare(steps: list[PrepareStep], log=print) -> None:
    """Create every missing input, in order."""
    for index, step in enumerate(steps):
        out = Path(step.out)
        if out.exists():
            log(f"prepare[{index}] {step.kind}: {out} exists, kept")
            continue
        if step.kind == "tiny_vlm":
            write_tiny_vlm(out, hidden_size=step.hidden_size, layers=step.layers, seed=step.seed)
        elif step.kind == "synth":
            write_synth(out, step.spec)
        else:
            component = tiny_teacher(step.teacher, f"prepare[{index}].teacher")
            with atomic_dir(out) as tmp:
                component.tiny(tmp, step.seed)
        log(f"prepare[{index}] {step.kind}: wrote {out}")


def tiny_teacher(name: str, where: str):
    """The teacher component `name`, which must know how to write a tiny checkpoint."""
    component = plugin_registry.registry().get("teacher", name, where)
    if component.tiny is None:
        raise ValueError(f"{where}: teacher {name!r} ({component.plugin}) cannot write a tiny checkpoint")
    return component
