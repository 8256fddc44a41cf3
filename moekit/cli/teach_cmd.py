"""`moekit teach`: precompute a teacher's features for a dataset into a resumable feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer


def teach(
    teacher: str = typer.Option(..., "--teacher", help="teacher name (see `moekit plugins`), e.g. vjepa2 or vggt"),
    data: Path = typer.Option(..., "--data", help="JSONL with an id and a video, image or scene per line"),
    out: Path = typer.Option(..., "-o", "--out", help="cache directory (created; an existing one is resumed)"),
    param: list[str] = typer.Option([], "--param", help="teacher param key=value, e.g. checkpoint=./vjepa2"),
    config: Path = typer.Option(None, "--config", help="YAML file of teacher params (--param overrides it)"),
    root: Path = typer.Option(None, "--root", help="folder that relative frame paths start from (default: data's)"),
    dtype: Literal["float32", "bfloat16", "float16"] = typer.Option("bfloat16", "--dtype", help="stored feature dtype"),
    shard_mb: float = typer.Option(1024.0, "--shard-mb", help="start a new shard after this many MB"),
    overwrite: bool = typer.Option(False, "--overwrite", help="discard features already in the cache"),
) -> None:
    """Run a teacher over a dataset once and store its features, so training reads them instead."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from moekit.attach.teachers import build_cache, read_samples
    from moekit.attach.teachers.cache import check_compatible
    from moekit.config import apply_overrides, load_yaml, parse_config
    from moekit.io.overlap import check_apart
    from moekit.plugins.registry import registry

    params = load_yaml(config) if config is not None else {}
    if not isinstance(params, dict):
        raise ValueError(f"{config}: expected a mapping of teacher params, got {type(params).__name__}")
    params = apply_overrides(params, param)
    samples = read_samples(data, root)  # every line checked before a teacher loads or anything is written
    component = registry().get("teacher", teacher, where=f"--teacher {teacher}")
    validated = parse_config(component.params, params, source=f"teacher {teacher} params (--config/--param)")
    stored = validated.model_dump(mode="json")
    paths = {f"--param {k}": v for k, v in stored.items() if isinstance(v, str) and v and Path(v).exists()}
    check_apart(out, {"--data": data, "--root": root, "--config": config, **paths})
    if not overwrite:
        check_compatible(out, teacher, stored, dtype)  # before the teacher loads
    model = component.build(validated)
    console = Console(stderr=True)
    console.print(f"teacher [cyan]{teacher}[/cyan] (dim {model.dim}) over {len(samples)} samples -> {out}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("features", total=len(samples))
        report = build_cache(
            model,
            samples,
            out,
            teacher_name=teacher,
            params=stored,
            dtype=dtype,
            shard_mb=shard_mb,
            overwrite=overwrite,
            on_sample=lambda _id, _computed: progress.advance(task),
        )
    console.print(
        f"computed {report.computed}, already cached {report.skipped}, {report.shards_written} new shard(s) in {out}"
    )
