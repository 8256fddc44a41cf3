"""Trainable groups select exactly the intended parameters, on dense and upcycled tiny models."""

import re

import peft
import pytest
import torch
from torch import nn

import moekit
from moekit.arch.families import FAMILIES as ARCH
from moekit.demo.tiny import tiny_model
from moekit.recipe.schema import Group
from moekit.train import embeddings
from moekit.train.groups import select
from moekit.train.module import TrainModule

from .conftest import VLM_FAMILIES

LAYERS = r"model\.model\.language_model\.layers\.(\d+)\."


def groups(*names):
    return [Group(name=n) if not n.startswith("re:") else Group(pattern=n[3:]) for n in names]


def names(module, *wanted):
    return set(select(module, groups(*wanted), "test"))


def all_names(module):
    return {n for n, _ in module.named_parameters()}


def matching(module, pattern):
    return {n for n in all_names(module) if re.search(pattern, n)}


def test_dense_qwen_groups():
    module = TrainModule(tiny_model("qwen2_5_vl"))
    assert names(module, "projector") == matching(module, r"^model\.model\.visual\.merger\.")
    assert names(module, "vision_tower") == matching(module, r"^model\.model\.visual\.(?!merger\.)")
    assert names(module, "ffn") == matching(module, LAYERS + r"mlp\.")
    assert names(module, "decoder") == matching(module, r"^" + LAYERS)
    assert names(module, "embeddings") == {"model.model.language_model.embed_tokens.weight"}
    assert names(module, "lm_head") == {"model.lm_head.weight"}
    assert names(module, "all") == all_names(module)
    assert names(module, "re:layers\\.3\\.mlp\\.down") == {"model.model.language_model.layers.3.mlp.down_proj.weight"}
    assert len(names(module, "ffn")) == 4 * 3


def test_upcycled_groups_split_router_experts_and_dense_ffns():
    moe = moekit.upcycle(tiny_model("qwen2_5_vl"), moekit.UpcycleSpec(layers="interval:2", num_experts=3, top_k=2))
    module = TrainModule(moe)
    assert names(module, "router") == {f"model.model.language_model.layers.{i}.mlp.gate.weight" for i in (0, 2)}
    assert names(module, "experts") == {
        f"model.model.language_model.layers.{i}.mlp.experts.{p}" for i in (0, 2) for p in ("gate_up_proj", "down_proj")
    }
    assert names(module, "ffn") == matching(module, r"layers\.[13]\.mlp\.")
    assert names(module, "router", "experts", "ffn") == matching(module, LAYERS + r"mlp\.")


def test_shared_expert_belongs_to_experts_and_its_gate_to_router():
    spec = moekit.UpcycleSpec(layers=[1], num_experts=2, top_k=1, shared_expert=True)
    module = TrainModule(moekit.upcycle(tiny_model("llama"), spec))
    assert names(module, "router") == {
        "model.model.layers.1.mlp.gate.weight",
        "model.model.layers.1.mlp.shared_expert.gate.weight",
    }
    assert matching(module, r"layers\.1\.mlp\.shared_expert\.expert\.") <= names(module, "experts")


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_projector_and_vision_tower_partition_the_visual_side(family):
    module = TrainModule(tiny_model(family))
    fam = ARCH[family]
    projector, vision = names(module, "projector"), names(module, "vision_tower")
    assert projector and vision and not projector & vision
    prefixes = tuple(f"model.{p}" for p in (fam.vision, *fam.projector))
    assert projector | vision == {n for n in all_names(module) if n.startswith(prefixes)}
    assert all(n.startswith(tuple(f"model.{p}" for p in fam.projector)) for n in projector)


def test_a_group_without_parameters_is_an_error_naming_the_groups_that_exist():
    module = TrainModule(tiny_model("qwen2_5_vl"))
    with pytest.raises(
        ValueError, match=r"stages\[0\]\.trainable: group router selects no parameter .*qwen2_5_vl.*projector"
    ):
        select(module, groups("router"), "stages[0].trainable")
    with pytest.raises(ValueError, match="selects no parameter"):
        select(TrainModule(tiny_model("llama")), groups("projector"), "x")


def test_synergy_heads_and_lora_groups():
    model = peft.get_peft_model(tiny_model("qwen2_5_vl"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    module = TrainModule(model, {"syn": nn.Linear(32, 8)})
    assert names(module, "synergy_heads") == {"synergy_heads.syn.weight", "synergy_heads.syn.bias"}
    lora = names(module, "lora")
    assert lora and all("lora_" in n and "q_proj" in n for n in lora)
    assert len(lora) == 2 * 4  # A and B in each of the 4 decoder layers
    ffn = names(module, "ffn")
    assert len(ffn) == 12 and not ffn & lora
    assert names(module, "projector") == matching(module, r"visual\.merger\.")


def test_new_token_rows_train_alone_and_merge_back():
    model = tiny_model("qwen2_5_vl")
    model.resize_token_embeddings(330)
    before = model.get_input_embeddings().weight.detach().clone()
    embeddings.extend(model, 320)
    module = TrainModule(model)
    assert names(module, "new_token_embeddings") == {"model.model.language_model.embed_tokens.new_rows"}
    assert "model.model.language_model.embed_tokens.new_rows" not in names(module, "embeddings")
    rows = model.get_input_embeddings().new_rows
    with torch.no_grad():
        rows.add_(1.0)
    ids = torch.tensor([[5, 321]])
    out = model.get_input_embeddings()(ids)
    torch.testing.assert_close(out[0, 0], before[5])
    torch.testing.assert_close(out[0, 1], before[321] + 1.0)
    embeddings.merge(model)
    weight = model.get_input_embeddings().weight
    torch.testing.assert_close(weight[:320], before[:320])
    torch.testing.assert_close(weight[320:], before[320:] + 1.0)
