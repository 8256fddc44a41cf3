"""Plug-in discovery through the `moekit` entry-point group, and lookup of the components they provide.

Built-in plug-ins (package `moekit_plugins`) register through the same entry-point group as third-party ones.
`MOEKIT_PLUGINS=dist,dist:name` limits which load: a distribution (all its entry points) or one entry point of a
distribution; empty = none. Entry points are admitted by the distribution that declares them, so another package
cannot slip in under an admitted name, and two admitted entry points with one name are both refused before
either is imported. A plug-in that fails to import, implements an unknown hook or answers a hook with something
malformed is reported by name (`moekit plugins`, and in every "not found" error) while the others keep working.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import metadata
from typing import Any

import pluggy
import pydantic

from moekit.config import ConfigError
from moekit.config.base import located_problems
from moekit.plugins import hooks
from moekit.plugins.family import Family
from moekit.plugins.hooks import ARCH_HOOK, HOOK_KINDS, NAME, Component, Kind

ENTRY_POINT_GROUP = "moekit"
ALLOW_ENV = "MOEKIT_PLUGINS"


@dataclass
class PluginInfo:
    """One entry point of the `moekit` group: where it comes from and, if it is broken, why."""

    name: str
    package: str
    version: str
    module: str = ""
    error: str | None = None


@dataclass
class Registry:
    manager: pluggy.PluginManager
    plugins: list[PluginInfo] = field(default_factory=list)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def components(self, kind: Kind) -> dict[str, Component]:
        """Every component of `kind`, by name. Two plug-ins may not provide the same name."""
        if kind not in self._cache:
            hook = next(h for h, k in HOOK_KINDS.items() if k == kind)
            found: dict[str, Component] = {}
            for plugin, result in self._results(hook):
                for component in self._checked_components(plugin, hook, kind, result):
                    if component.name in found:
                        raise ValueError(
                            f"{kind} {component.name!r} is provided twice: by plug-ins "
                            f"{found[component.name].plugin!r} and {plugin!r}; uninstall one or limit "
                            f"{ALLOW_ENV}"
                        )
                    found[component.name] = replace(component, plugin=plugin)
            self._cache[kind] = found
        return self._cache[kind]

    def get(self, kind: Kind, name: str, where: str = "") -> Component:
        """The component `name` of `kind`; the error lists the ones that exist and any broken plug-ins."""
        available = self.components(kind)
        if name not in available:
            location = f"{where}: " if where else ""
            raise ValueError(f"{location}{self.unknown_message(kind, name)}")
        return available[name]

    def unknown_message(self, kind: Kind, name: str, builtins: tuple[str, ...] = ()) -> str:
        """'no <kind> named X; available: ...' with the broken plug-ins that might have provided it."""
        known = [*builtins, *sorted(self.components(kind))]
        listing = ", ".join(known) or "none (see `moekit plugins`)"
        message = f"no {kind} named {name!r}; available: {listing}"
        broken = [f"{p.name} ({p.error})" for p in self.plugins if p.error]
        if broken:
            message += f"; plug-ins that failed to load: {'; '.join(broken)}"
        return message

    def params_for(
        self, kind: Kind, name: str, params: dict[str, Any] | None, context: dict[str, Any] | None = None
    ) -> pydantic.BaseModel:
        """`params` validated against the component's model (`context` reaches its validators, e.g.
        `pending_paths`); a ConfigError names each bad key relative to it."""
        component = self.get(kind, name)
        try:
            return component.params.model_validate(params or {}, context=context)
        except pydantic.ValidationError as exc:
            raise ConfigError(f"{kind} {name!r} params", located_problems(exc)) from None

    def validate(self, kind: Kind, name: str, params: dict[str, Any] | None) -> tuple[Component, pydantic.BaseModel]:
        """Check `name` and `params`; a ConfigError names each problem as `name` or `params.<key>`."""
        try:
            component = self.get(kind, name)
        except ValueError as exc:
            raise ConfigError(f"{kind} {name!r}", [("name", str(exc))]) from None
        try:
            return component, self.params_for(kind, name, params)
        except ConfigError as exc:
            problems = [("params" if loc == "<root>" else f"params.{loc}", msg) for loc, msg in exc.problems]
            raise ConfigError(f"{kind} {name!r}", problems) from None

    def build(
        self, kind: Kind, name: str, params: dict[str, Any] | None = None, where: str = "", **context: Any
    ) -> Any:
        """Validate `params` (errors carry `where`, e.g. `stages[2].synergy`) and build the component."""
        try:
            component, validated = self.validate(kind, name, params)
        except ConfigError as exc:
            if not where:
                raise
            raise ConfigError(where, [(f"{where}.{loc}", msg) for loc, msg in exc.problems]) from None
        return component.build(validated, **context)

    def families(self) -> dict[str, Any]:
        """`{model_type: Family}` from every plug-in's `moekit_arch_adapters` (moekit.arch.lookup refuses one that
        redefines a built-in family)."""
        if "families" not in self._cache:
            merged: dict[str, Any] = {}
            owner: dict[str, str] = {}
            for plugin, result in self._results(ARCH_HOOK):
                if not isinstance(result, dict) or not all(isinstance(f, Family) for f in result.values()):
                    self._broken(plugin, f"{ARCH_HOOK} must return {{model_type: moekit.arch.Family}}")
                    continue
                for model_type, family in result.items():
                    if model_type in merged:
                        raise ValueError(
                            f"plug-in {plugin!r} defines family {model_type!r}, which plug-in "
                            f"{owner[model_type]!r} already defines"
                        )
                    merged[model_type], owner[model_type] = family, plugin
            self._cache["families"], self._cache["family_plugins"] = merged, owner
        return self._cache["families"]

    def family_plugin(self, model_type: str) -> str:
        """Name of the plug-in that adds family `model_type`."""
        self.families()
        return self._cache["family_plugins"][model_type]

    def _results(self, hook: str) -> list[tuple[str, Any]]:
        """(plug-in name, answer) per implementation in load order; a plug-in whose hook raises is marked broken."""
        out = []
        for impl in getattr(self.manager.hook, hook).get_hookimpls():  # in registration order
            name = self.manager.get_name(impl.plugin)
            try:
                out.append((name, impl.function()))
            except Exception as exc:  # a broken plug-in must not take the others down
                self._broken(name, f"{hook} raised {type(exc).__name__}: {exc}")
        return out

    def _checked_components(self, plugin: str, hook: str, kind: Kind, result: Any) -> list[Component]:
        problem = None
        if not isinstance(result, (list, tuple)) or not all(isinstance(c, Component) for c in result):
            problem = f"{hook} must return a list of moekit.Component, got {type(result).__name__}"
        else:
            for c in result:
                if c.kind != kind:
                    problem = f"{hook} returned {c.name!r} of kind {c.kind!r}, expected {kind!r}"
                elif not NAME.match(c.name):
                    problem = f"component name {c.name!r} must be lower-case letters, digits, '_', '-', '.'"
                elif not (isinstance(c.params, type) and issubclass(c.params, pydantic.BaseModel)):
                    problem = f"{c.name!r}: params must be a pydantic model class"
                elif c.params.model_config.get("extra") != "forbid":
                    problem = f"{c.name!r}: params model must forbid unknown keys (derive from StrictModel)"
                if problem:
                    break
        if problem:
            self._broken(plugin, problem)
            return []
        return list(result)

    def _broken(self, plugin: str, error: str) -> None:
        for info in self.plugins:
            if info.name == plugin:
                info.error = error if info.error is None else f"{info.error}; {error}"
                return
        self.plugins.append(PluginInfo(plugin, "?", "?", error=error))


def allowed_plugins() -> set[str] | None:
    """The allow-list from MOEKIT_PLUGINS, or None when the variable is unset (load everything)."""
    value = os.environ.get(ALLOW_ENV)
    return None if value is None else {n.strip() for n in value.split(",") if n.strip()}


def dist_key(name: str) -> str:
    """A distribution name as pip compares them (PEP 503: case and runs of `-_.` do not matter)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _origin(point: metadata.EntryPoint) -> tuple[str, str]:
    """(distribution name, version) of an entry point; the module's top package when it has no distribution."""
    if point.dist is not None:
        return point.dist.name, point.dist.version
    return point.module.split(".")[0], "?"


def admit(points: list[metadata.EntryPoint], allowed: set[str] | None) -> tuple[list, list[PluginInfo]]:
    """Split `points` into those to import and refusals, before anything is imported.

    `allowed` entries are `dist` (every entry point of that distribution) or `dist:name` (one of them). A bare
    entry that is not a distribution, or that is also the name of another distribution's entry point, admits
    nothing. Entry points that share a name are all refused, with the distributions that clash."""
    refused: list[PluginInfo] = []
    chosen = list(points)
    if allowed is not None:
        dists = {dist_key(_origin(p)[0]) for p in points}
        pairs = {_entry_key(a) for a in allowed if ":" in a}
        whole = {dist_key(a) for a in allowed if ":" not in a and not _other_owners(a, points)}
        chosen = [
            p for p in points if f"{dist_key(_origin(p)[0])}:{p.name}" in pairs or dist_key(_origin(p)[0]) in whole
        ]
        for entry in sorted(allowed):
            problem = _unmatched(entry, points, dists)
            if problem:
                refused.append(PluginInfo(entry, "?", "?", error=problem))
    by_name: dict[str, list[metadata.EntryPoint]] = {}
    for point in chosen:
        by_name.setdefault(point.name, []).append(point)
    admitted = []
    for name, group in sorted(by_name.items()):
        if len(group) == 1:
            admitted.append(group[0])
            continue
        group.sort(key=lambda p: dist_key(_origin(p)[0]))
        clash = " and ".join(f"{d} {v} ({p.value})" for p, (d, v) in ((p, _origin(p)) for p in group))
        choices = " or ".join(f"{ALLOW_ENV}={_origin(p)[0]}:{name}" for p in group)
        error = (
            f"entry point name {name!r} is declared by {clash}; neither was imported. Uninstall one, or admit "
            f"the one you trust: {choices}"
        )
        refused += [PluginInfo(name, *_origin(p), p.value, error=error) for p in group]
    return admitted, refused


def _entry_key(entry: str) -> str:
    dist, _, name = entry.partition(":")
    return f"{dist_key(dist.strip())}:{name.strip()}"


def _other_owners(entry: str, points: list[metadata.EntryPoint]) -> list[str]:
    """`dist:name` of the entry points called `entry` that belong to a distribution not called `entry`."""
    return sorted(
        f"{_origin(p)[0]}:{p.name}" for p in points if p.name == entry and dist_key(_origin(p)[0]) != dist_key(entry)
    )


def _unmatched(entry: str, points: list[metadata.EntryPoint], dists: set[str]) -> str | None:
    """Why an allow-list entry admits nothing (None when it admits something)."""
    installed = ", ".join(sorted(f"{_origin(p)[0]}:{p.name}" for p in points)) or "none"
    missing = f"named in {ALLOW_ENV} but not installed (installed: {installed})"
    if ":" in entry:
        return None if _entry_key(entry) in {f"{dist_key(_origin(p)[0])}:{p.name}" for p in points} else missing
    owners = _other_owners(entry, points)
    if not owners:
        return None if dist_key(entry) in dists else missing
    if dist_key(entry) in dists:
        return (
            f"{ALLOW_ENV} entry {entry!r} is both a distribution and an entry point of {', '.join(owners)}; "
            f"nothing was admitted for it. Write DIST:NAME, e.g. {owners[0]}"
        )
    return (
        f"{ALLOW_ENV} admits entry points by distribution; {entry!r} is an entry point name, so nothing was "
        f"admitted for it. Write DIST:NAME: {', '.join(owners)}"
    )


def new_registry(
    entry_points: list[metadata.EntryPoint] | None = None, allowed: set[str] | None = None, *, modules: Any = ()
) -> Registry:
    """Load plug-ins from `entry_points` (default: the installed `moekit` group), honouring the allow-list.

    `modules` registers already imported plug-in objects as `(name, object)` pairs (tests, notebooks).
    """
    manager = pluggy.PluginManager(hooks.PROJECT)
    manager.add_hookspecs(hooks)
    registry = Registry(manager)
    points = entry_points if entry_points is not None else list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    admitted, refused = admit(points, allowed)
    registry.plugins.extend(refused)
    for point in admitted:
        package, version = _origin(point)
        info = PluginInfo(point.name, package, version, point.value)
        registry.plugins.append(info)
        try:
            _register(manager, point.load(), point.name)
        except Exception as exc:  # a broken plug-in must not take the others down
            info.error = f"{type(exc).__name__}: {exc}"
    for name, obj in modules:
        info = PluginInfo(name, getattr(obj, "__name__", type(obj).__name__).split(".")[0], "?", name)
        registry.plugins.append(info)
        try:
            _register(manager, obj, name)
        except Exception as exc:
            info.error = f"{type(exc).__name__}: {exc}"
    return registry


def _register(manager: pluggy.PluginManager, plugin: Any, name: str) -> None:
    """Register `plugin`, refusing hook implementations whose name matches no hookspec (a typo would be silent)."""
    manager.register(plugin, name=name)
    unknown = [
        impl
        for hook in manager.get_hookcallers(plugin) or []
        if hook.spec is None
        for impl in hook.get_hookimpls()
        if impl.plugin is plugin
    ]
    if unknown:
        manager.unregister(plugin)
        names = sorted({impl.function.__name__ for impl in unknown})
        raise ValueError(f"implements unknown hook(s) {names}; moekit's hooks are {hooks.hook_names()}")


@cache
def registry() -> Registry:
    """The process-wide registry of installed plug-ins (loaded once, on first use; `reload()` starts afresh)."""
    return new_registry(allowed=allowed_plugins())


def reload() -> Registry:
    """Forget the loaded plug-ins and discover them again (after installing one, or changing MOEKIT_PLUGINS)."""
    registry.cache_clear()
    return registry()
