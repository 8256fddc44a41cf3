"""`moekit export --native`: stock transformers MoE classes load the export with moekit's logits."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
from typer.testing import CliRunner

import moekit
from moekit.cli.app import app
from moekit.demo.shrink import text_inputs_any, tiny_model_any
from moekit.demo.tiny import _TEXT, FAMILIES, tiny_inputs, tiny_model
from moekit.upcycle.export import ExportError, export_native
from moekit.upcycle.twins import ernie_layout, sparse_layout

from .conftest import family_inputs, logits

E, H, I = 4, 32, 64  # experts; hidden and expert width differ, and H != 2I: a transposition cannot pass
CASES = [
    ("qwen3_vl", "interval:2:1", "Qwen3VLMoeForConditionalGeneration"),
    ("qwen3_vl", [0, 1, 3], "Qwen3VLMoeForConditionalGeneration"),
    ("qwen3", "interval:4", "Qwen3MoeForCausalLM"),
    ("qwen2", "interval:2", "Qwen2MoeForCausalLM"),
    ("llama", "full", "MixtralForCausalLM"),
    ("mistral", "full", "MixtralForCausalLM"),
    ("granite", "full", "GraniteMoeForCausalLM"),
    ("ernie4_5", "interval:2:1", "Ernie4_5_MoeForCausalLM"),
    ("olmo2", "full", "FlexOlmoForCausalLM"),
    ("cohere2", [0, 1, 2], "Cohere2MoeForCausalLM"),  # layer 3 stays dense with full attention: no RoPE there
]
# The released layout of each twin's MoE tensors in an MoE layer (names relative to the layer): what vLLM, SGLang and
# llama.cpp read. Per-expert tensors are listed for expert 0.
RELEASED = {
    "Qwen3VLMoeForConditionalGeneration": {
        "mlp.gate.weight": (E, H),
        "mlp.experts.gate_up_proj": (E, H, 2 * I),
        "mlp.experts.down_proj": (E, I, H),
    },
    "Qwen3MoeForCausalLM": {
        "mlp.gate.weight": (E, H),
        "mlp.experts.0.gate_proj.weight": (I, H),
        "mlp.experts.0.up_proj.weight": (I, H),
        "mlp.experts.0.down_proj.weight": (H, I),
    },
    "Qwen2MoeForCausalLM": {
        "mlp.gate.weight": (E, H),
        "mlp.experts.0.gate_proj.weight": (I, H),
        "mlp.experts.0.down_proj.weight": (H, I),
        "mlp.shared_expert.up_proj.weight": (I, H),
        "mlp.shared_expert_gate.weight": (1, H),
    },
    "MixtralForCausalLM": {
        "block_sparse_moe.gate.weight": (E, H),
        "block_sparse_moe.experts.0.w1.weight": (I, H),
        "block_sparse_moe.experts.0.w3.weight": (I, H),
        "block_sparse_moe.experts.0.w2.weight": (H, I),
    },
    "GraniteMoeForCausalLM": {
        "block_sparse_moe.router.layer.weight": (E, H),
        "block_sparse_moe.input_linear.weight": (E, 2 * I, H),
        "block_sparse_moe.output_linear.weight": (E, H, I),
    },
    "Ernie4_5_MoeForCausalLM": {
        "mlp.gate.weight": (E, H),
        "mlp.moe_statics.e_score_correction_bias": (1, E),
        "mlp.experts.0.gate_proj.weight": (I, H),
        "mlp.experts.0.down_proj.weight": (H, I),
    },
    "Cohere2MoeForCausalLM": {
        "mlp.gate.weight": (E, H),
        "mlp.experts.0.gate_proj.weight": (I, H),
        "mlp.experts.0.down_proj.weight": (H, I),
    },
    "FlexOlmoForCausalLM": {
        "mlp.gate.weight": (E, H),
        "mlp.experts.0.up_proj.weight": (I, H),
        "mlp.experts.0.down_proj.weight": (H, I),
    },
}


def dense(family: str):
    """A tiny dense model: moekit's tiny families, or a text family from its config (4 layers, H 32, I 64)."""
    if family in FAMILIES:
        return tiny_model(family)
    extra = {"moe_layer_start_index": 0} if family == "ernie4_5" else {}
    config = AutoConfig.for_model(family, **{**_TEXT, "head_dim": 8, "tie_word_embeddings": False}, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _read_layer(folder, layer: int) -> dict[str, tuple]:
    shapes = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                marker = f"layers.{layer}."
                if marker in key:
                    shapes[key.split(marker, 1)[1]] = tuple(handle.get_slice(key).get_shape())
    return shapes


@pytest.mark.parametrize(("family", "layers", "stock"), CASES)
def test_stock_twin_computes_moekit_logits_from_the_released_layout(family, layers, stock, tmp_path):
    spec = moekit.UpcycleSpec(
        layers=layers, num_experts=E, top_k=2, experts=[{"name": f"e{i}", "noise_scale": 0.05} for i in range(E)]
    )
    moe = moekit.upcycle(dense(family), spec)
    moe.save_pretrained(tmp_path / "moe")
    export_native(tmp_path / "moe", tmp_path / "native", progress=False)
    files = sorted(p.name for p in (tmp_path / "native").iterdir())
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files  # one shard: hub naming
    written = _read_layer(tmp_path / "native", moe.config.moekit["layers"][0])
    for name, shape in RELEASED[stock].items():
        assert written.get(name) == shape, (name, written.get(name), sorted(written))
    assert not any("gate_up_proj" in k for k in written) or stock.startswith("Qwen3VL")
    auto = AutoModelForImageTextToText if family == "qwen3_vl" else AutoModelForCausalLM
    native = auto.from_pretrained(tmp_path / "native")
    assert type(native).__name__ == stock
    inputs = family_inputs(family) if family in FAMILIES else [("text", tiny_inputs("llama", "text", seed=3))]
    for kind, batch in inputs:
        torch.testing.assert_close(logits(native, batch), logits(moe, batch), atol=1e-5, rtol=0, msg=f"{family} {kind}")


@pytest.mark.parametrize(
    ("family", "stock"),
    [("qwen3_5", "Qwen3_5MoeForConditionalGeneration"), ("qwen3_5_text", "Qwen3_5MoeForCausalLM")],
)
def test_qwen3_5_exports_to_the_fused_qwen3_5_moe_release_layout(family, stock, tmp_path):
    # Qwen3.5 is hybrid (Gated DeltaNet + gated attention); only its FFNs change, into the fused v5 layout.
    dense_model = tiny_model_any(family)
    text = dense_model.config.get_text_config()
    hidden, width = text.hidden_size, text.intermediate_size
    assert hidden not in (width, 2 * width)
    spec = moekit.UpcycleSpec(
        layers="full", num_experts=E, top_k=2, experts=[{"name": f"e{i}", "noise_scale": 0.05} for i in range(E)]
    )
    moe = moekit.upcycle(dense_model, spec)
    moe.save_pretrained(tmp_path / "moe")
    export_native(tmp_path / "moe", tmp_path / "native", progress=False)
    written = _read_layer(tmp_path / "native", 1)
    released = {  # Qwen/Qwen3.5-35B-A3B: fused experts as transformers 5 holds them, no `.weight` suffix
        "mlp.gate.weight": (E, hidden),
        "mlp.experts.gate_up_proj": (E, 2 * width, hidden),
        "mlp.experts.down_proj": (E, hidden, width),
        "mlp.shared_expert.down_proj.weight": (hidden, width),
        "mlp.shared_expert_gate.weight": (1, hidden),
    }
    for name, shape in released.items():
        assert written.get(name) == shape, (name, written.get(name), sorted(written))
    auto = AutoModelForImageTextToText if family == "qwen3_5" else AutoModelForCausalLM
    native = auto.from_pretrained(tmp_path / "native")
    assert type(native).__name__ == stock
    batch = {**text_inputs_any(seed=2), "use_cache": False}
    torch.testing.assert_close(logits(native, batch), logits(moe, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("family", "shared_key"), [("qwen2", "shared_expert"), ("cohere2", "shared_experts")])
def test_a_zero_gate_moekit_shared_expert_maps_onto_the_twins_shared_expert(family, shared_key, tmp_path):
    spec = moekit.UpcycleSpec(
        layers="full",
        num_experts=3,
        top_k=2,
        shared_expert=True,
        experts=[{"name": f"e{i}", "noise_scale": 0.1} for i in range(3)],
    )
    moe = moekit.upcycle(dense(family), spec)
    for block in moe.moe_blocks():  # a trained shared expert, its gate still zero: the mix is 0.5 / 0.5
        block.shared_expert.expert.down_proj.weight.data.mul_(1.7)
    moe.save_pretrained(tmp_path / "moe")
    export_native(tmp_path / "moe", tmp_path / "native", progress=False)
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    assert f"mlp.{shared_key}.down_proj.weight" in _read_layer(tmp_path / "native", 0)
    batch = tiny_inputs("llama", "text", seed=4)
    torch.testing.assert_close(logits(native, batch), logits(moe, batch), atol=1e-5, rtol=0)
    for block in moe.moe_blocks():
        block.shared_expert.gate.weight.data.fill_(0.1)
    moe.save_pretrained(tmp_path / "trained")
    with pytest.raises(ExportError, match="the shared expert's gate was trained"):
        export_native(tmp_path / "trained", tmp_path / "native2", progress=False)
    assert not (tmp_path / "native2").exists()


def test_ernie_layer_sets_are_start_end_interval():
    assert ernie_layout([1, 3], 4) == {"moe_layer_start_index": 0, "moe_layer_end_index": 3, "moe_layer_interval": 2}
    assert ernie_layout([2, 3], 4) == {"moe_layer_start_index": 2, "moe_layer_end_index": 3, "moe_layer_interval": 1}
    assert ernie_layout([0, 3], 4) is None


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
        (
            "qwen2_5_vl",
            {"layers": "full"},
            r"qwen2_5_vl has no stock MoE twin: no stock MoE VLM has Qwen2.5-VL's .*Exportable: qwen2 -> qwen2_moe",
        ),
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
