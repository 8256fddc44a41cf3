"""Architecture adapters: every family resolves to its decoder FFNs; unknown models get an explaining error."""

import pytest
import torch
from torch import nn

import moekit
from moekit.arch import ArchError, resolve_arch
from moekit.demo.tiny import FAMILIES, IMAGE_ID, VIDEO_FAMILIES, VIDEO_ID, tiny_model

EXPECTED_LAYERS = {
    "idefics3": "model.text_model.layers",
    "smolvlm": "model.text_model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "llama": "model.layers",
    "mistral": "model.layers",
    "phi": "model.layers",
    "phi3": "model.layers",
}
TEXT_FAMILIES = {"qwen2", "qwen3", "llama", "mistral", "phi", "phi3"}
VISION_KEYS = ("visual", "vision", "projector", "connector")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_resolves_to_its_decoder(family):
    model = tiny_model(family)
    adapter = resolve_arch(model)
    assert adapter.layers == EXPECTED_LAYERS.get(family, "model.language_model.layers")
    assert adapter.num_layers == 4 and adapter.hidden_size == 32 and adapter.intermediate_size == 64
    expected_kind = {"phi": "plain", "phi3": "fused"}.get(family, "gated")
    assert adapter.ffn.kind == expected_kind
    if family in TEXT_FAMILIES:
        assert adapter.image_token_ids == () and adapter.auto == "causal-lm"
    else:
        assert adapter.image_token_ids == (IMAGE_ID,) and adapter.auto == "image-text-to-text"
        assert adapter.video_token_ids == ((VIDEO_ID,) if family in VIDEO_FAMILIES else ())


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "idefics3"])
def test_vision_tower_and_projector_are_untouched(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items() if any(w in k for w in VISION_KEYS)}
    moekit.upcycle(model, moekit.UpcycleSpec(layers="full", num_experts=2, top_k=1))
    after = model.state_dict()
    assert before, "expected vision parameters"
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    vision_modules = [m for n, m in model.named_modules() if any(w in n for w in VISION_KEYS)]
    assert not any(type(m).__name__ == "MoeBlock" for m in vision_modules)


class Odd(nn.Module):
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
            self.feed_forward = nn.Linear(8, 8)

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"model_type": "oddball"})()
        self.blocks = nn.ModuleList([self.Layer(), self.Layer()])


def test_unknown_model_error_says_what_was_searched_found_and_how_to_override():
    with pytest.raises(ArchError) as info:
        resolve_arch(Odd())
    text = str(info.value)
    assert "Odd (oddball) cannot be upcycled: " in text and "no hidden_size" in text
    assert "decoder-layer lists found: blocks (2 x Layer)" in text
    assert "arch: {layers: model.layers, mlp: mlp}" in text


def test_override_with_unsupported_ffn_lists_its_children():
    with pytest.raises(
        ArchError,
        match=r"(?s)blocks.0.ffn \(Sequential\) is not an FFN moekit can split.*it has: 0: Linear 8->16, 1: ReLU",
    ):
        resolve_arch(Odd(), moekit.ArchOverride(layers="blocks", mlp="ffn"))


def test_override_paths_that_do_not_exist_are_named():
    with pytest.raises(ArchError, match="has no module 'model.decoder.layers'"):
        resolve_arch(tiny_model("llama"), moekit.ArchOverride(layers="model.decoder.layers"))
    with pytest.raises(ArchError, match="has no attribute 'ffn'; its children"):
        resolve_arch(tiny_model("llama"), moekit.ArchOverride(layers="model.layers", mlp="ffn"))


def test_a_model_type_moekit_does_not_list_is_found_by_structure_or_override():
    model = tiny_model("llama")
    model.config.model_type = "my_llama_fork"
    found = resolve_arch(model)
    assert (found.layers, found.mlp, found.ffn.gate, found.ffn.up, found.ffn.down) == (
        "model.layers",
        "mlp",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    assert not found.known and found.auto == "causal-lm" and found.model_class == "LlamaForCausalLM"
    adapter = resolve_arch(model, moekit.ArchOverride(layers="model.layers", mlp="mlp", image_token_ids=[7]))
    assert adapter.ffn.kind == "gated" and adapter.image_token_ids == (7,) and not adapter.known
