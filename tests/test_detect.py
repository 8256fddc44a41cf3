"""Structural detection and the preservation proof: FFNs found by what they compute, refusals that teach, atomic
surgery, and `moekit verify` against a dense base."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM
from typer.testing import CliRunner

import moekit
from moekit.arch import ArchError, resolve_arch
from moekit.cli.app import app
from moekit.demo.tiny import tiny_inputs, tiny_model

from .conftest import logits

SPEC = moekit.UpcycleSpec(layers="full", num_experts=3, top_k=2)


def _snapshot(model):
    return type(model), {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snapshot) -> bool:
    cls, state = snapshot
    now = model.state_dict()
    return type(model) is cls and now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


class NormedMLP(nn.Module):
    """A Llama FFN with a norm between the gated product and the down projection (BitNet's `ffn_sub_norm`)."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
            mlp.act_fn,
        )
        self.ffn_sub_norm = nn.LayerNorm(mlp.down_proj.in_features)

    def forward(self, x):
        return self.down_proj(self.ffn_sub_norm(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


def test_an_ffn_that_computes_more_is_refused_naming_layer_class_and_extra_child_and_nothing_changes():
    model = tiny_model("llama")
    model.model.layers[2].mlp = NormedMLP(model.model.layers[2].mlp)
    before = _snapshot(model)
    with pytest.raises(ArchError) as info:
        moekit.upcycle(model, SPEC)
    text = str(info.value)
    assert "layer 2 (model.layers.2.mlp, NormedMLP)" in text and "ffn_sub_norm: LayerNorm" in text
    assert "moekit refuses" in text
    assert _unchanged(model, before)  # atomic: every check ran before the first change
    moe = moekit.upcycle(model, moekit.UpcycleSpec(layers=[0, 1, 3], num_experts=2, top_k=1))  # the rest is fine
    assert moe.config.moekit["layers"] == [0, 1, 3]


def test_the_first_layer_that_computes_more_is_refused_at_detection():
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp = NormedMLP(layer.mlp)
    with pytest.raises(ArchError, match=r"model.layers.0.mlp \(NormedMLP\) computes more than act\(gate\) \* up"):
        resolve_arch(model)


class Swapped(nn.Module):
    """Projections named so that names mislead: `a` is the up, `b` the gate; the activation is a function call."""

    def __init__(self, hidden, width):
        super().__init__()
        self.a, self.b, self.c = (
            nn.Linear(hidden, width, False),
            nn.Linear(hidden, width, False),
            nn.Linear(width, hidden, False),
        )

    def forward(self, x):
        return self.c(F.silu(self.b(x)) * self.a(x))


def test_gate_order_and_activation_are_settled_by_what_the_ffn_computes():
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp = Swapped(32, 64)
    batch = tiny_inputs("llama", "text", seed=1)
    dense = logits(model, batch)
    adapter = resolve_arch(model)
    assert (adapter.ffn.gate, adapter.ffn.up, adapter.ffn.act_fn, adapter.settled) == ("b", "a", "silu", True)
    moe = moekit.upcycle(model, SPEC)
    torch.testing.assert_close(logits(moe, batch), dense, atol=1e-5, rtol=0)


class ResidualMLP(nn.Module):
    """BLOOM / MPT style: the FFN adds the residual itself, `mlp(x, residual)`."""

    def __init__(self, mlp):
        super().__init__()
        self.up_proj, self.gate_proj, self.down_proj, self.act_fn = (
            mlp.up_proj,
            mlp.gate_proj,
            mlp.down_proj,
            mlp.act_fn,
        )

    def forward(self, x, residual):
        return residual + self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MaskedMLP(ResidualMLP):
    def forward(self, x, mask):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * mask


def test_an_ffn_that_adds_the_residual_keeps_doing_so_and_other_signatures_are_refused():
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp = ResidualMLP(layer.mlp)
    x, residual = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    dense = model.model.layers[1].mlp(x, residual)
    moe = moekit.upcycle(model, SPEC)
    torch.testing.assert_close(moe.model.layers[1].mlp(x, residual), dense, atol=1e-5, rtol=0)
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp = MaskedMLP(layer.mlp)
    with pytest.raises(ArchError, match=r"its forward takes \(x, mask\), not just the hidden states"):
        moekit.upcycle(model, SPEC)


def test_conv1d_projections_gpt2_keep_the_function_in_memory_and_streaming(tmp_path):
    config = GPT2Config(n_embd=32, n_inner=48, n_layer=2, n_head=4, vocab_size=96, n_positions=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    batch = {"input_ids": torch.randint(0, 96, (1, 10))}
    dense = logits(model, batch)
    model.save_pretrained(tmp_path / "gpt2")
    adapter = resolve_arch(model)
    assert (adapter.mlp, adapter.ffn.kind, adapter.ffn.up, adapter.ffn.down) == ("mlp", "plain", "c_fc", "c_proj")
    assert adapter.ffn.transposed and adapter.ffn.act == "act" and adapter.biased
    moe = moekit.upcycle(model, SPEC)
    torch.testing.assert_close(logits(moe, batch), dense, atol=1e-5, rtol=0)
    from moekit.upcycle.convert import convert

    convert(
        moekit.UpcycleSpec(base=str(tmp_path / "gpt2"), **SPEC.model_dump(exclude={"base", "experts"})),
        tmp_path / "moe",
        progress=False,
    )
    torch.testing.assert_close(logits(moekit.load(tmp_path / "moe").eval(), batch), dense, atol=1e-5, rtol=0)


def _opt_config() -> OPTConfig:
    return OPTConfig(
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=96,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )


def test_an_ffn_inline_in_the_layer_gets_a_block_beside_it_whose_halves_take_the_projections_places(tmp_path):
    config = _opt_config()
    torch.manual_seed(0)
    model = OPTForCausalLM(config).eval()
    batch = {"input_ids": torch.randint(3, 90, (2, 9))}
    dense = logits(model, batch)
    adapter = resolve_arch(model)
    assert adapter.inline and (adapter.mlp, adapter.ffn.up, adapter.ffn.down) == ("moe", "fc1", "fc2")
    spec = moekit.UpcycleSpec(
        layers="full", num_experts=3, top_k=2, experts=[{"name": f"e{i}", "noise_scale": 0.2} for i in range(3)]
    )
    moe = moekit.upcycle(model, spec)
    layer = moe.model.decoder.layers[1]
    assert type(layer.fc1).__name__ == "InlineUp" and not list(layer.fc1.parameters())
    assert sorted(n for n, _ in layer.named_parameters() if ".experts." in f".{n}")[:1] == ["moe.experts.down_proj"]
    out = logits(moe, batch)
    assert not torch.allclose(out, dense)  # the experts differ, so the routing matters
    loss = moe(**batch, labels=batch["input_ids"]).loss + moekit.router_losses(moe).total(0.01)
    loss.backward()  # gradients reach the experts and the router through both halves
    assert layer.moe.experts.up_proj.grad.abs().sum() > 0 and layer.moe.gate.weight.grad.abs().sum() > 0
    moe.save_pretrained(tmp_path / "moe")
    torch.testing.assert_close(logits(moekit.load(tmp_path / "moe").eval(), batch), out, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="inline in the layer, which moekit upcycles without a shared expert"):
        moekit.upcycle(OPTForCausalLM(_opt_config()), moekit.UpcycleSpec(layers="full", shared_expert=True))


def test_bad_overrides_name_the_module_path_and_shapes():
    model = tiny_model("llama")
    with pytest.raises(ArchError, match=r"model.layers.0.mlp.nope is not an nn.Linear .* gate_proj: Linear 32->64"):
        resolve_arch(model, moekit.ArchOverride(layers="model.layers", mlp="mlp", gate="nope", up="up_proj"))
    with pytest.raises(ArchError, match=r"model.layers.0.self_attn \(LlamaAttention\) is not an FFN .* 32 -> I -> 32"):
        resolve_arch(model, moekit.ArchOverride(layers="model.layers", mlp="self_attn"))


def test_experts_of_another_hidden_size_are_refused_before_the_model_changes():
    model = tiny_model("llama")
    state = {k: v[:, :16] if v.ndim == 2 else v for k, v in model.state_dict().items() if ".mlp." in k}
    before = _snapshot(model)
    spec = moekit.UpcycleSpec(layers=[1], experts=[{"name": "base"}, {"name": "small"}], top_k=1)
    with pytest.raises(
        ValueError,
        match=r"expert 'small' \(state dict\), layer 1: up has shape \(128, 16\), the base FFN has \(128, 32\)",
    ):
        moekit.upcycle(model, spec, sources={"small": state})
    assert _unchanged(model, before)


def test_moekit_verify_passes_copies_and_catches_a_broken_layout(tmp_path):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    runner = CliRunner()
    assert (
        runner.invoke(
            app,
            [
                "upcycle",
                "--base",
                str(base),
                "--layers",
                "interval:2",
                "--num-experts",
                "3",
                "-q",
                "-o",
                str(tmp_path / "moe"),
            ],
        ).exit_code
        == 0
    )
    good = runner.invoke(app, ["verify", str(tmp_path / "moe"), "--base", str(base), "--json"])
    assert good.exit_code == 0, good.output
    report = json.loads(good.stdout)
    assert report["ok"] and report["copies_only"] and report["replaced"] < 1e-5 and report["layers"] == [0, 2]
    noisy = tmp_path / "noisy"
    assert (
        runner.invoke(
            app,
            [
                "upcycle",
                "--base",
                str(base),
                "--expert",
                "a=base,noise_scale=0.5",
                "--expert",
                "b",
                "-q",
                "--layers",
                "full",
                "-o",
                str(noisy),
            ],
        ).exit_code
        == 0
    )
    result = runner.invoke(app, ["verify", str(noisy), "--base", str(base)])
    assert result.exit_code == 0 and "not a copies-only checkpoint" in result.output  # the layout is still exact
    config = json.loads((noisy / "config.json").read_text())
    config["moekit"]["arch"]["ffn"]["act_fn"] = "relu"  # a record that no longer describes the FFN
    (noisy / "config.json").write_text(json.dumps(config))
    broken = runner.invoke(app, ["verify", str(noisy), "--base", str(base)])
    assert broken.exit_code == 1 and "FAILED: the logits differ" in broken.output
