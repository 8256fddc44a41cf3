"""Arguments shared by commands: `--data` (dataset files or a YAML holding a DataConfig), `--option KEY=VALUE`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # moekit.data imports torch; `--help` of the commands that use these must not
    from moekit.data.config import DataConfig


def data_config(
    files: list[Path], max_samples: int | None = None, bad_samples: str = "fail"
) -> tuple[DataConfig, Path | None]:
    """A DataConfig from `--data` values: JSON/JSONL files (one dataset each, named by file stem), or one YAML
    file with a `data:` section (or a bare DataConfig). Returns the config and the folder paths resolve from."""
    from moekit.config import load_yaml, parse_config
    from moekit.data.config import DataConfig

    if not files:
        raise ValueError("give at least one --data FILE (JSON/JSONL dataset, or a YAML with a data: section)")
    if len(files) == 1 and files[0].suffix in (".yaml", ".yml"):
        raw = load_yaml(files[0])
        raw = raw.get("data", raw) if isinstance(raw, dict) else raw
        return parse_config(DataConfig, raw, source=str(files[0])), files[0].parent
    names = [f.stem for f in files]
    if len(set(names)) != len(names):
        names = [str(f) for f in files]
    datasets = [
        {"name": n, "path": str(f.resolve()), **({"max_samples": max_samples} if max_samples else {})}
        for n, f in zip(names, files)
    ]
    return parse_config(DataConfig, {"datasets": datasets, "bad_samples": bad_samples, "mixing": "concat"}), None


def key_values(values: list[str], flag: str = "--option") -> dict[str, str]:
    """`KEY=VALUE` options (repeatable flags) as a dict; dashes in keys become underscores."""
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {value!r}: expected KEY=VALUE")
        out[key.replace("-", "_")] = val
    return out
