"""`moekit export --native`: stock transformers MoE classes load the export with moekit's logits."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from typer.testing import CliRunner

import moekit
from moekit.cli.app import app
from moekit.demo.tiny import tiny_model
from moekit.upcycle.export import ExportError, export_native, sparse_layout

from .conftest import family_inputs, logits

CASES = [
    ("qwen3_vl", "interval:2:1", "Qwen3VLMoeForConditionalGeneration"),
    ("qwen3_vl", [0, 1, 3], "Qwen3VLMoeForConditionalGeneration"),
    ("qwen3", "interval:4", "Qwen3MoeForCausalLM"),
    ("llama", "full", "MixtralForCausalLM"),
    ("mistral", "full", "MixtralForCausalLM"),
]


@pytest.mark.parametrize(("family", "layers", "stock"), CASES)
def test_stock_twin_computes_moekit_logits(family, layers, stock, tmp_path):
    spec = moekit.UpcycleSpec(
        layers=layers, num_experts=4, top_k=2, experts=[{"name": f"e{i}", "noise_scale": 0.05} for i in range(4)]
    )
    moe = moekit.upcycle(tiny_model(family), spec)
    moe.save_pretrained(tmp_path / "moe")
    export_native(tmp_path / "moe", tmp_path / "native", progress=False)
    auto = AutoModelForImageTextToText if family == "qwen3_vl" else AutoModelForCausalLM
    native = auto.from_pretrained(tmp_path / "native")
    assert type(native).__name__ == stock
    for kind, batch in family_inputs(family):
        torch.testing.assert_close(logits(native, batch), logits(moe, batch), atol=1e-5, rtol=0, msg=f"{family} {kind}")


def test_layouts_map_onto_sparse_step_and_mlp_only_layers():
    assert sparse_layout([3, 7, 11], 12) == (4, [])
    assert sparse_layout([1, 3], 4) == (2, [])
    assert sparse_layout([0, 4, 8], 12) == (1, [1, 2, 3, 5, 6, 7, 9, 10, 11])
    assert sparse_layout(list(range(6)), 6) == (1, [])
    for moe, n in (([3, 7, 11], 12), ([0, 4, 8], 12), ([0, 1], 5)):
        step, mlp_only = sparse_layout(moe, n)
        assert [i for i in range(n) if i not in mlp_only and (i + 1) % step == 0] == moe


STOCK_ONLY = """
import sys, torch, transformers
assert "moekit" not in sys.modules
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor([[5, 9, 33, 71, 2]])
with torch.no_grad():
    print(type(model).__name__, repr(model(input_ids=ids).logits[0, -1, :4].tolist()))
"""


def test_export_loads_in_a_process_without_moekit(tmp_path):
    moe = moekit.upcycle(tiny_model("qwen3"), moekit.UpcycleSpec(layers="full", num_experts=3, top_k=2))
    moe.save_pretrained(tmp_path / "moe")
    CliRunner().invoke(
        app, ["export", str(tmp_path / "moe"), str(tmp_path / "native"), "--native", "--quiet"], catch_exceptions=False
    )
    run = subprocess.run(
        [sys.executable, "-c", STOCK_ONLY, str(tmp_path / "native")], capture_output=True, text=True, timeout=300
    )
    name, values = run.stdout.strip().split(" ", 1)
    assert name == "Qwen3MoeForCausalLM", run.stderr[-2000:]
    with torch.no_grad():
        expected = moe(input_ids=torch.tensor([[5, 9, 33, 71, 2]])).logits[0, -1, :4]
    torch.testing.assert_close(torch.tensor(eval(values)), expected, atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and "moekit" not in config and config["norm_topk_prob"] is True


@pytest.mark.parametrize(
    ("family", "spec", "message"),
    [
        ("qwen2_5_vl", {"layers": "full"}, r"qwen2_5_vl has no stock MoE twin .*Exportable: qwen3_vl -> qwen3_vl_moe"),
        (
            "llama",
            {"layers": "interval:2"},
            r"mixtral makes every decoder layer MoE; this checkpoint has MoE layers \[0, 2\] of 4.*--layers full",
        ),
        ("qwen3", {"layers": "full", "shared_expert": True}, "qwen3_moe has no shared expert"),
    ],
)
def test_layouts_without_a_twin_are_refused_with_reasons(family, spec, message, tmp_path):
    moe = moekit.upcycle(tiny_model(family), moekit.UpcycleSpec(num_experts=2, top_k=1, **spec))
    moe.save_pretrained(tmp_path / "moe")
    with pytest.raises(ExportError, match=message):
        export_native(tmp_path / "moe", tmp_path / "native", progress=False)
    assert not (tmp_path / "native").exists()
    result = CliRunner().invoke(app, ["export", str(tmp_path / "moe"), str(tmp_path / "native"), "--native"])
    assert result.exit_code == 1 and result.output.startswith("error: ")
