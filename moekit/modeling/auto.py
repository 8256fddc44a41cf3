"""How transformers' Auto classes come to know moekit's model types, at no import cost.

`import moekit` imports neither torch nor transformers. It only asks to be told when transformers' AutoConfig
module (`transformers.models.auto.configuration_auto`) is loaded, by anyone, and then teaches AutoConfig the
`moekit_<family>` types: a type is known as soon as its family is, and its classes are made and registered
(`moekit.modeling.classes.register_family`) the first time transformers asks for it. So
`Auto*.from_pretrained(moekit_dir)` works after `import moekit` for every family, and only the family a
checkpoint names is ever imported.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"


class _LazyMoekitTypes(dict):
    """Stands in for transformers' registry of extra config types (`CONFIG_MAPPING._extra_content`): a
    `moekit_<family>` type is known as soon as `<family>` is, and registered on first lookup."""

    def __init__(self, extra: dict, families: dict, prefix: str) -> None:
        super().__init__(extra)
        self._families = families  # CONFIG_MAPPING._mapping: the dense model types transformers knows
        self._prefix = prefix

    def __contains__(self, key: object) -> bool:
        if dict.__contains__(self, key):
            return True
        return (
            isinstance(key, str) and key.startswith(self._prefix) and key.removeprefix(self._prefix) in self._families
        )

    def __getitem__(self, key: str) -> type:
        if not dict.__contains__(self, key) and key in self:
            from moekit.modeling.classes import register_family

            # registered by AutoConfig.register on first use; set here too, for a mapping installed after that
            self.setdefault(key, register_family(key.removeprefix(self._prefix)))
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default  # noqa: SIM401 (dict.get would skip the lazy lookup)


def install_lazy_registration() -> None:
    """Let transformers' AutoConfig resolve moekit model types on demand (idempotent; imports transformers)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from moekit.config.record import PREFIX

    extra = CONFIG_MAPPING._extra_content
    if not isinstance(extra, _LazyMoekitTypes):
        CONFIG_MAPPING._extra_content = _LazyMoekitTypes(extra, CONFIG_MAPPING._mapping, PREFIX)


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A one-shot import hook: finds `name` with the other finders, runs its module, then calls `then()`."""

    def __init__(self, name: str, then: Any) -> None:
        self.name, self.then, self.loader = name, then, None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None and spec.loader is not None:
                self.loader, spec.loader = spec.loader, self
                return spec
        return None

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__spec__.loader = module.__loader__ = self.loader  # the module keeps its real loader
        self.loader.exec_module(module)
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.then()


def register_when_transformers_loads() -> None:
    """Install the lazy registration now if transformers' AutoConfig module is loaded, else when it is."""
    if AUTO_CONFIG_MODULE in sys.modules:
        install_lazy_registration()
    elif not any(isinstance(f, _AfterImport) and f.name == AUTO_CONFIG_MODULE for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(AUTO_CONFIG_MODULE, install_lazy_registration))
