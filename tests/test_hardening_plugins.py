"""Hardening of plug-in discovery: `MOEKIT_PLUGINS` admits entry points by distribution, and two entry points
with one name are both refused before either is imported (a package cannot take over a built-in's name)."""

from __future__ import annotations

import sys

import pytest

from moekit import registry

from .plugin_env import fake_install

SPOOF = "spoofing_plugin"


@pytest.fixture
def spoof(plugin_site, tmp_path):
    """A hostile distribution `evil-pkg` whose entry point is named `position`, like the built-in; importing its
    module leaves a marker file."""
    marker = tmp_path / "spoof-ran"
    (plugin_site / f"{SPOOF}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    fake_install(plugin_site, "evil-pkg", "6.6", {"position": SPOOF})
    yield marker
    sys.modules.pop(SPOOF, None)


def _errors(reg) -> dict[str, str]:
    return {f"{p.package}:{p.name}": p.error for p in reg.plugins if p.error}


def test_a_same_named_entry_point_from_another_distribution_is_never_imported(spoof, monkeypatch):
    monkeypatch.setenv(registry.ALLOW_ENV, "position")  # the form the docs used to show
    reg = registry.reload()
    assert not spoof.exists()
    (error,) = _errors(reg).values()
    assert "is an entry point name" in error and "evil-pkg:position" in error and "moekit:position" in error

    for allowed in ("moekit", "moekit:position", "MoeKit:position"):  # by distribution, as pip spells it
        monkeypatch.setenv(registry.ALLOW_ENV, allowed)
        reg = registry.reload()
        assert not spoof.exists(), allowed
        assert "polyv_3d" in reg.components("position_encoder"), allowed
        loaded = {(p.package, p.name) for p in reg.plugins if not p.error}
        assert ("moekit", "position") in loaded and ("evil-pkg", "position") not in loaded

    monkeypatch.setenv(registry.ALLOW_ENV, "evil-pkg:position")  # asked for by distribution: it is the user's call
    registry.reload()
    assert spoof.exists()


def test_duplicate_names_are_refused_before_either_copy_is_imported(spoof, monkeypatch):
    monkeypatch.delenv(registry.ALLOW_ENV, raising=False)
    reg = registry.reload()
    assert not spoof.exists()
    errors = _errors(reg)
    assert set(errors) == {"moekit:position", "evil-pkg:position"}
    for error in errors.values():
        assert "declared by evil-pkg 6.6 (spoofing_plugin) and moekit " in error and "neither was imported" in error
        assert "MOEKIT_PLUGINS=moekit:position" in error
    assert "polyv_3d" not in reg.components("position_encoder")  # the built-in did not register either
    assert "polyv_synergy" in reg.components("synergy_head")  # the other plug-ins still load


def test_a_distribution_named_like_an_entry_point_is_ambiguous(plugin_site, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (plugin_site / f"{SPOOF}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    fake_install(plugin_site, "position", "1.0", {"extra": SPOOF})
    monkeypatch.setenv(registry.ALLOW_ENV, "position")
    try:
        reg = registry.reload()
        assert not marker.exists()
        assert "both a distribution and an entry point of moekit:position" in _errors(reg)["?:position"]
        monkeypatch.setenv(registry.ALLOW_ENV, "nothing-like-this")
        assert "not installed" in _errors(registry.reload())["?:nothing-like-this"]
    finally:
        sys.modules.pop(SPOOF, None)
