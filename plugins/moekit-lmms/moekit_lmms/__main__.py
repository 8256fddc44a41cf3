"""`python -m moekit_lmms mmstar FILE DIR`: write the `moekit_mmstar` task yaml reading FILE into DIR (then
`lmms-eval --include_path DIR --tasks moekit_mmstar ...`)."""

from __future__ import annotations

import sys
from pathlib import Path

from moekit_lmms import TASKS

PLACEHOLDERS = {"mmstar": "MMSTAR_PARQUET"}


def write_task(benchmark: str, data: Path, folder: Path) -> Path:
    if benchmark not in PLACEHOLDERS:
        raise SystemExit(f"unknown task {benchmark!r}; moekit_lmms ships {sorted(PLACEHOLDERS)}")
    if not data.is_file():
        raise SystemExit(f"{data}: no such file")
    name = f"moekit_{benchmark}"
    text = (TASKS / name / f"{name}.yaml").read_text().replace(PLACEHOLDERS[benchmark], str(data.resolve()))
    out = folder / name / f"{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    print(write_task(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])))
