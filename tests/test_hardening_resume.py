"""Hardening of `--resume`: each checkpoint keeps the training-relevant recipe and its fingerprint; a resume with a
changed recipe is refused naming the fields, unless every change is in the documented set and was accepted (then
the output's moekit.json records it); a stage shortened below its last checkpoint is refused."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.config.provenance import read_provenance

from .recipes import losses, run, stage, write_recipe
from .resume_worker import crash_after


@pytest.fixture
def crashed(tmp_path, tiny_base):
    """A 3-step run killed while collecting step 3, with checkpoints at steps 1 and 2."""
    spec = stage("s", trainable=["projector"], steps=3, save_every=1, keep_checkpoints=2)
    recipe = write_recipe(tmp_path, tiny_base, [spec])
    with pytest.raises(KeyboardInterrupt):
        run(recipe, batch_source=crash_after(2))
    stage_dir = tmp_path / "runs" / "s"
    assert sorted(p.name for p in (stage_dir / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    return recipe, stage_dir


def test_checkpoints_keep_the_recipe_and_its_fingerprint(crashed):
    _, stage_dir = crashed
    state = json.loads((stage_dir / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["recipe"]["optimizer.lr"] == 0.01 and state["recipe"]["seed"] == 0
    assert len(state["fingerprint"]) == 16 and "log_every" not in state["recipe"]


@pytest.mark.parametrize(
    ("override", "field", "old", "new"),
    [
        ("stages[0].optimizer.lr=0.02", "optimizer.lr", "0.01", "0.02"),
        ("stages[0].seed=1", "seed", "0", "1"),
        ("stages[0].schedule.kind=cosine", "schedule.kind", "'constant'", "'cosine'"),
        ("stages[0].steps=4", "steps", "3", "4"),
    ],
)
def test_a_changed_recipe_is_refused_naming_the_field(crashed, override, field, old, new):
    recipe, stage_dir = crashed
    with pytest.raises(ValueError, match="was written by a different recipe") as info:
        run(recipe, override, resume=True)
    assert f"stages[0].{field}: {old} in the checkpoint, {new} now" in str(info.value)
    assert not (stage_dir / "model").exists()


def test_steps_below_the_last_checkpoint_are_refused(crashed):
    recipe, stage_dir = crashed
    with pytest.raises(ValueError, match=r"steps: the stage now has 1 steps, fewer than its checkpoint's 2"):
        run(recipe, "stages[0].steps=1", resume=True, accept_changes=["steps"])
    assert not (stage_dir / "model").exists()


def test_an_accepted_change_is_applied_and_recorded(crashed):
    recipe, stage_dir = crashed
    result = CliRunner().invoke(app, ["run", str(recipe), "--resume", "--set", "stages[0].steps=4"])
    assert result.exit_code == 1 and "--accept-change steps" in result.output
    bad = CliRunner().invoke(app, ["run", str(recipe), "--resume", "--accept-change", "optimizer.lr"])
    assert bad.exit_code == 1 and "--accept-change 'optimizer.lr': not a field a resume can take" in bad.output
    args = ["run", str(recipe), "--resume", "--set", "stages[0].steps=4", "--accept-change", "steps"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert losses(stage_dir, "step") == [1, 2, 3, 4]
    record = read_provenance(stage_dir / "model")
    assert record.steps == 4
    assert record.resumed == [{"step": 2, "checkpoint": "step-00000002", "accepted": {"steps": [3, 4]}}]


def _drop_from_checkpoint(stage_dir, *fields):
    """The checkpoint as an older moekit wrote it: its recipe lacks `fields` (added to the schema since)."""
    path = stage_dir / "checkpoints" / "step-00000002" / "trainer.pt"
    trainer = torch.load(path, weights_only=True)
    for name in fields:
        del trainer["recipe"][name]
    torch.save(trainer, path)


def test_a_checkpoint_from_before_a_new_field_resumes_with_its_default(crashed):
    recipe, stage_dir = crashed
    saved = torch.load(stage_dir / "checkpoints" / "step-00000002" / "trainer.pt", weights_only=True)["recipe"]
    assert saved["seed"] == 0  # the schema's default
    _drop_from_checkpoint(stage_dir, "seed")
    run(recipe, resume=True)
    assert losses(stage_dir, "step") == [1, 2, 3]


def test_a_missing_field_that_differs_from_its_default_is_still_refused(crashed):
    recipe, stage_dir = crashed
    _drop_from_checkpoint(stage_dir, "seed")
    with pytest.raises(ValueError, match="was written by a different recipe") as info:
        run(recipe, "stages[0].seed=1", resume=True)
    assert "stages[0].seed: 0 in the checkpoint, 1 now" in str(info.value)  # the old recipe meant the default


def test_saved_fields_unflatten_to_the_stage_they_came_from(tiny_base, tmp_path):
    from moekit.recipe import load_plan
    from moekit.train.checkpoint import _flat, _unflat, training_fields

    phases = [
        {"name": "a", "steps": 1, "trainable": ["projector"]},
        {"name": "b", "steps": 2, "trainable": ["projector"]},
    ]
    plan = load_plan(write_recipe(tmp_path, tiny_base, [stage("s", steps=3, phases=phases)]))
    model = plan.stages[0].stage
    data = model.model_dump(mode="json", by_alias=True)
    assert _unflat(_flat(data)) == data
    assert type(model).model_validate(_unflat(_flat(data))) == model
    assert training_fields(model)["phases[1].steps"] == 2
