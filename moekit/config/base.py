"""Strict pydantic base, YAML loading with `--set` overrides, and errors that carry their YAML path."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

M = TypeVar("M", bound=pydantic.BaseModel)


class StrictModel(pydantic.BaseModel):
    """Base of every moekit config: unknown keys are errors, values are validated on assignment."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ConfigError(ValueError):
    """A config failed validation; `problems` lists (location, message) pairs, all of them at once."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"] + [f"  {loc}: {msg}" for loc, msg in problems]
        super().__init__("\n".join(lines))


def _location(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "literal[", "union[", "tagged-union[", "list[", "str", "int")):
            continue  # pydantic's union-branch markers say nothing to a YAML author
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def _message(error: Mapping[str, Any]) -> str:
    msg = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"unknown key (value {error['input']!r}); check the spelling against the documented keys"
    if "input" in error and error["type"] not in ("missing",) and not isinstance(error["input"], (dict, list)):
        return f"{msg} (got {error['input']!r})"
    return msg


def parse_config(model: type[M], data: Any, source: str = "config", context: dict[str, Any] | None = None) -> M:
    """Validate `data` against `model`; raise `ConfigError` naming every bad YAML path.

    `context` reaches validators as `info.context` (e.g. `pending_paths`: folders a pipeline's prepare steps
    will create, which path checks accept)."""
    try:
        return model.model_validate(data, context=context)
    except pydantic.ValidationError as exc:
        raise ConfigError(source, located_problems(exc)) from None


def located_problems(exc: pydantic.ValidationError) -> list[tuple[str, str]]:
    """(YAML path, message) per error. A validator that raises `ConfigError` (e.g. a plug-in component checking
    its `params`) has its own problems nested under the validator's location, so paths read in full."""
    seen: dict[str, str] = {}
    for err in exc.errors():
        where = _location(err["loc"])
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, ConfigError):
            for loc, msg in inner.problems:
                full = where if loc == "<root>" else loc if where == "<root>" else f"{where}.{loc}"
                seen.setdefault(full, msg)
        else:
            seen.setdefault(where, _message(err))
    return list(seen.items())


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file; a missing file or a syntax error names the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [("<yaml>", str(exc).replace("\n", " "))]) from None


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `a.b[2].c=value` overrides to a nested dict before validation; values parse as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", [(item, "expected key=value, e.g. top_k=2 or stages[1].optimizer.lr=1e-5")])
        key, raw = item.split("=", 1)
        value = _scalar(raw)
        parts = _split_key(key)
        node: Any = data
        for here, nxt in zip(parts, parts[1:]):
            node = _child(node, here, nxt, key)
        _assign(node, parts[-1], value, key)
    return data


def _scalar(raw: str) -> Any:
    """A YAML scalar, with `1e-5`-style floats read as numbers (YAML 1.1 would keep them as strings)."""
    if not raw:
        return None
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _split_key(key: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in key.split("."):
        name, *indices = piece.replace("]", "").split("[")
        if name:
            parts.append(name)
        parts.extend(int(i) for i in indices)
    if not parts:
        raise ConfigError("--set", [(key, "empty key")])
    return parts


def _child(node: Any, part: str | int, nxt: str | int, key: str) -> Any:
    if isinstance(part, int):
        if not isinstance(node, list) or not -len(node) <= part < len(node):
            raise ConfigError("--set", [(key, f"index [{part}] does not exist")])
        return node[part]
    if not isinstance(node, dict):
        raise ConfigError("--set", [(key, f"{part!r} is not inside a mapping")])
    return node.setdefault(part, [] if isinstance(nxt, int) else {})


def _assign(node: Any, part: str | int, value: Any, key: str) -> None:
    if isinstance(part, int):
        if not isinstance(node, list) or not -len(node) <= part < len(node):
            raise ConfigError("--set", [(key, f"index [{part}] does not exist")])
        node[part] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ConfigError("--set", [(key, f"{part!r} is not inside a mapping")])


def is_pending(path: Any, context: dict[str, Any] | None) -> bool:
    """Whether a check that `path` exists should wait: while a recipe is parsed (`context["check_paths"]` False;
    `moekit validate` and `moekit run` check paths before anything runs), or when `path` lies in a folder still
    to be created (`context["pending_paths"]`, a pipeline's prepare steps)."""
    if (context or {}).get("check_paths", True) is False:
        return True
    pending = (context or {}).get("pending_paths") or ()
    resolved = Path(path).resolve()
    return any(resolved == Path(p).resolve() or Path(p).resolve() in resolved.parents for p in pending)
