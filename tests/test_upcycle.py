"""In-memory upcycling: function preservation for every family, expert sources, perturbations, router init."""

import warnings

import pytest
import torch

import moekit
from moekit.demo.tiny import FAMILIES, tiny_inputs, tiny_model
from moekit.moe import MoeBlock

from .conftest import family_inputs, logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_identical_experts_preserve_the_dense_function(family):
    model = tiny_model(family)
    cases = family_inputs(family)
    dense = [logits(model, batch) for _, batch in cases]
    moe = moekit.upcycle(model, moekit.UpcycleSpec(layers="interval:2", num_experts=4, top_k=2))
    assert sum(isinstance(m, MoeBlock) for m in moe.modules()) == 2
    for (kind, batch), ref in zip(cases, dense):
        torch.testing.assert_close(logits(moe, batch), ref, atol=1e-5, rtol=0, msg=f"{family} {kind}")


@pytest.mark.parametrize("layout", ["full", "first_half", "last_half", [1, 3]])
def test_layouts_and_shared_expert_preserve_function(layout):
    model = tiny_model("qwen3_vl")
    batch = tiny_inputs("qwen3_vl", "video")
    ref = logits(model, batch)
    moe = moekit.upcycle(model, moekit.UpcycleSpec(layers=layout, num_experts=3, top_k=1, shared_expert=True))
    torch.testing.assert_close(logits(moe, batch), ref, atol=1e-5, rtol=0)


def _expert_tensors(model, layer, expert):
    block = model.model.language_model.layers[layer].mlp
    return block.experts.gate_up_proj[expert], block.experts.down_proj[expert]


def test_experts_come_from_in_memory_specialists():
    base = tiny_model("qwen2_5_vl", seed=0)
    image = tiny_model("qwen2_5_vl", seed=1)  # stands in for an FFN-tuned copy
    state = {k: v for k, v in tiny_model("qwen2_5_vl", seed=2).state_dict().items() if ".mlp." in k}
    spec = moekit.UpcycleSpec(layers=[1], experts=[{"name": "image"}, {"name": "video"}, {"name": "base"}], top_k=2)
    ffn_image = image.model.language_model.layers[1].mlp
    ffn_video_gate = state["model.language_model.layers.1.mlp.gate_proj.weight"]
    dense = base.model.language_model.layers[1].mlp
    moe = moekit.upcycle(base, spec, sources={"image": image, "video": state})
    up, down = _expert_tensors(moe, 1, 0)
    assert torch.equal(up, torch.cat([ffn_image.gate_proj.weight, ffn_image.up_proj.weight]))
    assert torch.equal(down, ffn_image.down_proj.weight)
    assert torch.equal(_expert_tensors(moe, 1, 1)[0][:64], ffn_video_gate)
    assert torch.equal(_expert_tensors(moe, 1, 2)[1], dense.down_proj.weight)
    assert moe.config.moekit["experts"] == ["image", "video", "base"]


def test_bad_source_is_refused_before_the_model_changes():
    base = tiny_model("qwen2_5_vl")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    bad = {"model.language_model.layers.0.mlp.gate_proj.weight": torch.zeros(10, 32)}
    spec = moekit.UpcycleSpec(layers=[0], experts=[{"name": "a"}, {"name": "base"}], top_k=1)
    with pytest.raises(ValueError, match=r"expert 'a' \(state dict\), layer 0: .*"):
        moekit.upcycle(
            base,
            spec,
            sources={
                "a": {
                    **bad,
                    "model.language_model.layers.0.mlp.up_proj.weight": torch.zeros(10, 32),
                    "model.language_model.layers.0.mlp.down_proj.weight": torch.zeros(32, 10),
                }
            },
        )
    with pytest.raises(KeyError, match="no tensor 'model.language_model.layers.0.mlp.up_proj.weight'"):
        moekit.upcycle(base, spec, sources={"a": bad})
    with pytest.raises(ValueError, match=r"sources given for unknown experts \['b'\]"):
        moekit.upcycle(base, spec, sources={"b": bad})
    other = tiny_model("llama")
    with pytest.raises(ValueError, match="specialists must be copies of the same base"):
        moekit.upcycle(base, spec, sources={"a": other})
    with pytest.raises(ValueError, match=r"layer\(s\) \[9\] do not exist"):
        moekit.upcycle(base, moekit.UpcycleSpec(layers=[9], num_experts=2, top_k=1))
    assert type(base).__name__ == "Qwen2_5_VLForConditionalGeneration"
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_noise_and_drop_upcycling_perturb_as_specified():
    base = tiny_model("llama")
    dense = base.model.layers[0].mlp
    w_up = torch.cat([dense.gate_proj.weight, dense.up_proj.weight]).clone()
    w_down = dense.down_proj.weight.clone()
    spec = moekit.UpcycleSpec(
        layers=[0],
        experts=[
            {"name": "copy"},
            {"name": "noisy", "noise_scale": 0.1},
            {"name": "drop", "reinit_ratio": 0.5, "seed": 3},
        ],
        top_k=2,
    )
    moe = moekit.upcycle(base, spec)
    experts = moe.model.layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj[0], w_up)
    delta = experts.gate_up_proj[1] - w_up
    assert 0.07 < (delta.std() / w_up.std()).item() < 0.13
    changed_units = (experts.down_proj[2] != w_down).any(dim=0)
    assert changed_units.sum().item() == 32  # half of the 64 intermediate units
    rows = torch.cat([changed_units, changed_units])
    assert torch.equal(experts.gate_up_proj[2][~rows], w_up[~rows])
    assert not torch.equal(experts.gate_up_proj[2][rows], w_up[rows])


def test_router_inits():
    spec = moekit.UpcycleSpec(layers=[0], num_experts=2, top_k=1, router={"init": "normal", "std": 0.5})
    router = moekit.upcycle(tiny_model("llama"), spec).model.layers[0].mlp.gate.weight
    assert 0.3 < router.std().item() < 0.7
    with pytest.warns(UserWarning, match="ties break towards the lowest"):
        moe = moekit.upcycle(tiny_model("llama"), spec.model_copy(update={"router": moekit.RouterSpec(init="zeros")}))
    assert torch.count_nonzero(moe.model.layers[0].mlp.gate.weight) == 0


def test_prototype_router_rows_point_from_the_overall_mean_to_each_modality_mean():
    family = "qwen2_5_vl"
    calibration = [tiny_inputs(family, k, seed=s) for k in ("image", "video", "text") for s in range(2)]
    model = tiny_model(family)
    # Independent capture: the output of the norm that feeds layer 3's FFN.
    captured = []
    norm = model.model.language_model.layers[3].post_attention_layernorm
    handle = norm.register_forward_hook(lambda m, a, out: captured.append(out[0].detach()))
    with torch.no_grad():
        for batch in calibration:
            model(**batch)
    handle.remove()
    hidden = torch.cat(captured).double()
    ids = torch.cat([b["input_ids"][0] for b in calibration])
    mean_all = hidden.mean(0)
    spec = moekit.UpcycleSpec(
        layers=[3],
        experts=[{"name": "image"}, {"name": "video"}, {"name": "extra"}],
        top_k=1,
        router={"init": "prototype", "prototype_scale": 50.0, "std": 0.01},
    )
    moe = moekit.upcycle(model, spec, calibration=calibration)
    router = moe.model.language_model.layers[3].mlp.gate.weight
    for row, token in ((0, 310), (1, 311)):
        direction = hidden[ids == token].mean(0) - mean_all
        torch.testing.assert_close(router[row].double(), 50 * direction / direction.norm(), atol=1e-4, rtol=1e-4)
    assert router[2].abs().max() < 0.1  # no modality: normal init


def test_prototype_router_needs_the_modalities_it_names():
    spec = moekit.UpcycleSpec(
        layers=[0], experts=[{"name": "image"}, {"name": "3d"}], top_k=1, router={"init": "prototype"}
    )
    with pytest.raises(ValueError, match="no 3d tokens in the calibration batches"):
        moekit.upcycle(tiny_model("qwen2_5_vl"), spec, calibration=[tiny_inputs("qwen2_5_vl", "image")])
    with pytest.raises(ValueError, match="needs calibration batches"):
        moekit.upcycle(tiny_model("qwen2_5_vl"), spec)


def test_router_losses_follow_the_forward_and_skip_padding():
    moe = moekit.upcycle(tiny_model("llama"), moekit.UpcycleSpec(layers="full", num_experts=4, top_k=2))
    with pytest.raises(ValueError, match="run a forward pass first"):
        moekit.router_losses(moe)
    batch = tiny_inputs("llama")
    batch["attention_mask"][0, -4:] = 0
    moe(**batch)
    losses = moekit.router_losses(moe)
    assert set(losses.per_layer) == {0, 1, 2, 3}
    assert 1.0 <= losses.load_balancing.item() <= 4.0
    block = moe.model.layers[0].mlp
    from moekit.moe import load_balancing_loss

    expected = load_balancing_loss(block.last_router_logits[:8])
    assert losses.per_layer[0]["load_balancing"] == pytest.approx(expected.item(), rel=1e-6)
    assert losses.load_balancing.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        total = losses.total(0.01, 0.001)
    assert total.item() == pytest.approx(0.01 * losses.load_balancing.item() + 0.001 * losses.z_loss.item(), rel=1e-6)


def test_upcycling_twice_is_refused():
    moe = moekit.upcycle(tiny_model("llama"), moekit.UpcycleSpec(layers=[0], num_experts=2, top_k=1))
    with pytest.raises(ValueError, match="already an MoE model"):
        moekit.upcycle(moe, moekit.UpcycleSpec(layers=[1], num_experts=2, top_k=1))


def test_calibrate_router_after_conversion_sets_prototype_rows():
    from moekit.upcycle.router_init import calibrate_router

    family = "qwen2_5_vl"
    spec = moekit.UpcycleSpec(
        layers=[1, 3],
        experts=[{"name": "image"}, {"name": "video"}, {"name": "other"}],
        top_k=1,
        router={"prototype_scale": 20.0},
    )
    moe = moekit.upcycle(tiny_model(family), spec)
    before = moe.model.language_model.layers[1].mlp.gate.weight.clone()
    calibration = [tiny_inputs(family, k, seed=s) for k in ("image", "video", "text") for s in range(2)]
    captured = []
    handle = moe.model.language_model.layers[3].mlp.register_forward_pre_hook(
        lambda m, a: captured.append(a[0][0].detach())
    )
    with torch.no_grad():
        for batch in calibration:
            moe(**batch)
    handle.remove()
    updated = calibrate_router(moe, calibration)
    assert updated == {1: ["image", "video"], 3: ["image", "video"]}
    hidden = torch.cat(captured).double()
    ids = torch.cat([b["input_ids"][0] for b in calibration])
    direction = hidden[ids == 311].mean(0) - hidden.mean(0)
    router = moe.model.language_model.layers[3].mlp.gate.weight
    torch.testing.assert_close(router[1].double(), 20 * direction / direction.norm(), atol=1e-4, rtol=1e-4)
    assert torch.equal(moe.model.language_model.layers[1].mlp.gate.weight[2], before[2])
    assert moe.config.moekit["router_calibration"]["experts"] == ["image", "video"]
