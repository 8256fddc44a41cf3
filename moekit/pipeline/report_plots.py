"""Report plots (matplotlib, headless): loss curves per stage and held-out accuracy per model and task."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    """One panel per stage, one line per loss term (total, CE, load balancing, synergy terms)."""
    plt = _pyplot()
    stages = [s for s, terms in curves.items() if terms]
    if not stages:
        return
    cols = min(3, len(stages))
    rows = (len(stages) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, stage in zip(axes.flat, stages):
        for term, points in sorted(curves[stage].items()):
            steps, values = zip(*points)
            ax.plot(steps, values, label=term.removeprefix("loss/") if term != "loss" else "total", linewidth=1.2)
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(stages) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Grouped bars: accuracy per task for each evaluated model, with each task's chance level."""
    plt = _pyplot()
    models = list(results)
    tasks = sorted({t for r in results.values() for t in r["per_task"]})
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.6))
    width = 0.8 / max(1, len(models))
    colours = plt.get_cmap("tab10").colors
    for m, model in enumerate(models):
        xs = [t + (m - (len(models) - 1) / 2) * width for t in range(len(tasks))]
        values = [100 * results[model]["per_task"].get(task, {}).get("accuracy", 0.0) for task in tasks]
        bars = ax.bar(xs, values, width, label=model, color=colours[m % 10])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    for t, task in enumerate(tasks):
        chance = next(r["per_task"][task]["chance"] for r in results.values() if task in r["per_task"])
        ax.hlines(100 * chance, t - 0.45, t + 0.45, colors="black", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("held-out accuracy (%)  (dashed: chance)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
