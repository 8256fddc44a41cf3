"""Synergy heads and teachers from the plug-in registry inside a training stage (a toy plug-in module)."""

from importlib import metadata

import pytest
import torch
from safetensors.torch import load_file

import moekit.plugins.registry
from moekit.train.outputs import load_model

from . import toy_plugin
from .recipes import losses, run, stage, tiny_source, write_recipe

NEW_TOKEN = 320  # the first row the toy head adds to the 320-token tiny vocabulary


@pytest.fixture
def toy_registry(monkeypatch):
    points = [
        metadata.EntryPoint(name="toy", value="tests.toy_plugin", group="moekit"),
        metadata.EntryPoint(name="sources", value="moekit_plugins.sources", group="moekit"),  # `tiny`
    ]
    registry = moekit.plugins.registry.new_registry(entry_points=points)
    monkeypatch.setattr(moekit.plugins.registry, "registry", lambda: registry)
    toy_plugin.TEACHER_CALLS.clear()
    toy_plugin.SOURCE_REQUESTS.clear()
    return registry


def with_teacher_and_new_token(request):
    """Tiny batches whose samples start with the head's new token and carry raw `video` teacher inputs."""
    for batch in tiny_source(request):
        batch["input_ids"][:, 0] = NEW_TOKEN
        batch["teacher"] = {"video": torch.full((batch["input_ids"].shape[0], 8), 0.5)}
        yield batch


def test_synergy_head_teacher_and_new_tokens_train_together(tmp_path, tiny_base, toy_registry):
    spec = stage(
        "syn",
        trainable=["synergy_heads", "new_token_embeddings"],
        steps=2,
        losses={"synergy": [{"name": "toy_head", "params": {"width": 8}, "weight": 2.0, "terms": {"temporal": 0.5}}]},
        teachers={"video": {"name": "toy_teacher", "params": {"scale": 2.0}}},
    )
    heads_only = {**spec, "name": "heads_only", "trainable": ["synergy_heads"]}
    run(write_recipe(tmp_path, tiny_base, [spec, heads_only]), batch_source=with_teacher_and_new_token)
    stage_dir = tmp_path / "runs" / "syn"
    assert toy_plugin.TEACHER_CALLS == [(1, 8)] * 4  # raw inputs went through the teacher, once per batch
    head_loss = losses(stage_dir, "loss/toy_head/temporal")
    ce = losses(stage_dir, "loss/ce")
    assert losses(stage_dir, "loss") == pytest.approx([c + 2.0 * 0.5 * h for c, h in zip(ce, head_loss)])
    assert head_loss[1] < head_loss[0]

    out = stage_dir / "model"
    heads = load_file(str(out / "synergy_heads.safetensors"))
    assert set(heads) == {"toy_head.align.weight", "toy_head.align.bias"}
    trained = load_model(out, where="t")
    untrained = load_model(tmp_path / "runs" / "heads_only" / "model", where="t")  # same seed, same new rows
    base = load_model(tiny_base, where="t")
    new, old = trained.get_input_embeddings().weight, base.get_input_embeddings().weight
    assert new.shape[0] == 322
    torch.testing.assert_close(new[:NEW_TOKEN], old, atol=0, rtol=0)  # only the added rows train
    start = untrained.get_input_embeddings().weight
    assert not torch.allclose(new[NEW_TOKEN], start[NEW_TOKEN])  # the token in the data moved
    torch.testing.assert_close(new[NEW_TOKEN + 1], start[NEW_TOKEN + 1], atol=0, rtol=0)  # the unused one did not
    for (name, a), b in zip(trained.named_parameters(), base.parameters()):
        if "embed_tokens" not in name and a.shape == b.shape:
            assert torch.equal(a, b), name


def test_unknown_components_and_bad_params_fail_before_any_model_loads(tmp_path, tiny_base, toy_registry):
    spec = stage(
        "syn",
        trainable=["synergy_heads"],
        losses={"synergy": [{"name": "toy_head", "params": {"widht": 8}}]},
        teachers={"scene": {"name": "vggt"}},
    )
    with pytest.raises(ValueError) as info:
        run(write_recipe(tmp_path, tiny_base, [spec]))
    text = str(info.value)
    assert "stages[0].losses.synergy[0].params.widht: unknown key" in text
    assert "stages[0].teachers.scene.name: no teacher named 'vggt'; available: toy_teacher" in text
    assert not (tmp_path / "runs").exists()


def test_hook_moekit_batch_sources(tmp_path, tiny_base, toy_registry):
    """A batch-source plug-in feeds a stage: `data_params` validated while the recipe is parsed (with the YAML
    path), the source built with them and asked for each epoch, the loss trained on what it yields."""
    bad = stage("c", trainable=["ffn"], data_source="constant", data_params={"batches": 0, "colour": 1})
    with pytest.raises(ValueError) as info:
        run(write_recipe(tmp_path, tiny_base, [bad], name="bad.yaml"))
    text = str(info.value)
    assert "stages[0].data_params.batches: Input should be greater than or equal to 1" in text
    assert "stages[0].data_params.colour: unknown key" in text
    unknown = stage("c", trainable=["ffn"], data_source="nowhere", data_params={})
    with pytest.raises(ValueError, match="no batch_source named 'nowhere'; available: constant, tiny"):
        run(write_recipe(tmp_path, tiny_base, [unknown], name="unknown.yaml"))
    good = stage("c", trainable=["ffn"], data_source="constant", data_params={"batches": 2}, steps=3)
    run(write_recipe(tmp_path, tiny_base, [good]))
    assert toy_plugin.SOURCE_REQUESTS == [(0, 0, 1), (1, 0, 1)]  # epoch 0 (2 batches), then epoch 1
    assert len(losses(tmp_path / "runs" / "c")) == 3
