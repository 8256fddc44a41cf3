"""Hardening against a full disk, on a real small filesystem (a tmpfs mounted in a user namespace): a training
checkpoint that does not fit says so in one line with the free and needed space, leaves no partial behind and
keeps the last good checkpoint, from which the run resumes once there is room."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .recipes import stage, write_recipe

CHECK = """
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
print(json.dumps(sorted(str(p.relative_to(root)) for p in root.rglob("*"))))
"""


def in_small_filesystem(folder: Path, size: str, script: str) -> subprocess.CompletedProcess:
    """Run shell `script` with a `size` tmpfs mounted on `folder` (visible only to it); skip where that fails."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small filesystem")
    mount = f"mount -t tmpfs -o size={size} tmpfs {folder} || exit 77; "
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount + script],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode == 77 or done.stderr.startswith("unshare:"):
        pytest.skip(f"this machine cannot mount a small filesystem (user namespaces off?): {done.stderr.strip()}")
    return done


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_good_one(tmp_path, tiny_base):
    disk = tmp_path / "disk"
    disk.mkdir()
    spec = stage("s", trainable=["projector"], steps=3, save_every=1, keep_checkpoints=1)
    recipe = write_recipe(tmp_path, tiny_base, [spec], out="disk/runs")
    moekit = Path(sys.executable).with_name("moekit")
    listing = f"{sys.executable} -c '{CHECK}' {disk}"
    # One checkpoint of the tiny model is ~0.9 MB: the first fits in 1.3 MB, the second (written before the
    # first is dropped) does not. Then the filesystem grows and the run resumes from the checkpoint kept.
    script = (
        f"{moekit} run {recipe} >/dev/null 2>{tmp_path}/err.txt; echo rc=$?; {listing}; "
        f"mount -o remount,size=8m {disk} && {moekit} run {recipe} --resume >/dev/null 2>&1; echo rc=$?; {listing}"
    )
    done = in_small_filesystem(disk, "1300k", script)
    lines = done.stdout.splitlines()
    assert lines[0] == "rc=1", done.stdout + done.stderr
    errors = [line for line in (tmp_path / "err.txt").read_text().splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in (tmp_path / "err.txt").read_text()
    (error,) = errors
    assert error.startswith("error: [Errno 28] disk full while writing checkpoint step-00000002")
    assert " free, about " in error and "KB needed" in error and "step-00000001 is kept" in error
    after_failure = json.loads(lines[1])
    assert "runs/s/checkpoints/step-00000001/trainer.pt" in after_failure
    assert not [p for p in after_failure if ".partial" in p or "step-00000002" in p]
    assert lines[2] == "rc=0", done.stdout + done.stderr
    resumed = json.loads(lines[3])
    assert "runs/s/model/moekit.json" in resumed and "runs/s/checkpoints/step-00000003/trainer.pt" in resumed
