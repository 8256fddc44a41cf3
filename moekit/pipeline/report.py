"""Build the report folder of a finished pipeline (`report:` in a pipeline YAML).

- `loss_curves.png`: every logged loss term of every stage (from `<stage>/logs/metrics.jsonl`);
- `accuracy.png` and a table: held-out multiple-choice accuracy of the base, the chosen stages and the final
  model, per task (answer log-likelihood ranking, `moekit.evaluate.choices`);
- `routes/`: routing share per expert per dataset and per modality of the final MoE model (PolyV Fig. 5-6);
- a parameter table (total vs activated) of the base and the final model;
- `benchmarks`: the pipeline's `evaluate:` steps, each model scored by `moekit eval` (its runs, resumable, in
  `eval/<benchmark>/<model>/` beside the report), as one table like the paper's;
- `report.md` and `report.json` with all numbers, the wall time of each stage and the machine they were
  measured on (the same commit gives other numbers on another VM).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from moekit.arch import resolve_arch
from moekit.data.config import DataConfig
from moekit.data.loader import build_dataset
from moekit.evaluate.choices import read_choice_samples, score_choices
from moekit.evaluate.machine import machine_info, machine_line
from moekit.evaluate.model_dir import open_model_dir
from moekit.evaluate.routes import write_routes
from moekit.evaluate.run import EvalSettings, run_eval
from moekit.io.atomic import atomic_dir
from moekit.modeling.meta_model import meta_model, read_config
from moekit.moe.accounting import account
from moekit.pipeline.report_plots import plot_accuracy, plot_losses


def read_log(stage_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], float | None]:
    """(loss term -> [(step, value)], wall seconds from stage start to end) of one stage's metrics log."""
    path = stage_dir / "logs" / "metrics.jsonl"
    curves: dict[str, list[tuple[int, float]]] = {}
    start = end = None
    if not path.is_file():
        return curves, None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["event"] in ("stage_start", "resume") and start is None:
            start = record["time"]
        elif record["event"] == "stage_end":
            end = record["time"]
        elif record["event"] == "train":
            for key, value in record.items():
                if (key == "loss" or key.startswith("loss/")) and isinstance(value, (int, float)):
                    curves.setdefault(key, []).append((record["step"], float(value)))
    return curves, (end - start) if start is not None and end is not None else None


def _parameters(path: Path) -> dict[str, Any]:
    model = meta_model(read_config(path))
    adapter = resolve_arch(model)
    result = account(model, adapter)
    return {"total": result.total, "active": result.active, "moe_layers": result.moe_layers}


@torch.no_grad()
def _accuracy(path: Path, eval_file: Path) -> dict[str, Any]:
    opened = open_model_dir(path)
    samples = read_choice_samples(eval_file)
    report = score_choices(opened.model, opened.preprocessor, samples, eval_file.parent, encoders=opened.encoders)
    report.pop("samples", None)
    return report


def _routes(path: Path, files: list[str], out: Path, max_samples: int | None) -> dict[str, Any]:
    config = DataConfig(datasets=[{"name": Path(f).stem, "path": f} for f in files], bad_samples="skip")
    opened = open_model_dir(path, moe=True)
    dataset = build_dataset(config, opened.preprocessor)
    with torch.no_grad():
        report = write_routes(
            opened.model, dataset, out, str(path), max_samples=max_samples, config=config, encoders=opened.encoders
        )
    return {k: {"samples": v["samples"], "expert_share": v["expert_share"]} for k, v in report["modalities"].items()}


def check_models(spec: Any, evaluate: list[Any], stages: list[str]) -> None:
    """Refuse unknown model names in `report.compare` and `evaluate[i].models` (before anything trains)."""
    known = {"base", *stages}
    places = [("report.compare", spec.compare)] + [(f"evaluate[{i}].models", e.models) for i, e in enumerate(evaluate)]
    for where, names in places:
        unknown = [m for m in names if m not in known]
        if unknown:
            raise ValueError(f"{where}: unknown models {unknown}; choose 'base' or stages {stages}")


def _benchmarks(evaluate: list[Any], models: dict[str, Path], final: str, report_out: Path, log) -> dict[str, Any]:
    """{benchmark: {model: scores.json}} of every `evaluate:` step."""
    out: dict[str, Any] = {}
    for step in evaluate:
        folder = Path(step.out) if step.out else report_out.parent / "eval" / step.benchmark
        settings = EvalSettings(max_new_tokens=step.max_new_tokens, max_frames=step.max_frames, limit=step.limit)
        for model in dict.fromkeys(step.models or [final]):
            log(f"report: {step.benchmark} on {model}")
            scores = run_eval(
                step.benchmark,
                models[model],
                step.data,
                folder / model,
                media=step.media,
                settings=settings,
                progress=False,
                log=log,
            )
            out.setdefault(step.benchmark, {})[model] = {k: v for k, v in scores.items() if k != "machine"}
    return out


def build_report(spec: Any, base: Path, stages: list[tuple[str, Path]], log=print, evaluate=()) -> Path:
    """Write the report of a pipeline whose stages (name, stage dir) ran in order; return the folder."""
    started = time.perf_counter()
    final_name, final_dir = stages[-1]
    models = {"base": base} | {name: d / "model" for name, d in stages}
    check_models(spec, list(evaluate), [n for n, _ in stages])
    wanted = [*spec.compare, final_name]
    data: dict[str, Any] = {"machine": machine_info(), "stages": {}, "accuracy": {}, "parameters": {}}
    curves = {}
    for name, stage_dir in stages:
        curves[name], seconds = read_log(stage_dir)
        data["stages"][name] = {"seconds": seconds, "final": {k: v[-1][1] for k, v in curves[name].items()}}
    for model in dict.fromkeys(["base", final_name]):
        data["parameters"][model] = _parameters(models[model])
    with atomic_dir(spec.out) as tmp:
        plot_losses(curves, tmp / "loss_curves.png")
        if spec.eval is not None:
            for model in dict.fromkeys(wanted):
                log(f"report: evaluating {model} on {spec.eval}")
                data["accuracy"][model] = _accuracy(models[model], Path(spec.eval))
            plot_accuracy(data["accuracy"], tmp / "accuracy.png")
        data["benchmarks"] = _benchmarks(list(evaluate), models, final_name, Path(spec.out), log)
        if spec.routes and data["parameters"][final_name]["moe_layers"]:
            log(f"report: routing of {final_name}")
            data["routes"] = _routes(models[final_name], spec.routes, tmp / "routes", spec.routes_max_samples)
        data["report_seconds"] = time.perf_counter() - started
        (tmp / "report.json").write_text(json.dumps(data, indent=2))
        (tmp / "report.md").write_text(markdown(data, final_name))
    return Path(spec.out)


def markdown(data: dict[str, Any], final: str) -> str:
    lines = ["# moekit pipeline report", "", f"Measured on {machine_line(data['machine'])}.", ""]
    lines += ["## Stages", "", "| stage | wall s | final loss terms |", "| --- | --- | --- |"]
    for name, row in data["stages"].items():
        terms = ", ".join(f"{k.removeprefix('loss/')} {v:.3g}" for k, v in sorted(row["final"].items()))
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.0f}"
        lines.append(f"| {name} | {seconds} | {terms} |")
    lines += [
        "",
        "Loss curves: `loss_curves.png`.",
        "",
        "## Parameters",
        "",
        "| model | total | activated | MoE layers |",
    ]
    lines.append("| --- | --- | --- | --- |")
    for name, row in data["parameters"].items():
        lines.append(f"| {name} | {row['total']:,} | {row['active']:,} | {row['moe_layers'] or '-'} |")
    if data["accuracy"]:
        tasks = sorted({t for r in data["accuracy"].values() for t in r["per_task"]})
        lines += ["", "## Held-out accuracy", "", "| model | all | " + " | ".join(tasks) + " |"]
        lines.append("| --- " * (len(tasks) + 2) + "|")
        chance = next(iter(data["accuracy"].values()))
        lines.append(
            f"| chance | {chance['chance']:.2f} | "
            + " | ".join(f"{chance['per_task'][t]['chance']:.2f}" if t in chance["per_task"] else "-" for t in tasks)
            + " |"
        )
        for name, row in data["accuracy"].items():
            cells = [f"{row['per_task'][t]['accuracy']:.2f}" if t in row["per_task"] else "-" for t in tasks]
            lines.append(f"| {name} | {row['accuracy']:.2f} | " + " | ".join(cells) + " |")
        lines += ["", "Plot: `accuracy.png`."]
    if data.get("benchmarks"):
        names = list(data["benchmarks"])
        rows = list(dict.fromkeys(m for b in data["benchmarks"].values() for m in b))
        lines += ["", "## Benchmarks (`moekit eval`, overall score)", "", "| model | " + " | ".join(names) + " |"]
        lines.append("| --- " * (len(names) + 1) + "|")
        for model in rows:
            cells = [data["benchmarks"][b].get(model) for b in names]
            lines.append(
                f"| {model} | " + " | ".join("-" if c is None else f"{c['overall']:.3f}" for c in cells) + " |"
            )
        lines += [""] + [f"- {b}: {next(iter(v.values()))['metric']}" for b, v in data["benchmarks"].items()]
    if data.get("routes"):
        lines += ["", f"## Routing of {final} by modality (share of top-k selections, all MoE layers)", ""]
        experts = None
        for modality, row in data["routes"].items():
            experts = experts or len(row["expert_share"])
            lines.append(
                f"- {modality} ({row['samples']} samples): " + ", ".join(f"{100 * s:.0f}%" for s in row["expert_share"])
            )
        lines += ["", "Plots and per-layer numbers: `routes/`."]
    return "\n".join(lines) + "\n"
