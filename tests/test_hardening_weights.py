"""Hardening of what is read: NaN/Inf weights stop conversion, in-memory upcycling and export (naming the tensor
and its file) unless asked for; a config.json that disagrees with the shard headers, or an index that disagrees
with its shards, is refused before anything is written and reported by `moekit inspect`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import moekit
from moekit.cli.app import app
from moekit.demo.tiny import tiny_model
from moekit.io.reader import CheckpointError, CheckpointReader, NonFiniteError, count_nonfinite

FFN = "model.layers.0.mlp.down_proj.weight"


def poke(folder, key, value, file="model.safetensors"):
    """Set one element of tensor `key` in `folder/file` to `value` (NaN, Inf, ...)."""
    state = load_file(folder / file)
    state[key] = state[key].clone()
    state[key].view(-1)[3] = value
    save_file(state, folder / file, metadata={"format": "pt"})


def upcycle(base, out, *extra):
    args = ["upcycle", "--base", str(base), "--layers", "0", "-o", str(out), "-q", *extra]
    return CliRunner().invoke(app, args)


@pytest.fixture
def base(tmp_path):
    out = tmp_path / "base"
    tiny_model("qwen2").save_pretrained(out)
    return out


def test_count_nonfinite_scans_in_chunks(monkeypatch):
    import moekit.io.reader as reader

    monkeypatch.setattr(reader, "FINITE_CHUNK", 7)
    t = torch.zeros(50)
    t[[3, 20]] = float("nan")
    t[49] = float("-inf")
    assert count_nonfinite(t) == (2, 1) and count_nonfinite(torch.zeros(50)) == (0, 0)
    assert count_nonfinite(torch.arange(5)) == (0, 0)  # integers hold no NaN
    assert count_nonfinite(torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)) == (1, 0)  # no isfinite kernel


@pytest.mark.parametrize(("key", "value"), [(FFN, float("nan")), ("model.embed_tokens.weight", float("inf"))])
def test_nonfinite_base_weights_stop_the_conversion(base, tmp_path, key, value):
    poke(base, key, value)
    out = tmp_path / "moe"
    result = upcycle(base, out, "--num-experts", "2")
    assert result.exit_code == 1, result.output
    assert f"{base / 'model.safetensors'}: tensor {key!r} holds" in result.output
    assert "--allow-nonfinite" in result.output and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # no partial either


def test_allow_nonfinite_writes_them_as_they_are(base, tmp_path):
    poke(base, "model.embed_tokens.weight", float("inf"))
    poke(base, "model.layers.1.mlp.up_proj.weight", float("nan"))  # an FFN that stays dense
    out = tmp_path / "moe"
    result = upcycle(base, out, "--num-experts", "2", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert count_nonfinite(fh.get_tensor("model.embed_tokens.weight")) == (0, 1)
        assert count_nonfinite(fh.get_tensor("model.layers.1.mlp.up_proj.weight")) == (1, 0)


def test_a_nonfinite_specialist_is_named(base, tmp_path):
    specialist = tmp_path / "image"
    shutil.copytree(base, specialist)
    poke(specialist, "model.layers.0.mlp.up_proj.weight", float("inf"))
    result = upcycle(base, tmp_path / "moe", "--expert", f"image={specialist}", "--expert", "base")
    assert result.exit_code == 1
    assert f"{specialist / 'model.safetensors'}: tensor 'model.layers.0.mlp.up_proj.weight' holds 0 NaN and 1 Inf" in (
        result.output
    )


def test_in_memory_upcycling_refuses_nonfinite_ffns():
    model = tiny_model("qwen2")
    with torch.no_grad():
        model.model.layers[2].mlp.gate_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"the base model, layer 2 FFN \(model.layers.2.mlp\): up holds 1 NaN"):
        moekit.upcycle(model, moekit.UpcycleSpec(layers="0,2", num_experts=2))
    after = model.state_dict()
    assert set(after) == set(before)
    for k in before:
        torch.testing.assert_close(before[k], after[k], rtol=0, atol=0, equal_nan=True)

    specialist = tiny_model("qwen2").state_dict()
    specialist[FFN] = torch.full_like(specialist[FFN], float("inf"))
    spec = {"layers": "0", "experts": [{"name": "a"}, {"name": "b"}]}
    with pytest.raises(NonFiniteError, match=r"expert 'b' \(state dict\), layer 0 FFN: down holds 0 NaN and 2048 Inf"):
        moekit.upcycle(tiny_model("qwen2"), spec, sources={"b": specialist})


def test_export_refuses_nonfinite_weights(tmp_path):
    moe = moekit.upcycle(tiny_model("qwen3"), moekit.UpcycleSpec(layers="full", num_experts=2, top_k=1))
    source = tmp_path / "moe"
    moe.save_pretrained(source)
    key = "model.layers.1.self_attn.q_proj.weight"
    poke(source, key, float("nan"))
    result = CliRunner().invoke(app, ["export", "--native", str(source), str(tmp_path / "native"), "-q"])
    assert result.exit_code == 1 and f"tensor {key!r} holds 1 NaN" in result.output
    assert not (tmp_path / "native").exists()


def edit_config(folder, **sizes):
    config = json.loads((folder / "config.json").read_text())
    target = config.get("text_config", config)
    target.update(sizes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("sizes", [{"vocab_size": 640}, {"intermediate_size": 128}, {"num_key_value_heads": 1}])
def test_a_config_that_disagrees_with_the_weights_is_refused_before_writing(base, tmp_path, sizes):
    edit_config(base, **sizes)
    out = tmp_path / "moe"
    result = upcycle(base, out, "--num-experts", "2")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # one line, not a traceback
    assert f"error: {base / 'config.json'} disagrees with its weights" in result.output
    ((key, value),) = sizes.items()
    assert f"{key}={value}" in result.output and "in model.safetensors, the config implies" in result.output
    assert not out.exists()


def test_inspect_checks_headers_against_the_config(tmp_path, qwen_moe_dir):
    good = tmp_path / "good"
    shutil.copytree(qwen_moe_dir[0], good)
    result = CliRunner().invoke(app, ["inspect", str(good)])
    assert result.exit_code == 0 and "shapes match config.json: healthy" in result.output
    edit_config(good, num_key_value_heads=1)
    result = CliRunner().invoke(app, ["inspect", str(good)])
    assert result.exit_code == 1
    assert "is not a healthy checkpoint" in result.output and "self_attn.k_proj.weight is [16, 32]" in result.output


def sharded(tmp_path):
    out = tmp_path / "sharded"
    tiny_model("qwen2").save_pretrained(out, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    return out, index


def test_an_index_naming_a_tensor_its_shard_lacks_is_refused(tmp_path):
    folder, index = sharded(tmp_path)
    shards = sorted(set(index["weight_map"].values()))
    first = next(s for s in shards if list(index["weight_map"].values()).count(s) > 1)
    key = next(k for k, s in index["weight_map"].items() if s == first)
    index["weight_map"][key] = next(s for s in shards if s != first)  # a stale index: the tensor is elsewhere
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"names 1 tensor\(s\) missing from the shard it gives, e.g. '{key}'"):
        CheckpointReader(folder)
    result = upcycle(folder, tmp_path / "moe", "--num-experts", "2")
    assert result.exit_code == 1 and f"it is in {first}" in result.output
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 1 and "missing from the shard it gives" in result.output


def test_inspect_reports_tensors_the_index_leaves_out(tmp_path):
    folder, index = sharded(tmp_path)
    del index["weight_map"]["model.norm.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 1
    assert "does not list 1 tensor(s) of the shards, e.g. ['model.norm.weight']" in result.output
