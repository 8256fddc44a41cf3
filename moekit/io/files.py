"""Which files of a checkpoint folder are weights and which travel beside them (tokenizer, processor, chat
template), shared by conversion, export, training outputs and `save_pretrained`. Remote code never travels:
`*.py` files are not copied and `auto_map` entries are removed from the output's JSON files, with a warning."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

WEIGHTS = re.compile(r".*\.(safetensors|bin|pt|pth|h5|msgpack|ckpt|distcp)$|.*\.index\.json$")


def side_files(folder: Path, skip: Iterable[str] = ()) -> list[Path]:
    """Plain files of `folder` that are not weights, hidden or named in `skip`."""
    skip = set(skip)
    if not folder.is_dir():
        return []
    return [
        p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in skip
        and not WEIGHTS.match(p.name)
        and p.suffix != ".py"
    ]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a checkpoint folder, in name order."""
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def copy_side_files(source: Path | None, target: Path, skip: Iterable[str] = ()) -> list[str]:
    """Copy `source`'s side files into `target` and strip remote code from `target` (`strip_remote_code`, with a
    warning naming what was dropped); return the names copied."""
    copied = []
    for path in side_files(Path(source), skip) if source is not None else []:
        shutil.copy2(path, target / path.name)
        copied.append(path.name)
    remote = sorted(p.name for p in Path(source).glob("*.py")) if source is not None else []
    dropped = [*(f"{name} (not copied)" for name in remote), *strip_remote_code(target)]
    if dropped:
        warnings.warn(
            f"dropped remote code from {target.name}: {', '.join(dropped)}; moekit never runs code shipped with a "
            "checkpoint, and its outputs load without it",
            stacklevel=2,
        )
    return copied


def strip_remote_code(folder: Path) -> list[str]:
    """Remove `*.py` files and `auto_map` keys (top level and one level down) from the JSON files of `folder`;
    return what was removed."""
    dropped = []
    for path in sorted(folder.glob("*.py")):
        path.unlink()
        dropped.append(path.name)
    for path in sorted(folder.glob("*.json")):
        if WEIGHTS.match(path.name):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        holders = [("", data), *((f"{k}.", v) for k, v in data.items() if isinstance(v, dict))]
        found = [f"{where}auto_map" for where, holder in holders if holder.pop("auto_map", None) is not None]
        if found:
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            dropped += [f"{path.name}: {key}" for key in found]
    return dropped
