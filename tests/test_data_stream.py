"""The trainer's `data` batch source: epoch order shared by every process, rank sharding, resume offsets;
and the per-sample teacher entries turned into padded features for the synergy heads."""

import pytest
import torch

from moekit.attach.teachers.batch import per_sample_teacher
from moekit.data import iter_batches
from moekit.demo.bundle import write_tiny_vlm
from moekit.demo.synth.writer import SynthSpec, write_synth
from moekit.modeling.load import load_any
from moekit.plugins.registry import registry
from moekit.recipe.schema import Stage
from moekit.train.sources import BatchRequest


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    write_tiny_vlm(root / "base")
    write_synth(root / "data", SynthSpec(images=6, videos=2, scenes=2, video_pairs=3, scene_pairs=2, eval_per_task=1))
    return root


def _request(root, stage, rank=0, world=1, start=0, batch=2):
    model = load_any(root / "base")
    return BatchRequest(
        stage,
        model,
        None,
        batch,
        rank=rank,
        world_size=world,
        epoch=0,
        start=start,
        model_dir=root / "base",
        synergy_tokens=["<synergy>"],  # what a synergy head reading one repeated token would declare
    )


def _stage(root, **data):
    return Stage.model_validate(
        {
            "name": "s",
            "optimizer": {"lr": 1e-3},
            "steps": 1,
            "trainable": ["ffn"],
            "data": {
                "datasets": [
                    {"name": "img", "path": str(root / "data" / "stage1_2_image.jsonl")},
                    {"name": "pairs", "path": str(root / "data" / "stage2_1_pairs.jsonl")},
                ],
                **data,
            },
        }
    )


def test_processes_split_one_epoch_order_and_resume_skips_seen_batches(tiny_inputs):
    stage = _stage(tiny_inputs, mixing="concat")
    whole = [i for b in iter_batches(_request(tiny_inputs, stage, batch=1)) for i in b["sample_ids"]]
    assert len(whole) == 11 and len(set(whole)) == 11
    first = [i for b in iter_batches(_request(tiny_inputs, stage, rank=0, world=2, batch=1)) for i in b["sample_ids"]]
    second = [i for b in iter_batches(_request(tiny_inputs, stage, rank=1, world=2, batch=1)) for i in b["sample_ids"]]
    assert first == whole[0:10:2] and second == whole[1:10:2]  # equal counts per process
    resumed = iter_batches(_request(tiny_inputs, stage, start=3, batch=2))
    assert len(resumed) == 5
    assert [i for b in resumed for i in b["sample_ids"]] == whole[6:10]


def test_batches_carry_model_inputs_labels_and_per_sample_teacher_inputs(tiny_inputs):
    stage = _stage(tiny_inputs, synergy_tokens=2)
    stage.data.datasets = stage.data.datasets[1:]  # the distillation pairs only
    batch = next(iter(iter_batches(_request(tiny_inputs, stage))))
    assert {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"} <= set(batch)
    assert "geometry" not in batch and "datasets" not in batch
    assert (batch["labels"] != -100).any()
    assert len(batch["teacher"]) == 2 and all("video" in t or "scene" in t for t in batch["teacher"])
    from transformers import AutoTokenizer

    token = AutoTokenizer.from_pretrained(tiny_inputs / "base").convert_tokens_to_ids("<synergy>")
    synergy = batch["input_ids"] == token  # twice after each student image
    assert synergy.sum(1).tolist() == [2, 2]


def test_teacher_features_are_padded_with_masks_and_cache_wins(tmp_path):
    teacher_component = registry().get("teacher", "vjepa2")
    teacher_component.tiny(tmp_path / "vjepa2", 0)
    teacher = registry().build("teacher", "vjepa2", {"checkpoint": str(tmp_path / "vjepa2"), "num_frames": 4})
    frames = torch.rand(4, 3, 16, 16)
    cached = torch.randn(3, teacher.dim)
    samples = [{"video": {"frames": frames}}, None, {"video": {"frames": frames}, "features": {"vjepa2": cached}}]
    out = per_sample_teacher(samples, {"video": teacher})
    live = teacher.features(
        __import__("moekit.attach.teachers.interface", fromlist=["TeacherBatch"]).TeacherBatch(frames=frames[None])
    ).features[0]
    assert out["temporal"].shape == (3, live.shape[0], teacher.dim)
    torch.testing.assert_close(out["temporal"][0], live)
    assert out["temporal_mask"].tolist() == [True, False, True]
    torch.testing.assert_close(out["temporal"][2, :3], cached)
    assert out["temporal_tokens_mask"][2].sum() == 3 and out["temporal_tokens_mask"][0].all()
    assert not out["temporal"][1].any()
