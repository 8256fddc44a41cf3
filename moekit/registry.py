"""Plug-in discovery through the `moekit` entry-point group, and lookup of the components they provide.

Built-in plug-ins (package `moekit_plugins`) register through the same entry-point group as third-party ones.
`MOEKIT_PLUGINS=name,name` limits which entry points load; a plug-in that fails to import is reported by name
and the others still load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import metadata
from typing import Any

import pluggy

from moekit import hooks
from moekit.config import ConfigError, parse_config
from moekit.hooks import HOOK_KINDS, Component, Kind

ENTRY_POINT_GROUP = "moekit"
ALLOW_ENV = "MOEKIT_PLUGINS"


@dataclass
class PluginInfo:
    name: str
    package: str
    version: str
    error: str | None = None


@dataclass
class Registry:
    manager: pluggy.PluginManager
    plugins: list[PluginInfo] = field(default_factory=list)

    def components(self, kind: Kind) -> dict[str, Component]:
        """Every component of `kind`, by name (a later plug-in may not silently shadow an earlier one)."""
        hook = next(h for h, k in HOOK_KINDS.items() if k == kind)
        found: dict[str, Component] = {}
        for plugin, result in self._results(hook):
            for component in result or []:
                if component.name in found:
                    raise ValueError(
                        f"{kind} {component.name!r} is provided twice: by {found[component.name].plugin} and {plugin}"
                    )
                found[component.name] = replace(component, plugin=plugin)
        return found

    def _results(self, hook: str) -> list[tuple[str, Any]]:
        """(plug-in name, answer) per implementation, in registration order, so answers can be attributed."""
        impls = getattr(self.manager.hook, hook).get_hookimpls()
        return [(self.manager.get_name(impl.plugin), impl.function()) for impl in impls]

    def get(self, kind: Kind, name: str, where: str = "") -> Component:
        """The component `name` of `kind`; an error lists the ones that exist."""
        available = self.components(kind)
        if name not in available:
            location = f"{where}: " if where else ""
            known = ", ".join(sorted(available)) or "none (is moekit_plugins installed? see `moekit plugins`)"
            raise ValueError(f"{location}no {kind} named {name!r}; available: {known}")
        return available[name]

    def build(
        self, kind: Kind, name: str, params: dict[str, Any] | None = None, where: str = "", **context: Any
    ) -> Any:
        """Validate `params` against the component's model (errors carry `where`) and build it."""
        component = self.get(kind, name, where)
        try:
            validated = parse_config(component.params, params or {}, source=where or f"{kind} {name}")
        except ConfigError as exc:
            prefix = f"{where}." if where else ""
            raise ConfigError(exc.source, [(prefix + loc, msg) for loc, msg in exc.problems]) from None
        return component.build(validated, **context)

    def families(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for _, result in self._results("moekit_arch_adapters"):
            merged.update(result or {})
        return merged


def _allowed() -> set[str] | None:
    value = os.environ.get(ALLOW_ENV)
    return None if value is None else {n.strip() for n in value.split(",") if n.strip()}


def new_registry(entry_points: list[metadata.EntryPoint] | None = None, allowed: set[str] | None = None) -> Registry:
    """Load plug-ins from `entry_points` (default: the installed `moekit` group), honouring the allow-list."""
    manager = pluggy.PluginManager(hooks.PROJECT)
    manager.add_hookspecs(hooks)
    registry = Registry(manager)
    points = entry_points if entry_points is not None else list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    for point in sorted(points, key=lambda p: p.name):
        if allowed is not None and point.name not in allowed:
            continue
        package = point.dist.name if point.dist else point.module.split(".")[0]
        version = point.dist.version if point.dist else "?"
        info = PluginInfo(point.name, package, version)
        try:
            manager.register(point.load(), name=point.name)
        except Exception as exc:  # a broken plug-in must not take the others down
            info.error = f"{type(exc).__name__}: {exc}"
        registry.plugins.append(info)
    return registry


@cache
def registry() -> Registry:
    """The process-wide registry of installed plug-ins (loaded once, on first use)."""
    return new_registry(allowed=_allowed())
