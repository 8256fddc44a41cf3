import json

import torch
from safetensors.torch import save_file

from moekit.data import Preprocessor, split_batch
from moekit.data.config import DataConfig
from moekit.data.loader import build_loader
from moekit.data.teacher_features import DictFeatures, open_teacher_cache


def _config(synth_dir, names, max_samples=None, **kw):
    datasets = [{"name": n, "path": str(synth_dir / f"{n}.jsonl"), "max_samples": max_samples} for n in names]
    return DataConfig(datasets=datasets, **kw)


def test_every_modality_batches_and_runs_through_the_model(bundle, synth_dir):
    from transformers import AutoModelForImageTextToText

    names = ["stage1_2_image", "stage1_2_video", "stage1_2_3d", "stage2_1_pairs", "stage2_2_csqa"]
    loader = build_loader(_config(synth_dir, names, max_samples=2, mixing="concat"), bundle, batch_size=3)
    model = AutoModelForImageTextToText.from_pretrained(str(bundle)).eval()
    seen = set()
    for batch in loader:
        inputs, extras = split_batch(batch)
        assert set(extras) == {"sample_ids", "sample_modalities", "teacher", "geometry", "datasets"}
        assert inputs["input_ids"].shape == inputs["labels"].shape == inputs["mm_token_type_ids"].shape
        n_video = int((inputs["mm_token_type_ids"] == 2).sum())
        if "video_grid_thw" in inputs:
            assert n_video == int(inputs["video_grid_thw"].prod(-1).sum()) // 4
        for modality, geometry in zip(extras["sample_modalities"], extras["geometry"]):
            assert (geometry is not None) == (modality == "3d")
        with torch.no_grad():
            loss = model(**inputs).loss
        assert torch.isfinite(loss)
        seen.update(extras["sample_modalities"])
    assert seen == {"image", "video", "3d"}


def test_scene_geometry_matches_the_student_frames(bundle, synth_dir):
    loader = build_loader(_config(synth_dir, ["stage1_2_3d"]), bundle, split="eval", batch_size=1)
    batch = next(iter(loader))
    geometry = batch["geometry"][0]
    t, h, w = batch["video_grid_thw"][0].tolist()
    assert geometry["depth"].shape == (2 * t, 14 * h, 14 * w)  # one depth map per frame at the patched size
    assert geometry["poses"].shape == (2 * t, 4, 4) and geometry["intrinsics"].shape == (3, 3)
    assert batch["sample_modalities"] == ["3d"] and (geometry["depth"] > 0).float().mean() > 0.5


def test_pairs_carry_teacher_inputs_and_synergy_tokens(bundle, synth_dir):
    preprocessor = Preprocessor.from_dir(bundle, synergy_tokens=["<synergy>"])  # a head's one token, repeated
    loader = build_loader(_config(synth_dir, ["stage2_1_pairs"], synergy_tokens=3), preprocessor, split="eval")
    tokenizer = loader.dataset.parts[0].preprocessor.tokenizer
    synergy = tokenizer.convert_tokens_to_ids("<synergy>")
    kinds = set()
    for batch in loader:
        teacher = batch["teacher"][0]
        assert batch["sample_modalities"] == ["image"] and "pixel_values_videos" not in batch
        assert (
            int((batch["input_ids"] == synergy).sum()) == 3
            and (batch["labels"][batch["input_ids"] == synergy] == -100).all()
        )
        if "video" in teacher:
            frames = teacher["video"]["frames"]
            assert frames.ndim == 4 and frames.shape[1] == 3 and frames.min() >= 0 and frames.max() <= 1
        if "scene" in teacher:
            scene = teacher["scene"]
            count = scene["frames"].shape[0]
            assert scene["depth"].shape[0] == scene["poses"].shape[0] == scene["intrinsics"].shape[0] == count
        kinds.update(teacher)
    assert kinds == {"video", "scene"}


def _write_cache(folder, teacher, features):
    """A cache folder in the layout `moekit teach` writes (index.json + one safetensors shard)."""
    folder.mkdir(parents=True)
    tensors = {f"features/{k}": v for k, v in features.items()}
    meta = {"teacher": teacher, "params": {}, "dtype": "float32", "samples": {k: {"dim": 4} for k in features}}
    save_file(tensors, folder / "shard-00000.safetensors", metadata={"moekit": json.dumps(meta)})
    index = {
        "format": "moekit-teacher-cache",
        "version": 1,
        "teacher": teacher,
        "params": {},
        "dtype": "float32",
        "shards": ["shard-00000.safetensors"],
        "samples": {k: {"shard": "shard-00000.safetensors", "dim": 4} for k in features},
    }
    (folder / "index.json").write_text(json.dumps(index))


def test_cached_teacher_features_replace_teacher_media(bundle, synth_dir, tmp_path):
    _write_cache(tmp_path / "cache" / "vjepa2", "vjepa2", {"pv-00000": torch.ones(5, 4)})
    _write_cache(tmp_path / "cache" / "vggt", "vggt", {"ps-00000": torch.full((7, 4), 2.0)})
    reader = open_teacher_cache(tmp_path / "cache")
    assert set(reader.teacher_features("pv-00000")) == {"vjepa2"} and reader.teacher_features("nope") is None
    config = _config(synth_dir, ["stage2_1_pairs"], teacher_cache=str(tmp_path / "cache"))
    batches = {b["sample_ids"][0]: b["teacher"][0] for b in build_loader(config, bundle, split="eval")}
    assert torch.equal(batches["pv-00000"]["features"]["vjepa2"], torch.ones(5, 4))
    assert torch.equal(batches["ps-00000"]["features"]["vggt"], torch.full((7, 4), 2.0))
    assert "video" in batches["pv-00001"]  # not cached: the paired media are loaded instead
    loader = build_loader(
        _config(synth_dir, ["stage2_1_pairs"]),
        bundle,
        split="eval",
        features=DictFeatures({"pv-00001": {"t": torch.zeros(1, 2)}}),
    )
    teacher = {b["sample_ids"][0]: b["teacher"][0] for b in loader}["pv-00001"]
    assert list(teacher) == ["features"] and torch.equal(teacher["features"]["t"], torch.zeros(1, 2))


def test_training_order_is_deterministic_and_weighted(bundle, synth_dir):
    config = _config(synth_dir, ["stage1_2_image", "stage1_2_video"], samples_per_epoch=12, seed=3)
    config.datasets[0].weight = 3.0
    ids = [b["sample_ids"][0] for b in build_loader(config, bundle)]
    assert ids == [b["sample_ids"][0] for b in build_loader(config, bundle)] and len(ids) == 12
    assert sum(i.startswith("img") for i in ids) > sum(i.startswith("vid") for i in ids)
