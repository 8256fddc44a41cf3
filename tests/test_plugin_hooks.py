"""One test per hook (`test_hook_<name>`), each driving a component of the example third-party plug-in through
the public path a user takes: the registry, an UpcycleSpec, `moekit.arch`."""

import pytest
import torch
import transformers

import moekit
from moekit.arch import resolve_arch
from moekit.config import ConfigError, parse_config
from moekit.demo.tiny import _TEXT, tiny_inputs, tiny_model

from .conftest import logits


def test_hook_moekit_teachers(example_plugin):
    teacher = example_plugin.build("teacher", "example_patch_mean", {"patch": 14, "dim": 6})
    frames = torch.rand(2, 3, 3, 28, 56)
    features = teacher.features({"frames": frames})
    assert features.shape == (2, 3 * 2 * 4, 6)
    # the first token is the projected mean colour of frame 0's top-left patch
    expected = frames[0, 0, :, :14, :14].mean(dim=(1, 2)) @ teacher.projection
    torch.testing.assert_close(features[0, 0], expected)


def test_hook_moekit_position_encoders(example_plugin):
    model = tiny_model("qwen2_5_vl")
    batch = tiny_inputs("qwen2_5_vl", "image")
    before = model(**batch, output_hidden_states=True).hidden_states[0]
    encoder = example_plugin.build("position_encoder", "example_visual_offset", {"value": 0.25}, model=model)
    after = model(**batch, output_hidden_states=True).hidden_states[0]
    image = batch["input_ids"][0] == moekit.demo.tiny.IMAGE_ID
    torch.testing.assert_close(after[0, image] - before[0, image], torch.full((4, 32), 0.25))
    assert torch.equal(after[0, ~image], before[0, ~image])
    encoder.remove()
    assert torch.equal(model(**batch, output_hidden_states=True).hidden_states[0], before)


def test_hook_moekit_synergy_heads(example_plugin):
    model = tiny_model("qwen2_5_vl")
    head = example_plugin.build("synergy_head", "example_cosine", {"teacher_dim": 5})
    head.prepare(model)
    batch = tiny_inputs("qwen2_5_vl", "video")
    out = model(**batch, output_hidden_states=True)
    teacher = torch.randn(1, 7, 5)
    losses = head(hidden_states=out.hidden_states, input_ids=batch["input_ids"], teacher={"temporal": teacher})
    student = head.proj(out.hidden_states[-1].mean(1))
    expected = 1 - torch.nn.functional.cosine_similarity(student, teacher.mean(1))
    torch.testing.assert_close(losses["example_cosine"], expected.mean())


def _olmo2():
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("olmo2", **_TEXT)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_hook_moekit_arch_adapters(plugin_site, monkeypatch):
    import moekit.plugins.registry as registry

    found = resolve_arch(_olmo2())  # structure alone finds it; the plug-in adds the family's facts
    assert (found.layers, found.known, found.auto) == ("model.layers", False, "causal-lm")
    from .plugin_env import EXAMPLE, fake_install

    fake_install(plugin_site, "moekit-example-plugin", "0.1.0", {"example": "moekit_example_plugin"})
    monkeypatch.syspath_prepend(str(EXAMPLE))
    registry.reload()
    model = _olmo2()
    adapter = resolve_arch(model)
    assert (adapter.layers, adapter.auto, adapter.known) == ("model.layers", "causal-lm", True)
    batch = tiny_inputs("llama", "text")
    dense = logits(model, batch)
    moe = moekit.upcycle(model, moekit.UpcycleSpec(layers="interval:2", num_experts=3, top_k=2))
    torch.testing.assert_close(logits(moe, batch), dense, atol=1e-5, rtol=0)
    assert "olmo2" in moekit.arch.known_families()


def test_hook_moekit_expert_initializers(example_plugin):
    model = tiny_model("qwen2_5_vl")
    dense = model.model.language_model.layers[1].mlp.down_proj.weight.clone()
    spec = {
        "layers": [1],
        "experts": [{"name": "a"}, {"name": "b", "init": {"name": "example_damp", "params": {"factor": 0.25}}}],
        "top_k": 1,
    }
    moe = moekit.upcycle(model, spec)
    down = moe.model.language_model.layers[1].mlp.experts.down_proj
    assert torch.equal(down[0], dense)
    torch.testing.assert_close(down[1], dense * 0.25)
    assert moe.config.moekit["spec"]["experts"][1]["init"] == {"name": "example_damp", "params": {"factor": 0.25}}


def test_hook_moekit_router_initializers(example_plugin):
    model = tiny_model("qwen2_5_vl")
    spec = moekit.UpcycleSpec(
        layers=[0, 2], num_experts=3, top_k=2, router={"init": "example_orthogonal", "params": {"gain": 0.5}}
    )
    moe = moekit.upcycle(model, spec)
    for layer in (0, 2):
        weight = moe.model.language_model.layers[layer].mlp.gate.weight
        torch.testing.assert_close(weight @ weight.T, 0.25 * torch.eye(3), atol=1e-5, rtol=0)


def test_plugin_initialisers_are_checked_when_the_spec_is_read(example_plugin, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(
        "num_experts: 2\nexperts:\n  - name: a\n    init: {name: example_damp, params: {factor: -1}}\n"
        "  - name: b\n    init: example_dump\nrouter:\n  init: example_orthogonal\n  params: {gian: 2}\n"
    )
    with pytest.raises(ConfigError) as info:
        moekit.UpcycleSpec.from_yaml(path)
    problems = dict(info.value.problems)
    assert "greater than 0" in problems["experts[0].init.params.factor"]
    assert "no expert_init named 'example_dump'; available: example_damp" in problems["experts[1].init.name"]
    assert "unknown key" in problems["router.params.gian"]
    with pytest.raises(ConfigError, match="router.init: no router_init named 'uniform'; available: normal, zeros"):
        parse_config(moekit.UpcycleSpec, {"router": {"init": "uniform"}})
    with pytest.raises(ConfigError, match="router.params: the built-in router init 'normal' takes no params"):
        parse_config(moekit.UpcycleSpec, {"router": {"params": {"gain": 1}}})


def test_a_bad_expert_initialiser_is_named_before_the_model_is_half_built(example_plugin, monkeypatch):
    import moekit_example_plugin

    def grow(params):
        return lambda tensors, **_: {**tensors, "down": torch.zeros(3, 3)}

    monkeypatch.setattr(moekit_example_plugin, "damp", grow)
    moekit.plugins.registry.reload()
    model = tiny_model("qwen2_5_vl")
    spec = {"layers": [1], "experts": [{"name": "a", "init": "example_damp"}, {"name": "b"}], "top_k": 1}
    with pytest.raises(ValueError, match=r"experts\[0\].init \(example_damp\), layer 1: down has shape \(3, 3\)"):
        moekit.upcycle(model, spec)
    assert getattr(model.config, "moekit", None) is None
    assert type(model.model.language_model.layers[1].mlp).__name__ == "Qwen2MLP"
