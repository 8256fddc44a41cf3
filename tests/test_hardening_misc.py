"""Smaller hardening: a typo'd `{stage: ...}` reference fails `moekit validate`; remote code (`auto_map`, `*.py`)
never reaches an output; an expert path may hold commas."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.cli.upcycle_cmd import parse_expert
from moekit.io.files import strip_remote_code

from .recipes import stage, write_recipe


def test_validate_names_a_typod_stage_reference(tmp_path, tiny_base):
    stages = [
        stage("image", trainable=["projector"]),
        stage("moe", trainable=["projector"], **{"from": {"stage": "imgae"}}),
    ]
    recipe = write_recipe(tmp_path, tiny_base, stages)
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 1
    assert "stages[1].from: no stage named 'imgae' in this plan (its stages: image, moe)" in result.output
    assert "did you mean 'image'?" in result.output


def test_a_reference_to_an_earlier_runs_output_still_validates(tmp_path, tiny_base):
    done = tmp_path / "runs" / "old" / "model"
    shutil.copytree(tiny_base, done)
    (done / "moekit.json").write_text(json.dumps({"version": 2, "made_by": "moekit run", "stage": "old"}))
    recipe = write_recipe(tmp_path, tiny_base, [stage("next", trainable=["projector"], **{"from": {"stage": "old"}})])
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output


@pytest.fixture
def base_with_remote_code(tmp_path, tiny_base):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    config["text_config"]["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(config))
    (base / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x.T", None]}}))
    return base


def test_remote_code_is_dropped_from_outputs_and_said(base_with_remote_code, tmp_path):
    out = tmp_path / "moe"
    args = ["upcycle", "--base", str(base_with_remote_code), "--num-experts", "2", "--layers", "0", "-o", str(out)]
    with pytest.warns(UserWarning, match=r"dropped remote code from .*modeling_evil.py \(not copied\)"):
        result = CliRunner().invoke(app, [*args, "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not list(out.glob("*.py"))
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "auto_map" not in config["text_config"]
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())


def test_strip_remote_code_names_what_it_removed(base_with_remote_code):
    dropped = strip_remote_code(base_with_remote_code)
    assert dropped == [
        "modeling_evil.py",
        "config.json: auto_map",
        "config.json: text_config.auto_map",
        "tokenizer_config.json: auto_map",
    ]
    assert strip_remote_code(base_with_remote_code) == []


def test_an_expert_path_may_hold_commas(tmp_path, tiny_base):
    assert parse_expert("image=/data/a,b/ckpt,noise_scale=0.01") == {
        "name": "image",
        "source": "/data/a,b/ckpt",
        "noise_scale": "0.01",
    }
    with pytest.raises(ValueError, match="'nois_scale=0.1' is not an option; options are key=value with key one of"):
        parse_expert("image=/data/ckpt,nois_scale=0.1")
    specialist = tmp_path / "image,v2"
    shutil.copytree(tiny_base, specialist)
    out = tmp_path / "moe"
    args = ["upcycle", "--base", str(tiny_base), "--expert", f"image={specialist},seed=3", "--expert", "base"]
    result = CliRunner().invoke(app, [*args, "--layers", "0", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    sources = json.loads((out / "moekit.json").read_text())["sources"]
    assert sources["image"]["path"] == str(specialist.resolve())


class _Hostile:
    """Unpickling this runs `touch MARK`: what a hostile `.bin` checkpoint would do."""

    def __init__(self, mark):
        self.mark = str(mark)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.mark}",))


def test_a_hostile_pickle_is_blocked_even_with_allow_pickle(tmp_path, tiny_base):
    import torch

    mark = tmp_path / "code-ran"
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    torch.save({"model.layers.0.mlp.down_proj.weight": _Hostile(mark)}, hostile / "pytorch_model.bin")
    args = ["upcycle", "--base", str(tiny_base), "--expert", f"h={hostile}", "--expert", "base", "--layers", "0"]
    for extra in ([], ["--allow-pickle"]):
        result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "moe"), "-q", *extra])
        assert result.exit_code == 1 and "pytorch_model.bin" in result.output
        assert not mark.exists() and not (tmp_path / "moe").exists()
    assert "cannot be read as a weights-only PyTorch file" in result.output


def test_recipes_are_safe_loaded(tmp_path, tiny_base):
    mark = tmp_path / "code-ran"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: !!python/object/apply:os.system ['touch {mark}']\noutput_dir: runs\nstages: []\n")
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 1 and "could not determine a constructor" in result.output and not mark.exists()
