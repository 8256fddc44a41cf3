"""Install plug-in packages for a test the way pip does it (a `*.dist-info` with `entry_points.txt` on sys.path),
so discovery runs through `importlib.metadata` exactly as for a real install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib

import moekit.plugins.registry as registry

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "third_party_plugin"


def fake_install(site: Path, name: str, version: str, entry_points: dict[str, str]) -> None:
    """Write the metadata pip would write for a distribution with `moekit` entry points into `site`."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[moekit]\n{lines}")


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """A fresh site directory on sys.path; the process registry is reloaded before and after the test."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(registry.ALLOW_ENV, raising=False)
    yield site
    monkeypatch.undo()
    for name in [m for m in sys.modules if m.startswith(("moekit_example_plugin", "broken_plugin"))]:
        del sys.modules[name]
    registry.reload()


@pytest.fixture
def example_plugin(plugin_site, monkeypatch):
    """The example third-party plug-in, installed from its own pyproject's entry points."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    fake_install(plugin_site, project["name"], project["version"], project["entry-points"]["moekit"])
    monkeypatch.syspath_prepend(str(EXAMPLE))
    return registry.reload()
