"""Training logs: a JSONL file the report builder reads, TensorBoard scalars, and a rich progress bar.

`<stage dir>/logs/metrics.jsonl` holds one JSON object per line, each with an `event`:
- `stage_start`: stage, steps, trainable parameter count, mode, world size, precision;
- `train`: step, phase, and flat metrics (`loss`, `loss/ce`, `loss/load_balancing`, `loss/z_loss`,
  `loss/<head>/<term>`, `lr`, `grad_norm`, `tokens_per_s`, `tokens`, `routing/balance`,
  `routing/share/<kind>/<expert>`);
- `phase`: a new phase starts (name, step, trainable groups);
- `checkpoint`: step and path; `stage_end`: final step and output directory.
On resume, `train` lines after the restored step are dropped, so every step appears once.
Only the main process writes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class RunLogger:
    def __init__(self, stage_dir: Path, stage: str, total_steps: int, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.stage = stage
        self.path = stage_dir / "logs" / "metrics.jsonl"
        self.writer = None
        self.progress: Progress | None = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume_step:  # a fresh run: logs of an earlier attempt would mix with this one
            self.path.unlink(missing_ok=True)
            shutil.rmtree(stage_dir / "logs" / "tb", ignore_errors=True)
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if not _after(line, resume_step)]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(stage_dir / "logs" / "tb"), purge_step=resume_step or None)
        except ImportError:  # tensorboard is a dependency, but a stripped environment still gets the JSONL log
            self.writer = None
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task(stage, total=total_steps, completed=resume_step, status="")
        self.progress.start()

    def event(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "stage": self.stage, "time": round(time.time(), 3), **fields}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def train(self, step: int, phase: str | None, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.event("train", step=step, phase=phase, **metrics)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        status = f"loss {metrics.get('loss', float('nan')):.4f}  lr {metrics.get('lr', 0):.2e}"
        if "tokens_per_s" in metrics:
            status += f"  {metrics['tokens_per_s']:.0f} tok/s"
        self.progress.update(self.task, completed=step, status=status)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        self.progress.stop()


def _after(line: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return True  # a line cut by a crash
    return record.get("event") == "train" and record.get("step", 0) > step


def read_metrics(path: str | Path, event: str = "train") -> list[dict[str, Any]]:
    """The records of one kind from a metrics.jsonl (for reports and tests)."""
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r.get("event") == event]
