"""Start-up (issue 15): help needs no torch, `import moekit` is lazy, the Auto classes still know moekit's types.

Behaviour only, never time: each check runs in a fresh interpreter and reads its `sys.modules`; the timings are
`bench/startup.py`'s.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import moekit
from moekit.modeling.auto import _AfterImport, register_when_transformers_loads

HEAVY = ("torch", "transformers")

HELP_PROBE = """
import contextlib, io, json, sys
import typer.main
sys.argv = ["moekit", "--help"]
from moekit.cli.app import app, main

def paths(command, prefix):
    yield prefix
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from paths(sub, [*prefix, name])

codes = {}
for path in paths(typer.main.get_command(app), []):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main() if not path else app([*path, "--help"], prog_name="moekit")
        except SystemExit as exc:
            codes[" ".join(path)] = [exc.code, "Usage: moekit" in out.getvalue()]
print(json.dumps({"codes": codes, "heavy": sorted(set(sys.modules) & set(HEAVY))}))
"""


def _run(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_commands_help_imports_neither_torch_nor_transformers():
    """`moekit --help` (through the console script's `main`) and `--help` of every command and sub-command."""
    got = _run(f"HEAVY = {HEAVY!r}\n" + HELP_PROBE)
    assert {"", "upcycle", "plugins", "validate", "data", "data convert", "csqa", "csqa build"} <= set(got["codes"])
    assert all(code == [0, True] for code in got["codes"].values()), got["codes"]
    assert got["heavy"] == [], f"help imported {got['heavy']}"


IMPORT_PROBE = """
import json, sys
import moekit
heavy = sorted(set(sys.modules) & {"torch", "transformers"})
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # loaded after moekit: the hook installs
known = ["moekit_llama" in CONFIG_MAPPING, "moekit_qwen2_5_vl" in CONFIG_MAPPING, "moekit_no_such" in CONFIG_MAPPING]
print(json.dumps({"heavy": heavy, "lazy": type(CONFIG_MAPPING._extra_content).__name__, "known": known}))
"""


def test_import_moekit_imports_no_torch_and_autoconfig_learns_moekit_types_when_loaded_later():
    """The import order of the existing fresh-process Auto test; here without building a model."""
    got = _run(IMPORT_PROBE)
    assert got["heavy"] == [], f"import moekit imported {got['heavy']}"
    assert got == {"heavy": [], "lazy": "_LazyMoekitTypes", "known": [True, True, False]}


def test_autoconfig_loaded_before_moekit_is_taught_at_once(monkeypatch):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    monkeypatch.setattr(CONFIG_MAPPING, "_extra_content", {})
    assert "moekit_llama" not in CONFIG_MAPPING
    register_when_transformers_loads()
    assert "moekit_llama" in CONFIG_MAPPING and "moekit_no_such" not in CONFIG_MAPPING
    assert CONFIG_MAPPING["moekit_llama"].model_type == "moekit_llama"


def test_every_public_name_resolves_and_no_submodule_hides_one(monkeypatch):
    """`from moekit import X` and `moekit.X` for every name in `__all__`; `import moekit.upcycle` (the package)
    leaves `moekit.upcycle` the function, as Python would otherwise set the submodule over it."""
    from moekit.upcycle.surgery import upcycle

    assert all(getattr(moekit, name) is not None for name in moekit.__all__)
    monkeypatch.setattr(moekit, "upcycle", sys.modules["moekit.upcycle"])  # as the import system does, for a new one
    assert moekit.upcycle is upcycle and callable(moekit.upcycle)
    assert moekit.arch is sys.modules["moekit.arch"]  # subpackages are attributes as after `import moekit.arch`
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        moekit.no_such_name  # noqa: B018


def test_the_import_hook_runs_once_after_its_module_and_leaves_the_real_loader(tmp_path, monkeypatch):
    (tmp_path / "moekit_probe_module.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = _AfterImport("moekit_probe_module", lambda: seen.append(sys.modules["moekit_probe_module"].VALUE))
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    monkeypatch.delitem(sys.modules, "moekit_probe_module", raising=False)
    import moekit_probe_module  # noqa: F401

    assert seen == [42] and hook not in sys.meta_path
    assert type(moekit_probe_module.__loader__).__name__ == "SourceFileLoader"
    assert moekit_probe_module.__spec__.loader is moekit_probe_module.__loader__
    monkeypatch.delitem(sys.modules, "moekit_probe_module")
