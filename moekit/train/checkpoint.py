"""Training checkpoints: model, optimizer, schedule, RNG and data position, written atomically.

Layout: `<stage dir>/checkpoints/step-00000120/` with `state/` (torch.distributed.checkpoint: model and
optimizer, sharded under FSDP2, written once under DDP) or `deepspeed/`, plus `trainer.pt` (schedule, RNG of
every process, data position) and `trainer_state.json` (the same position, readable). Every process writes
into `.step-00000120.partial/`; the main process renames it when all are done, so a directory named `step-*`
is always complete.

Each checkpoint also records the training-relevant part of the stage's recipe (`recipe` in `trainer.pt` and
`trainer_state.json`, with its sha256 `fingerprint`); resuming with a recipe that differs is refused, naming the
fields, unless every changed field is one of `ACCEPTABLE` and was accepted (`moekit run --resume
--accept-change FIELD`); accepted changes are kept in `Position.resumes` and reach the output's `moekit.json`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import re
import shutil
import traceback
from dataclasses import asdict, dataclass, field
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
    resumes: list[dict[str, Any]] = field(default_factory=list)  # step, checkpoint, accepted recipe changes


# Stage fields that do not change what training computes: left out of the fingerprint.
OPERATIONAL = (
    "save_every",
    "keep_checkpoints",
    "save",
    "log_every",
    "experts_implementation",
    "gradient_checkpointing",
)
# Fields that may change on resume when accepted: each is read afresh from the recipe, so the rest of the run
# follows the new value and nothing claims otherwise.
ACCEPTABLE = ("steps", "epochs", "max_grad_norm", "losses.ce", "losses.load_balancing", "losses.z_loss")


def training_fields(stage: Any) -> dict[str, Any]:
    """The stage's training-relevant recipe as flat `path: value` pairs (`optimizer.lr`, `phases[1].steps`)."""
    data = stage.model_dump(mode="json", by_alias=True)
    return _flat({k: v for k, v in data.items() if k not in OPERATIONAL})


def fingerprint(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out = {}
        for key in sorted(data):
            out.update(_flat(data[key], f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(data, list) and data:
        out = {}
        for index, item in enumerate(data):
            out.update(_flat(item, f"{prefix}[{index}]"))
        return out
    return {prefix: data}


_PATH_PART = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")


def _unflat(fields: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `_flat`: `{"optimizer.lr": 0.01, "phases[1].steps": 5}` -> nested dicts and lists."""
    root: dict[str, Any] = {}
    for path, value in fields.items():
        steps: list[str | int] = []
        for part in path.split("."):
            match = _PATH_PART.fullmatch(part)
            if match is None:
                raise ValueError(f"not a recipe path: {path!r}")
            steps.append(match.group(1))
            steps.extend(int(i) for i in re.findall(r"\d+", match.group(2)))
        node: Any = root
        for step, following in zip(steps, steps[1:]):
            empty: Any = [] if isinstance(following, int) else {}
            if isinstance(step, int):
                node.extend(None for _ in range(step + 1 - len(node)))
                node[step] = empty if node[step] is None else node[step]
            else:
                node.setdefault(step, empty)
            node = node[step]
        if isinstance(steps[-1], int):
            node.extend(None for _ in range(steps[-1] + 1 - len(node)))
        node[steps[-1]] = value
    return root


def saved_under_schema(saved: dict[str, Any], stage: Any) -> dict[str, Any]:
    """A checkpoint's `training_fields` as this moekit's schema reads them: a field added since the checkpoint
    was written is filled with its default (which is what the old recipe meant), so resuming after an upgrade is
    not refused for it. `saved` as it is when it no longer validates (a field renamed or removed): the refusal
    then names what differs."""
    try:
        data = _unflat(saved)
        dumped = stage.model_dump(mode="json", by_alias=True)
        data.update({k: v for k, v in dumped.items() if k in OPERATIONAL})
        return training_fields(type(stage).model_validate(data))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):  # pydantic's ValidationError included
        return saved


def recipe_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{path: (in the checkpoint, now)}` of every field that differs ('<absent>' where one side lacks it)."""
    missing = "<absent>"
    return {
        k: (saved.get(k, missing), now.get(k, missing))
        for k in sorted(set(saved) | set(now))
        if saved.get(k, missing) != now.get(k, missing)
    }


def check_recipe(
    path: Path, saved: dict[str, Any] | None, now: dict[str, Any], accept: tuple[str, ...], where: str
) -> dict[str, list[Any]]:
    """Refuse a resume whose recipe differs from the checkpoint's in fields not accepted; return the accepted
    changes as `{field: [in the checkpoint, now]}`."""
    unknown = [f for f in accept if f not in ACCEPTABLE]
    if unknown:
        raise ValueError(f"--accept-change {unknown[0]!r}: not a field a resume can take; choose from {ACCEPTABLE}")
    if saved is None:  # written before checkpoints kept their recipe
        return {}
    changes = recipe_changes(saved, now)
    refused = {k: v for k, v in changes.items() if k not in accept}
    if refused:
        shown = "; ".join(f"{where}.{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in refused.items())
        fixable = [k for k in refused if k in ACCEPTABLE]
        hint = f" (--accept-change {' --accept-change '.join(fixable)} takes these)" if fixable else ""
        raise ValueError(
            f"{path} was written by a different recipe: {shown}. Resume with the recipe it was written with, or "
            f"accept changes to {', '.join(ACCEPTABLE)} with --accept-change FIELD{hint}; anything else needs a new "
            "run (remove the checkpoints or choose another output_dir)"
        )
    return {k: list(v) for k, v in changes.items()}


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


def save_checkpoint(
    engine: Engine, stage_dir: Path, position: Position, keep: int, recipe: dict[str, Any] | None = None
) -> Path:
    """Write a checkpoint of the current step (every process must call this); return its directory. `recipe` is
    the stage's `training_fields`, kept with its fingerprint so a resume can tell whether the recipe changed."""
    root = checkpoint_root(stage_dir)
    final = root / f"{PREFIX}{position.step:08d}"
    partial = root / f".{final.name}.partial"
    if engine.is_main:
        for stale in root.glob(f".{PREFIX}*.partial"):  # a killed save's; one run writes a stage folder at a time
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir(parents=True)
    engine.barrier()
    try:
        engine.save_state(partial)
        rngs = engine.gather_objects(rng_state())
        if engine.is_main:
            stamp = {"recipe": recipe, "fingerprint": fingerprint(recipe)} if recipe is not None else {}
            torch.save(
                {"position": asdict(position), "scheduler": engine.scheduler.state_dict(), "rng": rngs, **stamp},
                partial / "trainer.pt",
            )
            (partial / "trainer_state.json").write_text(json.dumps({**asdict(position), **stamp}, indent=2))
    except BaseException as exc:
        if engine.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        if disk_full(exc):
            raise OSError(errno.ENOSPC, _disk_full_message(engine, stage_dir, final)) from None
        raise
    if engine.is_main:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for old in sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    return final


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps: torch.distributed.checkpoint gathers each rank's failure) is ENOSPC."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = "".join(traceback.format_exception(exc))
    return "No space left on device" in text or "ENOSPC" in text


def _disk_full_message(engine: Engine, stage_dir: Path, final: Path) -> str:
    root = checkpoint_root(stage_dir)
    kept = latest_checkpoint(stage_dir)
    needed = _folder_bytes(kept) if kept is not None else _state_bytes(engine)
    free = shutil.disk_usage(root).free
    last = f"the last good checkpoint {kept.name} is kept" if kept is not None else "there is no earlier checkpoint"
    return (
        f"disk full while writing checkpoint {final.name} in {root}: {_size(free)} free, about {_size(needed)} "
        f"needed; the partial checkpoint was removed and {last}. Free space (or lower keep_checkpoints) and resume"
    )


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _state_bytes(engine: Engine) -> int:
    """Bytes of this process's model and optimizer state (what a checkpoint stores)."""
    try:
        tensors = list(engine.unwrapped().state_dict().values())
        for state in getattr(engine.optimizer, "state", {}).values():
            tensors += list(state.values()) if isinstance(state, dict) else []
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
    except Exception:  # an engine whose state cannot be sized here: say nothing rather than fail the message
        return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def load_checkpoint(
    engine: Engine,
    path: Path,
    expected: Position,
    recipe: dict[str, Any] | None = None,
    accept: tuple[str, ...] = (),
    where: str = "stage",
    stage: Any = None,
) -> Position:
    """Restore model, optimizer, schedule and RNG from `path`; the process layout must match the one saved and
    the recipe (`training_fields`) too, except for accepted fields (recorded in the position's `resumes`). With
    `stage` (the recipe's stage model), the saved recipe is read under today's schema first (`saved_under_schema`)."""
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    position = Position(**trainer["position"])
    saved_recipe = trainer.get("recipe")
    if saved_recipe is not None and stage is not None:
        saved_recipe = saved_under_schema(saved_recipe, stage)
    accepted = check_recipe(path, saved_recipe, recipe, accept, where) if recipe is not None else {}
    layout = ("world_size", "batch_size", "grad_accum")
    if any(getattr(position, k) != getattr(expected, k) for k in layout):
        saved = ", ".join(f"{k}={getattr(position, k)}" for k in layout)
        now = ", ".join(f"{k}={getattr(expected, k)}" for k in layout)
        raise ValueError(f"{path} was written with {saved}; this run has {now}. Resume with the same layout.")
    engine.load_state(path)
    engine.scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"][engine.rank])
    position.resumes.append({"step": position.step, "checkpoint": path.name, "accepted": accepted})
    return position
