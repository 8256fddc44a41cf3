"""Training checkpoints: model, optimizer, schedule, RNG and data position, written atomically.

Layout: `<stage dir>/checkpoints/step-00000120/` with `state/` (torch.distributed.checkpoint: model and
optimizer, sharded under FSDP2, written once under DDP) or `deepspeed/`, plus `trainer.pt` (schedule, RNG of
every process, data position) and `trainer_state.json` (the same position, readable). Every process writes
into `.step-00000120.partial/`; the main process renames it when all are done, so a directory named `step-*`
is always complete.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.train.engine import Engine

PREFIX = "step-"


@dataclass
class Position:
    """Where training stands after `step` optimizer steps."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # micro-batches of `epoch` this process has consumed
    tokens: int = 0  # tokens seen, all processes
    world_size: int = 1
    batch_size: int = 1
    grad_accum: int = 1


def checkpoint_root(stage_dir: Path) -> Path:
    return stage_dir / "checkpoints"


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = checkpoint_root(stage_dir)
    done = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir()) if root.is_dir() else []
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine: Engine, stage_dir: Path, position: Position, keep: int) -> Path:
    """Write a checkpoint of the current step (every process must call this); return its directory."""
    root = checkpoint_root(stage_dir)
    final = root / f"{PREFIX}{position.step:08d}"
    partial = root / f".{final.name}.partial"
    if engine.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    engine.barrier()
    engine.save_state(partial)
    rngs = engine.gather_objects(rng_state())
    if engine.is_main:
        torch.save(
            {"position": asdict(position), "scheduler": engine.scheduler.state_dict(), "rng": rngs},
            partial / "trainer.pt",
        )
        (partial / "trainer_state.json").write_text(json.dumps(asdict(position), indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for old in sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    return final


def load_checkpoint(engine: Engine, path: Path, expected: Position) -> Position:
    """Restore model, optimizer, schedule and RNG from `path`; the process layout must match the one saved."""
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    position = Position(**trainer["position"])
    layout = ("world_size", "batch_size", "grad_accum")
    if any(getattr(position, k) != getattr(expected, k) for k in layout):
        saved = ", ".join(f"{k}={getattr(position, k)}" for k in layout)
        now = ", ".join(f"{k}={getattr(expected, k)}" for k in layout)
        raise ValueError(f"{path} was written with {saved}; this run has {now}. Resume with the same layout.")
    engine.load_state(path)
    engine.scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"][engine.rank])
    return position
