"""Old import paths kept for one release: a module-level `__getattr__` that finds a moved name in its new home and
warns. The import happens by name when the old path is used, so it never ties the layers together."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

REMOVED_IN = "0.3"


def moved(old_module: str, names: dict[str, str]) -> Callable[[str], Any]:
    """`__getattr__` for `old_module`: each name in `names` is served from the module named beside it."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        target = names[name]
        warnings.warn(
            f"{old_module}.{name} moved to {target}.{name}; the old path goes away in moekit {REMOVED_IN}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(target), name)

    return __getattr__


def moved_module(old_module: str, new_module: str) -> Callable[[str], Any]:
    """`__getattr__` for a whole module that moved: every public name comes from `new_module`."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        warnings.warn(
            f"{old_module} moved to {new_module}; the old path goes away in moekit {REMOVED_IN}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new_module), name)

    return __getattr__
