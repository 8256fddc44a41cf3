"""Save and load: same logits through moekit.load and the Auto classes; stock transformers refuses."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import moekit
from moekit.demo.tiny import FAMILIES, tiny_inputs, tiny_model

from .conftest import VLM_FAMILIES, family_inputs, logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_then_load_gives_the_same_logits(family, tmp_path):
    spec = moekit.UpcycleSpec(
        layers="interval:2:1",
        num_experts=3,
        top_k=2,
        experts=[
            {"name": "a", "noise_scale": 0.05},
            {"name": "b", "reinit_ratio": 0.25},
            {"name": "base"},
        ],
    )
    moe = moekit.upcycle(tiny_model(family), spec)
    cases = family_inputs(family)
    expected = [logits(moe, batch) for _, batch in cases]
    moe.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == f"moekit_{family}"
    assert config["moekit"]["moekit_version"] == moekit.__version__
    assert config["moekit"]["spec"]["experts"][1]["reinit_ratio"] == 0.25
    assert config["moekit"]["layers"] == [1, 3]
    auto = AutoModelForImageTextToText if family in VLM_FAMILIES else AutoModelForCausalLM
    for loaded in (moekit.load(tmp_path / "out"), auto.from_pretrained(tmp_path / "out")):
        assert type(loaded).__name__ == f"Moekit{type(tiny_model(family)).__name__}"
        for (kind, batch), ref in zip(cases, expected):
            torch.testing.assert_close(logits(loaded, batch), ref, atol=1e-6, rtol=0, msg=f"{family} {kind}")


def test_save_is_atomic_and_replaces_an_old_checkpoint(tmp_path, monkeypatch):
    moe = moekit.upcycle(tiny_model("llama"), moekit.UpcycleSpec(layers=[0], num_experts=2, top_k=1))
    out = tmp_path / "ckpt"
    moe.save_pretrained(out)
    original = (out / "model.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        moe.save_pretrained(out)
    assert (out / "model.safetensors").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.undo()
    (out / "tokenizer_config.json").write_text('{"kept": true}')
    moe.save_pretrained(out)
    assert (out / "tokenizer_config.json").read_text() == '{"kept": true}'  # side files survive a re-save


def test_experts_implementations_agree_after_load(qwen_moe_dir):
    path, batch, expected = qwen_moe_dir
    for impl in ("eager", "grouped_mm", "batched_mm"):
        model = moekit.load(path, experts_implementation=impl)
        assert model._moekit_context.settings._experts_implementation == impl
        torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown experts implementation 'fast'"):
        moekit.load(path, experts_implementation="fast")


STOCK = """
import sys, transformers
path = sys.argv[1]
for label, load in (("auto", transformers.AutoModelForImageTextToText.from_pretrained),
                    ("class", transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained)):
    try:
        load(path)
        print(label, "LOADED")
    except Exception as exc:
        print(label, "REFUSED", type(exc).__name__, str(exc).replace(chr(10), " ")[:200])
"""


def test_stock_transformers_refuses_a_moekit_checkpoint(qwen_moe_dir):
    path, _, _ = qwen_moe_dir
    result = subprocess.run([sys.executable, "-c", STOCK, str(path)], capture_output=True, text=True, timeout=300)
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["auto"].startswith("REFUSED ValueError") and "moekit_qwen2_5_vl" in lines["auto"]
    assert lines["class"].startswith("REFUSED RuntimeError") and "ignore_mismatched_sizes" in lines["class"]


def test_load_refuses_dense_and_incomplete_checkpoints(tmp_path):
    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="model_type 'llama' is a dense checkpoint"):
        moekit.load(tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        moekit.load(tmp_path / "nowhere")
    moe = moekit.upcycle(tiny_model("llama"), moekit.UpcycleSpec(layers=[0], num_experts=2, top_k=1))
    state = {k: v for k, v in moe.state_dict().items() if "experts.down_proj" not in k}
    moe.save_pretrained(tmp_path / "partial", state_dict=state)
    with pytest.raises(ValueError, match=r"checkpoint incomplete; missing \['model.layers.0.mlp.experts.down_proj'\]"):
        moekit.load(tmp_path / "partial")


def test_bf16_round_trip(tmp_path):
    moe = moekit.upcycle(tiny_model("qwen3"), moekit.UpcycleSpec(layers="full", num_experts=2, top_k=1)).to(
        torch.bfloat16
    )
    moe.save_pretrained(tmp_path / "bf16")
    loaded = moekit.load(tmp_path / "bf16", dtype=torch.bfloat16)
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    saved = moe.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    # (transformers keeps RoPE frequencies in fp32 on load but not after .to(bf16), so compare two loads)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    batch = tiny_inputs("qwen3")
    torch.testing.assert_close(logits(loaded, batch), logits(again, batch), atol=0, rtol=0)


def test_flash_attention_falls_back_to_sdpa_with_the_extra_named(qwen_moe_dir):
    path, batch, expected = qwen_moe_dir
    with pytest.warns(UserWarning, match=r'pip install "moekit\[flash\]"|needs a CUDA device'):
        model = moekit.load(path, attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)


FRESH = """
import sys, torch, transformers
import moekit
path, out, auto_name, kind = sys.argv[1:]
auto = getattr(transformers, auto_name)
model = auto.from_pretrained(path) if kind == "pretrained" else auto.from_config(transformers.AutoConfig.from_pretrained(path))
torch.save({"type": type(model).__name__, "blocks": len(model.moe_blocks()), "state": model.state_dict()}, out)
"""


@pytest.mark.parametrize(("family", "kind"), [("qwen2_5_vl", "pretrained"), ("llama", "config")])
def test_auto_classes_work_right_after_import_in_a_fresh_process(family, kind, tmp_path):
    """`import moekit` alone (no model built in that process yet) makes the Auto classes know the checkpoint."""
    moe = moekit.upcycle(tiny_model(family), moekit.UpcycleSpec(layers="full", num_experts=2, top_k=1))
    moe.save_pretrained(tmp_path / "ckpt")
    auto = "AutoModelForImageTextToText" if family in VLM_FAMILIES else "AutoModelForCausalLM"
    out = tmp_path / "loaded.pt"
    args = [sys.executable, "-c", FRESH, str(tmp_path / "ckpt"), str(out), auto, kind]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = torch.load(out, weights_only=True)
    assert got["type"] == type(moe).__name__ and got["blocks"] == len(moe.moe_blocks())
    if kind == "pretrained":
        for key, value in moe.state_dict().items():
            assert torch.equal(got["state"][key], value), key
