"""Plug-in discovery: entry points, the allow-list, broken plug-ins, component lookup, params validation with
YAML paths, `moekit plugins`, and the rule that every hook has a test and a docs entry."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moekit import Component, hookimpl, hooks, registry
from moekit.cli.app import app
from moekit.config import ConfigError, StrictModel, parse_config
from moekit.plugins.refs import SynergyHeadRef

from .plugin_env import EXAMPLE, fake_install

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_plugins_load_through_the_entry_point_group():
    reg = registry.reload()
    builtin = {p.name: p for p in reg.plugins if p.package == "moekit"}
    assert {"position", "synergy"} <= set(builtin)
    assert all(p.error is None for p in builtin.values())
    assert builtin["position"].module == "moekit_plugins.position"
    assert {"polyv_3d", "temporal_frame", "neo_native_rope", "vidllm_3d_patch"} <= set(
        reg.components("position_encoder")
    )
    assert {"polyv_synergy", "vidllm_cta"} <= set(reg.components("synergy_head"))
    assert reg.components("synergy_head")["vidllm_cta"].plugin == "synergy"


def test_core_never_imports_the_builtin_plugins():
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "moekit").rglob("*.py")
        if "import moekit_plugins" in path.read_text() or "from moekit_plugins" in path.read_text()
    ]
    assert not offenders


def test_example_plugin_is_discovered_with_package_and_version(example_plugin):
    info = {p.name: p for p in example_plugin.plugins}["example"]
    assert (info.package, info.version, info.error) == ("moekit-example-plugin", "0.1.0", None)
    for kind, name in [
        ("teacher", "example_patch_mean"),
        ("position_encoder", "example_visual_offset"),
        ("synergy_head", "example_cosine"),
        ("expert_init", "example_damp"),
        ("router_init", "example_orthogonal"),
    ]:
        assert example_plugin.get(kind, name).plugin == "example"
    assert "polyv_3d" in example_plugin.components("position_encoder")  # the built-ins still load


def test_allow_list_limits_what_loads(example_plugin, monkeypatch):
    monkeypatch.setenv(registry.ALLOW_ENV, "moekit-example-plugin:example")  # DIST:NAME, one entry point
    reg = registry.reload()
    assert [(p.name, p.error) for p in reg.plugins] == [("example", None)]
    assert "polyv_3d" not in reg.components("position_encoder")
    monkeypatch.setenv(registry.ALLOW_ENV, "moekit,missing")  # a distribution name selects all its entry points
    reg = registry.reload()
    assert {p.name for p in reg.plugins if not p.error} >= {"position", "synergy"}
    assert "example" not in {p.name for p in reg.plugins}
    missing = {p.name: p.error for p in reg.plugins}["missing"]
    assert "named in MOEKIT_PLUGINS but not installed" in missing and "example" in missing
    monkeypatch.setenv(registry.ALLOW_ENV, "")
    assert registry.reload().plugins == []


def test_a_plugin_that_raises_on_import_is_named_and_the_rest_load(plugin_site):
    (plugin_site / "broken_plugin.py").write_text("raise RuntimeError('needs a GPU driver')\n")
    fake_install(plugin_site, "broken-pkg", "2.0", {"broken": "broken_plugin"})
    reg = registry.reload()
    broken = {p.name: p for p in reg.plugins}["broken"]
    assert (broken.package, broken.version) == ("broken-pkg", "2.0")
    assert broken.error == "RuntimeError: needs a GPU driver"
    assert "polyv_synergy" in reg.components("synergy_head")
    with pytest.raises(ValueError, match=r"no synergy_head named 'gone'.*failed to load: broken \(RuntimeError"):
        reg.get("synergy_head", "gone")
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert {"plugin": "broken", "package": "broken-pkg", "version": "2.0", "error": broken.error} in listing["broken"]


def test_malformed_plugins_are_reported_not_fatal():
    class Typo:
        @hookimpl
        def moekit_synergy_head(self):  # missing the final s
            return []

    class WrongKind:
        @hookimpl
        def moekit_synergy_heads(self):
            return [Component("x", "teacher", StrictModel, dict)]

    class Loose:
        class Params(StrictModel.__base__):  # a plain pydantic model: unknown keys would be dropped silently
            a: int = 1

        @hookimpl
        def moekit_teachers(self):
            return [Component("loose", "teacher", self.Params, dict)]

    class Raises:
        @hookimpl
        def moekit_router_initializers(self):
            raise ImportError("no module named 'scipy'")

    reg = registry.new_registry(
        [], modules=[("typo", Typo()), ("kind", WrongKind()), ("loose", Loose()), ("raises", Raises())]
    )
    assert reg.components("synergy_head") == {} and reg.components("teacher") == {}
    assert reg.components("router_init") == {}
    errors = {p.name: p.error for p in reg.plugins}
    assert "unknown hook(s) ['moekit_synergy_head']" in errors["typo"]
    assert "returned 'x' of kind 'teacher', expected 'synergy_head'" in errors["kind"]
    assert "must forbid unknown keys" in errors["loose"]
    assert "moekit_router_initializers raised ImportError: no module named 'scipy'" in errors["raises"]


def test_two_plugins_may_not_provide_the_same_name():
    class One:
        @hookimpl
        def moekit_teachers(self):
            return [Component("same", "teacher", StrictModel, dict)]

    reg = registry.new_registry([], modules=[("one", One()), ("two", One())])
    with pytest.raises(ValueError, match="teacher 'same' is provided twice: by plug-ins 'one' and 'two'"):
        reg.components("teacher")


class Stage(StrictModel):
    """A stand-in for a recipe stage that names a synergy head."""

    lr: float = 1e-4
    synergy: SynergyHeadRef | None = None


class Recipe(StrictModel):
    stages: list[Stage]


def test_recipe_components_are_validated_with_their_yaml_path():
    good = parse_config(Recipe, {"stages": [{"synergy": {"name": "polyv_synergy", "params": {"temporal_dim": 8}}}]})
    head = good.stages[0].synergy.build()
    assert head.params.temporal_dim == 8 and head.params.num_tokens == 8
    data = {
        "stages": [
            {"lr": "fast"},
            {"synergy": {"name": "polyv_synergy", "params": {"num_tokens": 0, "temporal_dim": 8, "colour": 1}}},
            {"synergy": "polyv_synergi"},
        ]
    }
    with pytest.raises(ConfigError) as info:
        parse_config(Recipe, data, source="recipe.yaml")
    problems = dict(info.value.problems)
    assert "stages[0].lr" in problems
    assert "greater than or equal to 1" in problems["stages[1].synergy.params.num_tokens"]
    assert "unknown key" in problems["stages[1].synergy.params.colour"]
    assert (
        "no synergy_head named 'polyv_synergi'; available: polyv_synergy, vidllm_cta"
        in problems["stages[2].synergy.name"]
    )
    with pytest.raises(ConfigError, match=r"stages\[0\].synergy.params: set temporal_dim and/or spatial_dim"):
        parse_config(Recipe, {"stages": [{"synergy": "polyv_synergy"}]})


def test_registry_build_prefixes_the_location():
    reg = registry.registry()
    with pytest.raises(ConfigError) as info:
        reg.build(
            "position_encoder", "polyv_3d", {"min_wavelength": 5, "max_wavelength": 1}, where="stages[1].position"
        )
    assert info.value.problems == [("stages[1].position.params", "min_wavelength 5.0 must be below max_wavelength 1.0")]


def test_moekit_plugins_lists_name_kind_package_version(example_plugin):
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {(r["name"], r["kind"]): r for r in json.loads(result.output)["components"]}
    assert rows[("polyv_3d", "position_encoder")]["package"] == "moekit"
    assert (
        rows[("example_damp", "expert_init")].items()
        >= {
            "plugin": "example",
            "package": "moekit-example-plugin",
            "version": "0.1.0",
        }.items()
    )
    assert rows[("olmo2", "arch_adapter")]["plugin"] == "example"
    table = CliRunner().invoke(app, ["plugins", "--kind", "synergy_head"], env={"COLUMNS": "160"})
    assert "polyv_synergy" in table.output and "example_cosine" in table.output and "polyv_3d" not in table.output
    bad = CliRunner().invoke(app, ["plugins", "--kind", "teachers"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "'teachers' is not one of 'teacher', 'position_encoder'" in bad.output


def _test_functions() -> set[str]:
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        names |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    return names


def test_every_hook_has_a_test_and_a_docs_entry():
    """Datasette's rule: a hook without a `test_hook_<name>` test (or docs) fails the suite."""
    names = hooks.hook_names()
    assert len(names) == 7
    tests = _test_functions()
    untested = [n for n in names if f"test_hook_{n}" not in tests]
    assert not untested, f"hooks without a test_hook_<name> test: {untested}"
    docs = (ROOT / "docs" / "plugins.md").read_text()
    undocumented = [n for n in names if f"`{n}`" not in docs]
    assert not undocumented, f"hooks missing from docs/plugins.md: {undocumented}"
    assert set(hooks.HOOK_KINDS) | {hooks.ARCH_HOOK} == set(names)


def test_example_plugin_package_is_self_contained():
    source = (EXAMPLE / "moekit_example_plugin" / "__init__.py").read_text()
    imports = {
        n.module.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert "moekit_plugins" not in imports and "moekit" in imports


def test_pip_installs_the_example_and_moekit_discovers_it(tmp_path, monkeypatch):
    """The real path: pip builds the example from its own pyproject; its entry point makes it a plug-in."""
    pytest.importorskip("setuptools")
    source, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run([*command, "--target", str(target), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    monkeypatch.syspath_prepend(str(target))
    monkeypatch.delenv(registry.ALLOW_ENV, raising=False)
    try:
        reg = registry.reload()
        info = {p.name: p for p in reg.plugins}["example"]
        assert (info.package, info.version, info.error) == ("moekit-example-plugin", "0.1.0", None)
        assert reg.get("router_init", "example_orthogonal").plugin == "example"
    finally:
        monkeypatch.undo()
        sys.modules.pop("moekit_example_plugin", None)
        registry.reload()
