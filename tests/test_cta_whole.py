"""Vid-LLM's cross-task adapter as a whole: the fused stream goes back into the LLM, a CLIP / SigLIP semantic
teacher from local weights, the teachers reading the student's own frames, L_geo / L_lang / L_sc trained from a
recipe, and the head saved with (and attached again to) the stage output."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
import yaml

import moekit.plugins.registry as registry
from moekit.attach.teachers.interface import TeacherBatch
from moekit.config import ConfigError
from moekit.data import Collator, DataConfig, build_dataset, split_batch
from moekit.demo.tiny import tiny_inputs, tiny_model
from moekit.evaluate.model_dir import open_model_dir
from moekit.modeling.load import load_any
from moekit_plugins.synergy.cta import geometry_loss
from moekit_plugins.teachers.tiny import TINY_VGGT, write_tiny_siglip, write_tiny_vggt

from .recipes import losses, run, write_recipe

TERMS = ("cta_geometry", "cta_language", "cta_structure")
CTA = {"num_bridge": 3, "width": 8, "heads": 1, "spatial_dim": 5, "semantic_dim": 5, "layer": 1}


def cta_on(model, **params):
    head = registry.registry().build("synergy_head", "vidllm_cta", {**CTA, **params})
    head.prepare(model)
    return head


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_fused_stream_reaches_the_llm_zero_at_init_then_trained():
    torch.manual_seed(0)
    model = tiny_model("qwen2_5_vl")
    batch = tiny_inputs("qwen2_5_vl", "image", seed=3)
    before = logits(model, batch)
    head = cta_on(model)
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=0)  # zero-initialised to_llm

    # At init the LM loss reaches the feed-back projection only; one SGD step on it changes the logits.
    model.zero_grad()
    model(**batch).logits.logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in head.named_parameters()}
    assert grads["to_llm.weight"].abs().sum() > 0
    assert all(grads[n] is None or grads[n].abs().sum() == 0 for n in grads if n.startswith("phi_lang"))
    with torch.no_grad():
        head.to_llm.weight -= 0.5 * grads["to_llm.weight"] / grads["to_llm.weight"].norm()
    after = logits(model, batch)
    assert (after - before).abs().max() > 1e-4

    # Now the LM loss trains the adapter itself: streams, bridge tokens and their attention.
    head.zero_grad()
    model(**batch).logits.logsumexp(-1).mean().backward()
    for name in (
        "phi_lang.0.weight",
        "phi_geom.0.weight",
        "bridge",
        "read_geom.in_proj_weight",
        "fuse_lang.in_proj_weight",
    ):
        assert head.get_parameter(name).grad.abs().sum() > 0, name

    # Only visual positions change, and a text-only forward is untouched.
    text = tiny_inputs("qwen2_5_vl", "text", seed=3)
    head.remove()
    plain_text, plain = logits(model, text), logits(model, batch)
    head.prepare(model)
    torch.testing.assert_close(logits(model, text), plain_text, rtol=0, atol=0)
    assert not torch.allclose(logits(model, batch), plain)
    head.remove()
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=0)


def test_losses_come_from_the_hooked_layer_streams():
    """The losses after a forward are those of the adapter run on decoder layer `layer`'s output."""
    torch.manual_seed(1)
    model = tiny_model("qwen2_5_vl")
    batch = tiny_inputs("qwen2_5_vl", "image", seed=3)
    seen = {}
    layer = model.get_submodule("model.language_model.layers")[1]
    probe = layer.register_forward_hook(lambda m, a, out: seen.update(hidden=out[0] if isinstance(out, tuple) else out))
    head = cta_on(model)
    n = int(torch.isin(batch["input_ids"], torch.tensor(head.visual_ids)).sum())
    teacher = {"spatial": torch.randn(1, n, 5), "semantic": torch.randn(1, 2 * n, 5)}
    model(**batch)
    hooked = head(hidden_states=torch.zeros(1), input_ids=batch["input_ids"], teacher=teacher)
    probe.remove()
    side = head(hidden_states=seen["hidden"], input_ids=batch["input_ids"], teacher=teacher)
    assert set(hooked) == {"cta_geometry", "cta_language", "cta_structure"}
    for name, value in hooked.items():
        torch.testing.assert_close(value, side[name])
        assert value.item() > 0
    geom, _ = head.adapt(*head.shared_tokens(seen["hidden"], batch["input_ids"]))
    torch.testing.assert_close(hooked["cta_geometry"], geometry_loss(head.to_spatial(geom[0]), teacher["spatial"][0]))


def test_layer_and_feedback_params_are_checked():
    with pytest.raises(ValueError, match="layer=9, but the model has 4 decoder layers"):
        cta_on(tiny_model("qwen2_5_vl"), layer=9)
    model = tiny_model("qwen2_5_vl")
    batch = tiny_inputs("qwen2_5_vl", "image", seed=3)
    before = logits(model, batch)
    head = cta_on(model, feedback=False)
    assert not hasattr(head, "to_llm")
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=0)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return write_tiny_siglip(tmp_path_factory.mktemp("teachers") / "siglip")


def teacher(name, **params):
    return registry.registry().build("teacher", name, params)


def test_hook_moekit_teachers_clip_vision_equals_siglip_on_its_own_preprocessed_frames(siglip_dir):
    frames = torch.rand(2, 3, 3, 20, 30)  # 2 samples x 3 frames
    out = teacher("clip_vision", checkpoint=str(siglip_dir)).features(TeacherBatch(frames=frames))
    assert out.features.shape == (2, 3 * 4, 32) and out.grid == (3, 2, 2) and out.frames_used == (0, 1, 2)
    model = transformers.SiglipVisionModel.from_pretrained(siglip_dir).eval()
    processor = transformers.SiglipImageProcessorPil.from_pretrained(siglip_dir)
    pixels = processor(images=list(frames.reshape(6, 3, 20, 30)), do_rescale=False, return_tensors="pt")
    with torch.no_grad():
        own = model(pixel_values=pixels["pixel_values"])
    torch.testing.assert_close(out.features, own.last_hidden_state.reshape(2, 12, 32))
    pooled = teacher("clip_vision", checkpoint=str(siglip_dir), output="pooled", num_frames=2)
    got = pooled.features(TeacherBatch(frames=frames))
    torch.testing.assert_close(got.features, own.pooler_output.reshape(2, 3, 32)[:, [0, 2]])


def test_clip_vision_reads_clip_without_a_processor_file_and_drops_the_class_token(tmp_path):
    config = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    torch.manual_seed(0)
    transformers.CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    image = torch.rand(1, 3, 24, 18)
    out = teacher("clip_vision", checkpoint=str(tmp_path / "clip")).features(TeacherBatch(frames=image))
    model = transformers.CLIPVisionModel.from_pretrained(tmp_path / "clip").eval()
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    with torch.no_grad():
        own = model(pixel_values=processor(images=list(image), do_rescale=False, return_tensors="pt")["pixel_values"])
    assert out.features.shape == (1, 4, 16)
    torch.testing.assert_close(out.features, own.last_hidden_state[:, 1:])
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type 'bert' is not a CLIP or SigLIP model"):
        teacher("clip_vision", checkpoint=str(tmp_path / "bert"))


@pytest.fixture(scope="module")
def cta_run(tmp_path_factory, bundle, synth_dir, siglip_dir):
    """One stage on the tiny VLM: videos, the CTA head fed by a tiny VGGT (geometry) and a tiny SigLIP
    (semantics), both reading the student's own frames."""
    tmp = tmp_path_factory.mktemp("cta")
    vggt = write_tiny_vggt(tmp / "vggt")
    slots = {
        "spatial": {
            "name": "vggt",
            "input": "student",
            "params": {"checkpoint": str(vggt), "arch": TINY_VGGT.model_dump(), "image_size": 28, "num_frames": 4},
        },
        "semantic": {"name": "clip_vision", "input": "student", "params": {"checkpoint": str(siglip_dir)}},
    }
    head = {"name": "vidllm_cta", "weight": 1.0, "terms": {"cta_structure": 0.5}}
    head["params"] = {"spatial_dim": 32, "semantic_dim": 32, "num_bridge": 4, "heads": 2, "layer": 1}
    stage = {
        "name": "cta",
        "trainable": ["synergy_heads"],
        "losses": {"synergy": [head]},
        "teachers": slots,
        "data": {
            "datasets": [{"name": "videos", "path": str(synth_dir / "stage1_2_video.jsonl")}],
            "frames": {"max_frames": 4},
            "student_frames": True,
        },
        "optimizer": {"lr": 1e-2},
        "schedule": {"kind": "constant"},
        "batch_size": 2,
        "steps": 2,
    }
    recipe = write_recipe(tmp, bundle, [stage])
    (out,) = run(recipe)
    return tmp, recipe, out


def test_l_geo_l_lang_and_l_sc_train_from_a_recipe(cta_run):
    tmp, _, _ = cta_run
    stage_dir = tmp / "runs" / "cta"
    for term in ("cta_geometry", "cta_language", "cta_structure"):
        values = losses(stage_dir, f"loss/vidllm_cta/{term}")
        assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), (term, values)
    first = {
        k: losses(stage_dir, k)[0] for k in ("loss/ce", "loss/vidllm_cta/cta_geometry", "loss/vidllm_cta/cta_language")
    }
    structure = losses(stage_dir, "loss/vidllm_cta/cta_structure")[0]
    total = (
        first["loss/ce"]
        + first["loss/vidllm_cta/cta_geometry"]
        + first["loss/vidllm_cta/cta_language"]
        + 0.5 * structure
    )
    assert losses(stage_dir)[0] == pytest.approx(total, rel=1e-6)


def test_the_stage_output_keeps_the_head_and_its_feedback(cta_run, synth_dir):
    _, _, out = cta_run
    opened = open_model_dir(out)
    head = opened.heads["vidllm_cta"]
    assert not head.training and head.to_llm.weight.abs().sum() > 0  # trained away from zero
    config = DataConfig(
        datasets=[{"name": "v", "path": str(synth_dir / "stage1_2_video.jsonl")}], frames={"max_frames": 4}
    )
    dataset = build_dataset(config, opened.preprocessor)
    batch, _ = split_batch(Collator(opened.preprocessor.pad_id)([dataset[0]]))
    batch.pop("labels")
    hooked = logits(opened.model, batch)
    torch.testing.assert_close(logits(open_model_dir(out).model, batch), hooked, rtol=0, atol=0)
    plain = load_any(out).eval()
    assert not torch.allclose(logits(plain, batch), hooked)  # the feed-back is part of the saved model
    head.remove()
    torch.testing.assert_close(logits(opened.model, batch), logits(plain, batch))


def test_student_input_needs_the_data_flag(tmp_path, bundle, synth_dir, siglip_dir):
    stage = {
        "name": "bad",
        "trainable": ["projector"],
        "teachers": {
            "semantic": {"name": "clip_vision", "input": "student", "params": {"checkpoint": str(siglip_dir)}}
        },
        "data": {"datasets": [{"name": "v", "path": str(synth_dir / "stage1_2_video.jsonl")}]},
        "optimizer": {"lr": 1e-2},
        "steps": 1,
    }
    with pytest.raises(ConfigError, match="teachers.semantic.input: student needs data.student_frames: true"):
        run(write_recipe(tmp_path, bundle, [stage]))


def test_student_slots_read_the_students_frames_or_cached_features(siglip_dir):
    from moekit.attach.teachers.batch import build_teachers, per_sample_teacher
    from moekit.recipe.schema import TeacherSlot

    slot = TeacherSlot(name="clip_vision", input="student", params={"checkpoint": str(siglip_dir)})
    teachers = build_teachers({"semantic": slot}, "stage", torch.device("cpu"))
    frames = torch.rand(2, 3, 20, 30)
    cached = torch.randn(5, 32)
    samples = [{"student": {"frames": frames}}, {"features": {"clip_vision": cached}}, None]
    out = per_sample_teacher(samples, teachers)
    expected = teachers["semantic"].features(TeacherBatch(frames=frames[None])).features[0]
    torch.testing.assert_close(out["semantic"][0, :8], expected)
    torch.testing.assert_close(out["semantic"][1, :5], cached)
    assert out["semantic_mask"].tolist() == [True, True, False]
    assert out["semantic_tokens_mask"].sum(-1).tolist() == [8, 5, 0]


def _next_stage(synth_dir, heads):
    return {
        "name": "next",
        "from": {"stage": "cta"},
        "trainable": ["projector"],
        "losses": {"synergy": heads},
        "data": {
            "datasets": [{"name": "videos", "path": str(synth_dir / "stage1_2_video.jsonl")}],
            "frames": {"max_frames": 4},
        },
        "optimizer": {"lr": 1e-2},
        "steps": 1,
    }


def test_a_later_stage_starts_from_the_trained_head_or_refuses_to_drop_it(cta_run, synth_dir, bundle):
    """The head is part of the model: the next stage loads its trained weights (here frozen, so saved unchanged)
    and a stage that does not list it is refused before training."""
    from safetensors.torch import load_file

    tmp, recipe, first = cta_run
    spec = yaml.safe_load(recipe.read_text())
    head = {**spec["stages"][0]["losses"]["synergy"][0], "terms": dict.fromkeys(TERMS, 0.0)}  # kept, not trained
    spec["stages"].append(_next_stage(synth_dir, [head]))
    recipe.with_name("two.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    *_, second = run(recipe.with_name("two.yaml"), resume=True)
    before, after = (
        load_file(str(first / "synergy_heads.safetensors")),
        load_file(str(second / "synergy_heads.safetensors")),
    )
    assert before["vidllm_cta.to_llm.weight"].abs().sum() > 0
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)

    spec["stages"][1] = _next_stage(synth_dir, [])
    spec["stages"][1]["name"] = "dropped"
    recipe.with_name("three.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ValueError, match=r"stages\[1\]\.losses\.synergy: .* trained with synergy head 'vidllm_cta'"):
        run(recipe.with_name("three.yaml"), resume=True)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_cta_under_ddp_and_fsdp2_matches_one_process(cta_run, mode):
    """The head runs inside a decoder layer that FSDP2 shards (its own parameters are the root's): two
    processes with one video each train it as one process does with both."""
    from .test_train_distributed import compare_runs, torchrun

    tmp, recipe, _ = cta_run
    # Adam's first step is lr * sign(g): a large eps keeps float noise on near-zero gradients from flipping steps.
    eps = "stages[0].optimizer.eps=0.001"
    (one,) = run(recipe, f"output_dir={tmp / f'one-{mode}'}", eps)
    two = tmp / f"two-{mode}"
    overrides = [f"output_dir={two}", eps, "stages[0].batch_size=1", f"stages[0].distributed.mode={mode}"]
    torchrun("run", str(recipe), *(arg for o in overrides for arg in ("--set", o)))
    compare_runs(two, tmp / f"one-{mode}", ["cta"])
    for term in TERMS:
        key = f"loss/vidllm_cta/{term}"
        assert losses(two / "cta", key) == pytest.approx(losses(tmp / f"one-{mode}" / "cta", key), rel=1e-4)
    trained = open_model_dir(two / "cta" / "model").heads["vidllm_cta"]
    reference = open_model_dir(one).heads["vidllm_cta"]
    for (name, a), b in zip(trained.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
