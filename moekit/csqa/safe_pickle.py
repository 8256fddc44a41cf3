"""Read a released annotation pickle without running code from it.

A pickle can name any importable callable (`os.system`, `subprocess.Popen`, ...) and have it called while loading.
`load_pickle` admits only what plain containers and numpy arrays need: numpy's array reconstruction, `ndarray`,
`dtype` and scalars (under both numpy 1's `numpy.core` and numpy 2's `numpy._core` names), `_codecs.encode` (how
protocol 2 stores bytes), and the built-in `set`, `frozenset`, `bytearray`, `complex` and
`collections.OrderedDict`. Anything else is refused with `UnsafePickleError` naming the file and the global.
"""

from __future__ import annotations

import _codecs
import collections
import pickle
from pathlib import Path
from typing import Any

import numpy as np

try:
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs.encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    ALLOWED[(_module, "_reconstruct")] = _multiarray._reconstruct
    ALLOWED[(_module, "scalar")] = _multiarray.scalar


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle names a global outside the allow-list; nothing it names was imported or called."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose `find_class` answers only from `ALLOWED`."""

    def __init__(self, file, name: str):
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self.name}: refusing to load global {module}.{name}: an annotation pickle may hold only plain "
                "containers and numpy arrays (is this the released file?)"
            )
        return found


def load_pickle(path: str | Path) -> Any:
    """The object in the pickle at `path`, loaded through `RestrictedUnpickler`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    with path.open("rb") as fh:
        try:
            return RestrictedUnpickler(fh, str(path)).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a readable pickle ({exc})") from None
