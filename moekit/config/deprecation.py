"""Old import paths kept for one release: a module-level `__getattr__` that finds a moved name in its new home and
warns. The import happens by name when the old path is used, so it never ties the layers together."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

REMOVED_IN = "0.3"


def moved(old_module: str, names: Mapping[str, str] | str) -> Callable[[str], Any]:
    """`__getattr__` for `old_module`: each name in `names` is served from the module named beside it, or every
    public name from `names` when it is one module (a whole module that moved)."""

    def __getattr__(name: str) -> Any:
        target = names if isinstance(names, str) else names.get(name)
        if target is None or name.startswith("__"):
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        warnings.warn(
            f"{old_module}.{name} moved to {target}.{name}; the old path goes away in moekit {REMOVED_IN}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(target), name)

    return __getattr__
