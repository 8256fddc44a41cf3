"""Parameter accounting, checked analytically and against PolyV's Table 5 on Qwen2.5-VL-7B's config."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

import moekit
from moekit.arch import resolve_arch
from moekit.cli.app import app
from moekit.demo.tiny import tiny_model
from moekit.modeling.meta_model import meta_model, read_config
from moekit.moe.accounting import account

QWEN_7B = Path(__file__).parent / "fixtures" / "qwen2_5_vl_7b_config.json"


def test_tiny_counts_are_analytic():
    model = tiny_model("llama")  # H=32, I=64: one SwiGLU FFN has 3*32*64 = 6144 weights
    dense_total = sum(p.numel() for p in model.parameters())
    moe = moekit.upcycle(model, moekit.UpcycleSpec(layers=[0, 2], num_experts=4, top_k=2))
    result = account(moe, "model.layers")
    router = 4 * 32
    assert result.total == dense_total + 2 * (3 * 6144 + router)
    assert result.active == dense_total + 2 * (1 * 6144 + router)
    assert [r.kind for r in result.layers] == ["moe", "dense", "moe", "dense"]


def test_table5_increments_on_qwen2_5_vl_7b_config():
    config = read_config(QWEN_7B)
    model = meta_model(config)
    adapter = resolve_arch(model)
    dense = account(model, adapter.layers)
    moe = moekit.upcycle(model, moekit.UpcycleSpec(layers="interval:4", num_experts=4, top_k=2))
    result = account(moe, adapter.layers)
    assert result.moe_layers == [0, 4, 8, 12, 16, 20, 24]
    # Table 5: Interval(4) adds 1.4B activated and 4.3B total parameters to the 7B base.
    assert (result.active - dense.active) / 1e9 == pytest.approx(1.4, abs=0.05)
    assert (result.total - dense.total) / 1e9 == pytest.approx(4.3, abs=0.05)
    full = account(
        moekit.upcycle(meta_model(read_config(QWEN_7B)), moekit.UpcycleSpec(layers="full", num_experts=4, top_k=2)),
        adapter.layers,
    )
    # The paper counts "Full" as 14 MoE layers (+2.9 / +8.6); with all 28 layers the increments double that.
    assert (full.active - dense.active) / 1e9 == pytest.approx(2 * 2.85, abs=0.1)


def test_inspect_cli_on_a_bare_config():
    result = CliRunner().invoke(app, ["inspect", str(QWEN_7B), "--layers", "interval:4"])
    assert result.exit_code == 0, result.output
    assert "M...M...M...M...M...M...M..." in result.output
    assert "+4.28B" in result.output and "+1.43B" in result.output


def test_inspect_cli_on_a_saved_moe_checkpoint(qwen_moe_dir):
    path, _, _ = qwen_moe_dir
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "M.M." in result.output and "3 experts" in result.output and "top-2" in result.output


def test_inspect_cli_errors_are_one_clean_line(tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "error:" in result.output and "no such file or directory" in result.output
    result = CliRunner().invoke(app, ["inspect", str(QWEN_7B), "--layers", "interval:4", "--top-k", "9"])
    assert result.exit_code == 1 and "top_k=9 is larger than num_experts=4" in result.output
