"""Hardening of atomic outputs against signals, with real signals on real subprocesses: SIGTERM cleans up like
SIGINT; what SIGKILL leaves is reaped by the next run into the same place, never a live run's; outputs follow the
umask and a symlinked output is followed, not replaced."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moekit.io.atomic import atomic_dir, is_stale, owner_tag, reap_stale

ROOT = Path(__file__).resolve().parents[1]

# moekit/io/atomic.py loaded on its own (the io layer imports nothing else): a subprocess starts in milliseconds.
HOLD = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("atomic", {str(ROOT / "moekit" / "io" / "atomic.py")!r})
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
with atomic.atomic_dir(sys.argv[1]) as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 1000)
    print("ready", flush=True)
    time.sleep(120)
"""


def start(code: str, *args: str) -> subprocess.Popen:
    """A Python subprocess running `code`; returns once it printed `ready`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"the subprocess did not start: {line!r} {proc.stderr.read()}")
    return proc


def partials(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f".{name}.partial-*"))


def test_sigterm_removes_the_partial_like_sigint(tmp_path):
    target = tmp_path / "out"
    proc = start(HOLD, str(target))
    assert len(partials(tmp_path, "out")) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143  # 128 + SIGTERM, as a shell reports a job the signal ended
    assert partials(tmp_path, "out") == [] and not target.exists()


def test_sigterm_during_moekit_upcycle_leaves_nothing(tmp_path, tiny_base):
    """The real command, its shard writer slowed down so that the signal lands mid-write."""
    code = """
    import importlib, sys, time
    from moekit.cli.app import main

    convert = importlib.import_module("moekit.upcycle.convert")

    real = convert.write_shard
    def slow(path, *args, **kwargs):
        real(path, *args, **kwargs)
        print("ready", flush=True)
        time.sleep(120)
    convert.write_shard = slow
    sys.argv = ["moekit", *sys.argv[1:]]
    main()
    """
    out = tmp_path / "moe"
    proc = start(code, "upcycle", "--base", str(tiny_base), "--num-experts", "2", "--layers", "0", "-o", str(out), "-q")
    assert len(partials(tmp_path, "moe")) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143, proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_next_run_reaps_what_sigkill_left_but_never_a_live_run(tmp_path):
    target = tmp_path / "out"
    dead = start(HOLD, str(target))
    dead.kill()  # SIGKILL: no handler runs, the partial stays
    dead.wait(timeout=30)
    (left,) = partials(tmp_path, "out")
    assert f"-{dead.pid}." in left.name and is_stale(left)
    live = start(HOLD, str(target))
    try:
        (running,) = [p for p in partials(tmp_path, "out") if p != left]
        assert not is_stale(running)
        legacy = tmp_path / ".out.partial-k3j9x2ab"  # made by moekit 0.2: no owner in the name, so never touched
        legacy.mkdir()
        with atomic_dir(target) as tmp:
            (tmp / "done").write_text("yes")
        assert (target / "done").read_text() == "yes"
        assert not left.exists() and running.exists() and legacy.exists()
    finally:
        live.send_signal(signal.SIGTERM)
        assert live.wait(timeout=30) == 143
    assert not running.exists()


def test_a_run_killed_between_its_renames_gets_its_old_output_back(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=30)
    host = owner_tag().rsplit("-", 1)[0]  # HOST-PID.START: this host, the dead process's pid
    old = tmp_path / f".out.old-{host}-{dead.pid}.1"
    old.mkdir()
    (old / "model.safetensors").write_text("previous output")
    reap_stale(target)
    assert (target / "model.safetensors").read_text() == "previous output" and not old.exists()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o027, 0o750), (0o002, 0o775)], ids=["022", "027", "002"])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == mode


def test_a_symlinked_output_is_followed(tmp_path):
    real = tmp_path / "disk" / "models" / "moe"
    real.mkdir(parents=True)
    (real / "old").write_text("old")
    link = tmp_path / "moe"
    link.symlink_to(real, target_is_directory=True)
    with atomic_dir(link) as tmp:
        (tmp / "new").write_text("new")
    assert link.is_symlink() and Path(os.readlink(link)) == real
    assert sorted(p.name for p in real.iterdir()) == ["new"]
