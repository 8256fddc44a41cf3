"""Hardening of outputs: no command that writes accepts an output that is, contains or lies inside one of its
inputs (symlinks resolved), so `--overwrite` can never delete a checkpoint or a dataset being read; a read-only
output of `moekit run` is refused before any model loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moekit.cli.app import app

from .recipes import stage, write_recipe


@pytest.fixture
def base(tmp_path, tiny_base):
    """A private copy of the tiny dense base (tests here try to overwrite it)."""
    copy = tmp_path / "models" / "base"
    shutil.copytree(tiny_base, copy)
    return copy


def snapshot(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*"))


def upcycle(base, out, *extra):
    args = ["upcycle", "--base", str(base), "--num-experts", "2", "--layers", "0", "-o", str(out), "-q", *extra]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("where", ["is", "contains", "lies inside", "symlink"])
def test_upcycle_refuses_an_output_overlapping_the_base(base, tmp_path, where):
    before = snapshot(base)
    out = {
        "is": base,
        "contains": base.parent,
        "lies inside": base / "moe",
        "symlink": tmp_path / "link",
    }[where]
    if where == "symlink":
        out.symlink_to(base, target_is_directory=True)
    result = upcycle(base, out, "--overwrite")
    assert result.exit_code == 1, result.output
    relation = "is" if where == "symlink" else where
    assert f"overlaps an input: it {relation} the base ({base})" in result.output
    assert snapshot(base) == before and not (base / "moe").exists()


def test_upcycle_refuses_an_output_that_is_a_specialist(base, tmp_path):
    specialist = tmp_path / "models" / "image"
    shutil.copytree(base, specialist)
    before = snapshot(specialist)
    result = upcycle(base, specialist, "--expert", f"image={specialist}", "--expert", "base", "--overwrite")
    assert result.exit_code == 1 and "it is expert 'image'" in result.output
    assert snapshot(specialist) == before


def test_export_refuses_its_source_as_output(qwen_moe_dir):
    source = qwen_moe_dir[0]
    before = snapshot(source)
    result = CliRunner().invoke(app, ["export", "--native", str(source), str(source), "--overwrite", "-q"])
    assert result.exit_code == 1 and "it is the source" in result.output
    assert snapshot(source) == before


def test_synth_refuses_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "mine.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["synth", "-o", ".", "--overwrite", "--images", "1"])
    assert result.exit_code == 1 and "it is the current directory" in result.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_teach_refuses_a_cache_around_its_data_or_its_checkpoint(tmp_path):
    from PIL import Image

    from .teacher_helpers import TINY_VGGT_PARAMS, vggt_checkpoint

    data = tmp_path / "data" / "data.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"id": "a", "image": "a.png"}) + "\n")
    Image.new("RGB", (28, 28)).save(data.parent / "a.png")
    checkpoint = vggt_checkpoint(tmp_path / "vggt" / "model.safetensors")
    config = tmp_path / "vggt.yaml"
    config.write_text(yaml.safe_dump(TINY_VGGT_PARAMS))
    args = ["teach", "--teacher", "vggt", "--data", str(data), "--config", str(config)]
    args += ["--param", f"checkpoint={checkpoint}"]
    result = CliRunner().invoke(app, [*args, "-o", str(data.parent)])
    assert result.exit_code == 1 and f"it contains --data ({data})" in result.output
    assert sorted(p.name for p in data.parent.iterdir()) == ["a.png", "data.jsonl"]
    result = CliRunner().invoke(app, [*args, "-o", str(checkpoint.parent), "--overwrite"])
    assert result.exit_code == 1 and f"it contains --param checkpoint ({checkpoint})" in result.output
    assert [p.name for p in checkpoint.parent.iterdir()] == ["model.safetensors"]


def test_run_refuses_a_stage_folder_that_is_its_base(base, tmp_path):
    recipe = write_recipe(
        tmp_path, base, [stage(base.name, trainable=["router"])], out="models"
    )  # stage dir models/base = the base
    for command in ("validate", "run"):
        result = CliRunner().invoke(app, [command, str(recipe)])
        assert result.exit_code == 1
    assert f"output_dir: output {base} overlaps an input: it is base ({base})" in result.output
    assert not (base / "checkpoints").exists() and not (base / "model").exists()


def test_run_refuses_a_read_only_output_before_loading_the_model(base, tmp_path):
    """On a real read-only filesystem (a tmpfs mounted `ro` in a user namespace): the run stops in its checks.
    The base's weights are garbage, so an error about them would mean the model was loaded first."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a read-only filesystem")
    (base / "model.safetensors").write_bytes(b"not a safetensors file")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    recipe = write_recipe(tmp_path, base, [stage("s", trainable=["projector"])], out="readonly/runs")
    moekit = str(Path(sys.executable).with_name("moekit"))
    script = f"mount -t tmpfs -o ro,size=1m tmpfs {readonly} || exit 77; exec {moekit} run {recipe}"
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode == 77 or "unshare:" in done.stderr:
        pytest.skip(f"this machine cannot mount a read-only filesystem here: {done.stderr.strip()}")
    assert done.returncode == 1, done.stderr
    assert f"{readonly} is not writable (Read-only file system)" in done.stderr
    assert "safetensors" not in done.stderr
