"""moekit: upcycle dense Hugging Face vision-language models into sparse Mixture-of-Experts models.

import moekit
model = moekit.upcycle(dense, moekit.UpcycleSpec(layers="interval:4", num_experts=4, top_k=2))
model.save_pretrained("out")
model = moekit.load("out")   # or AutoModelForImageTextToText.from_pretrained("out") after `import moekit`
moekit.generate("out", "What is in the image?", images=["cat.png"])

`import moekit` is cheap (no torch, no transformers): each public name is imported on first use, and the Auto
classes learn moekit's model types when transformers' AutoConfig is loaded (`moekit.modeling.auto`).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import TYPE_CHECKING

from moekit._version import __version__
from moekit.modeling.auto import register_when_transformers_loads

if TYPE_CHECKING:
    from moekit.modeling.load import load
    from moekit.moe import RouterLosses, RoutingStats, router_losses
    from moekit.plugins.hooks import Component, hookimpl
    from moekit.upcycle import ArchOverride, ExpertSpec, RouterSpec, UpcycleSpec, upcycle

register_when_transformers_loads()

# Public name -> the module it lives in, imported the first time the name is used (PEP 562).
_LAZY = {
    "ArchOverride": "moekit.upcycle",
    "Component": "moekit.plugins.hooks",
    "ExpertSpec": "moekit.upcycle",
    "RouterLosses": "moekit.moe",
    "RouterSpec": "moekit.upcycle",
    "RoutingStats": "moekit.moe",
    "UpcycleSpec": "moekit.upcycle",
    "hookimpl": "moekit.plugins.hooks",
    "load": "moekit.modeling.load",
    "router_losses": "moekit.moe",
    "upcycle": "moekit.upcycle",
}


def __getattr__(name: str):  # noqa: ANN202 (the type is the name's)
    """A public name, imported on first use; a subpackage (`moekit.arch`), imported as `import moekit.arch` would."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Facade(types.ModuleType):
    """Importing the subpackage `moekit.upcycle` must not replace the function `moekit.upcycle` (Python sets a
    package's newly imported submodules as its attributes)."""

    def __setattr__(self, name: str, value: object) -> None:
        if not (name in _LAZY and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Facade


def generate(model, messages, **options):  # noqa: ANN001, ANN201 (the signature is moekit.evaluate.generate's)
    """The model's answer to a prompt or chat messages; see `moekit.evaluate.generate.generate`."""
    from moekit.evaluate.generate import generate as run

    return run(model, messages, **options)


__all__ = [
    "ArchOverride",
    "Component",
    "ExpertSpec",
    "RouterLosses",
    "RouterSpec",
    "RoutingStats",
    "UpcycleSpec",
    "__version__",
    "generate",
    "hookimpl",
    "load",
    "router_losses",
    "upcycle",
]
