"""The packages of `moekit/` are layers (docs/architecture.md): each imports only from the layers below it.

Every module's AST is walked, imports inside functions and `TYPE_CHECKING` blocks included. The test fails on an
import that goes up a layer, on an import cycle between packages, on `moekit_plugins` imported from the core, on
`from moekit import ...` (the facade) outside `cli/` and the facade itself, and on a core module that imports one
of the deprecated 0.1 paths kept for users. Each failure names the file, the line and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "moekit"
# Bottom to top. A module may import its own package and the packages before it.
LAYERS = [
    "_version",
    "config",
    "io",
    "plugins",
    "arch",
    "moe",
    "modeling",
    "upcycle",
    "attach",
    "data",
    "demo",
    "recipe",
    "train",
    "evaluate",
    "csqa",
    "pipeline",
    "cli",
]
FACADE = "__init__"  # moekit/__init__.py: the public names, above every layer but cli
SHIMS = {"hooks", "registry", "components", "position", "tiny", "accounting", "teachers"}  # 0.1 paths, warn


def _unit(path: Path) -> str:
    """The top-level package (or module) of `moekit/` a file belongs to."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return parts[0]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, how it reads in the file) of every import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node.lineno, alias.name, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = ", ".join(a.name for a in node.names)
            text = f"from {'.' * node.level}{node.module or ''} import {names}"
            if base == "moekit":
                # `from moekit import plugins` imports a package; other names come from the facade
                for alias in node.names:
                    sub = ROOT / alias.name
                    if sub.is_dir() or sub.with_suffix(".py").is_file():
                        found.append((node.lineno, f"moekit.{alias.name}", text))
                    else:
                        found.append((node.lineno, "moekit", text))
            else:
                found.append((node.lineno, base, text))
    return found


def _target_unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "moekit":
        return None
    return parts[1] if len(parts) > 1 else FACADE


def _rank(unit: str) -> int:
    return len(LAYERS) - 1.5 if unit == FACADE else LAYERS.index(unit)


def _core_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if _unit(p) not in SHIMS or (ROOT / _unit(p)).is_dir())


def _violations() -> tuple[list[str], dict[str, set[str]]]:
    problems, graph = [], {}
    for path in _core_files():
        unit = _unit(path)
        if unit in SHIMS:  # the deprecated teachers/ package
            continue
        if unit not in LAYERS and unit != FACADE:
            problems.append(f"{path}: package {unit!r} is not in the layer list of tests/test_layers.py")
            continue
        where = path.relative_to(ROOT.parent)
        for line, module, text in _imports(path):
            if module.split(".")[0] == "moekit_plugins":
                problems.append(f"{where}:{line}: {text}  (the core never imports a plug-in)")
                continue
            target = _target_unit(module)
            if target is None or target == unit:
                continue
            if target in SHIMS:
                problems.append(f"{where}:{line}: {text}  (a deprecated 0.1 path; import its new home)")
                continue
            if target == FACADE and unit not in ("cli", FACADE):
                problems.append(f"{where}:{line}: {text}  (the facade `moekit` is for users and cli/ only)")
                continue
            graph.setdefault(unit, set()).add(target)
            if target != FACADE and unit != FACADE and _rank(target) > _rank(unit):
                problems.append(f"{where}:{line}: {text}  ({unit} may not import {target}, a higher layer)")
    return problems, graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_every_import_goes_down_a_layer():
    problems, _ = _violations()
    assert not problems, "imports against the layers:\n  " + "\n  ".join(problems)


def test_no_import_cycle_between_packages():
    _, graph = _violations()
    graph = {k: {t for t in v if t != FACADE} for k, v in graph.items() if k != FACADE}
    cycles = _cycles(graph)
    assert not cycles, "package import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_package_is_a_layer():
    units = {_unit(p) for p in ROOT.rglob("*.py")} - SHIMS - {FACADE}
    assert units <= set(LAYERS), f"packages without a layer: {sorted(units - set(LAYERS))}"


@pytest.mark.parametrize(
    "source, message",
    [
        ("import moekit_plugins.position\n", "the core never imports a plug-in"),
        ("def f():\n    from moekit.train import loop\n", "arch may not import train"),
        ("from moekit import upcycle\nfrom moekit import load\n", "the facade `moekit` is for users"),
        ("from moekit.registry import registry\n", "a deprecated 0.1 path"),
    ],
)
def test_the_checker_catches_what_it_should(tmp_path, monkeypatch, source, message):
    """The checker itself can fail: a module planted in `arch/` with a bad import is reported with its line."""
    planted = ROOT / "arch" / "_planted_for_test.py"
    monkeypatch.setattr("tests.test_layers._core_files", lambda: [planted])
    planted.write_text(source)
    try:
        problems, _ = _violations()
    finally:
        planted.unlink()
    assert any(message in p and "moekit/arch/_planted_for_test.py:" in p for p in problems), problems


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("moekit.hooks", "hookimpl", "moekit.plugins.hooks"),
        ("moekit.registry", "registry", "moekit.plugins.registry"),
        ("moekit.position", "load_encoders", "moekit.attach.position"),
        ("moekit.teachers", "FeatureCache", "moekit.attach.teachers"),
        ("moekit.teachers.interface", "TeacherBatch", "moekit.attach.teachers.interface"),
        ("moekit.tiny", "tiny_model", "moekit.demo.tiny"),
        ("moekit.arch", "add_to_visual_tokens", "moekit.attach.visual"),
        ("moekit.train", "run_plan", "moekit.pipeline.run"),
    ],
)
def test_moved_paths_still_work_for_one_release_and_warn(old, name, new):
    import importlib

    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {new}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018
