"""Which files of a checkpoint folder are weights and which travel beside them (tokenizer, processor, chat
template), shared by conversion, export, training outputs and `save_pretrained`."""

from __future__ import annotations

import re
import shutil
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
        if p.is_file() and not p.name.startswith(".") and p.name not in skip and not WEIGHTS.match(p.name)
    ]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a checkpoint folder, in name order."""
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def copy_side_files(source: Path | None, target: Path, skip: Iterable[str] = ()) -> list[str]:
    """Copy `source`'s side files into `target`; return their names."""
    if source is None:
        return []
    copied = []
    for path in side_files(Path(source), skip):
        shutil.copy2(path, target / path.name)
        copied.append(path.name)
    return copied
