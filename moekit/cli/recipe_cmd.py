"""`moekit validate FILE` and `moekit run FILE`: check and run a training recipe or a pipeline of recipes.

Several processes: `torchrun --nproc_per_node N $(which moekit) run FILE` or
`accelerate launch --multi_gpu --num_processes N $(which moekit) run FILE`; the recipe's `distributed.mode`
picks DDP, FSDP2 or DeepSpeed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from moekit.recipe import Stage


def validate(
    file: Path = typer.Argument(..., help="recipe or pipeline YAML"),
    overrides: list[str] = typer.Option([], "--set", help="override a key before validation, e.g. stages[0].steps=10"),
    components: bool = typer.Option(True, help="also check plug-in component names and parameters"),
    data: bool = typer.Option(
        False, "--data", help="also check each stage's datasets: schema, media on disk, tokens against max_length"
    ),
    samples: int | None = typer.Option(
        None, "--samples", min=1, help="with --data: samples per dataset whose media and tokens are checked (64)"
    ),
    all_samples: bool = typer.Option(False, "--all", help="with --data: check the media and tokens of every sample"),
) -> None:
    """Validate a recipe (or pipeline) and show its stages; exit 1 with every problem and its YAML path."""
    from moekit.pipeline.checks import environment_problems
    from moekit.recipe import load_plan

    if (samples is not None or all_samples) and not data:
        raise ValueError("--samples and --all go with --data")
    if samples is not None and all_samples:
        raise ValueError("give --samples N or --all, not both")
    plan = load_plan(file, overrides, components=components)
    problems = environment_problems(plan) if components else []
    rows = [describe(s.stage) for s in plan.stages]
    table = Table(*rows[0].keys(), title=f"{file}: {len(rows)} stage(s)")
    for row in rows:
        table.add_row(*row.values())
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and pipes get whole lines
    console.print(table)
    if data:
        from moekit.pipeline.data_preflight import DEFAULT_SAMPLES, check_plan_data

        checked = check_plan_data(plan, samples=None if all_samples else samples or DEFAULT_SAMPLES)
        for line in checked.lines():
            typer.echo(line)
        problems += checked.problems
    if problems:
        raise ValueError(f"{file}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))


def run(
    file: Path = typer.Argument(..., help="recipe or pipeline YAML"),
    overrides: list[str] = typer.Option([], "--set", help="override a key before validation, e.g. stages[0].steps=10"),
    resume: bool = typer.Option(False, "--resume", help="skip finished stages, continue from the last checkpoint"),
    only: list[str] = typer.Option([], "--only", help="run only these stages (repeatable)"),
    accept_change: list[str] = typer.Option(
        [],
        "--accept-change",
        help="with --resume: a recipe field that may differ from the checkpoint's (steps, epochs, max_grad_norm, "
        "losses.ce, losses.load_balancing, losses.z_loss); recorded in the output's moekit.json",
    ),
) -> None:
    """Run a recipe's stages in order (launch with torchrun / accelerate launch for several processes)."""
    from moekit.pipeline import run_plan
    from moekit.recipe import load_plan
    from moekit.train.stage import main_process

    plan = load_plan(file, overrides)
    outputs = run_plan(plan, resume=resume, only=only, accept_changes=accept_change)
    if main_process():
        for path in outputs:
            typer.echo(f"wrote {path}")


def describe(stage: Stage) -> dict[str, str]:
    """One row of `moekit validate`'s table."""
    start = stage.start
    origin = {"base": "base", "stage": str(start.stage), "path": str(start.path), "upcycle": "upcycle"}[start.kind]
    if start.upcycle is not None:
        u = start.upcycle
        origin = f"upcycle {u.num_experts}x top-{u.top_k} {u.layers}"
    if stage.phases:
        trains = "; ".join(f"{p.name}: {', '.join(map(str, p.trainable))}" for p in stage.phases)
    else:
        trains = ", ".join(map(str, stage.trainable or []))
    length = f"{stage.steps} steps" if stage.steps is not None else f"{stage.epochs:g} epoch(s)"
    sched = stage.schedule
    warm = f"{sched.warmup_steps} steps" if sched.warmup_steps is not None else f"{sched.warmup_ratio or 0:g}"
    optim = f"lr {stage.optimizer.lr:g}, wd {stage.optimizer.weight_decay:g}, {sched.kind}, warm-up {warm}"
    if stage.position_encoders is None:
        encoders = "(inherited)"
    else:
        encoders = ", ".join(e.name for e in stage.position_encoders) or "none"
    return {
        "stage": stage.name,
        "from": origin,
        "encoders": encoders,
        "trains": trains,
        "length": length,
        "optimizer": optim,
        "save": stage.save,
    }
