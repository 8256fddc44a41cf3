"""Teacher feature cache: sample list, sharded safetensors, resuming, atomic shards, reader, `moekit teach`."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from moekit.attach.teachers import FeatureCache, TeacherBatch, build_cache, load_frames, read_samples
from moekit.attach.teachers.samples import uniform_indices
from moekit.cli.app import app
from moekit.plugins.registry import registry
from tests.teacher_helpers import TINY_VGGT_PARAMS, vggt_checkpoint, write_frames


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Five samples of every kind, with frames of two sizes, and the JSONL that lists them."""
    root = tmp_path_factory.mktemp("data")
    write_frames(root / "clips" / "a", 12, seed=1)
    write_frames(root / "clips" / "b", 3, size=(30, 20), seed=2)
    write_frames(root / "scenes" / "s", 5, seed=3)
    write_frames(root / "images", 1, seed=4)
    lines = [
        {"id": "a", "video": "clips/a", "conversations": []},
        {"id": "b", "video": ["clips/b/3.png", "clips/b/1.png"]},
        {"id": 7, "image": "images/1.png"},
        {"id": "s", "scene": "scenes/s"},
        {"id": "s2", "scene": "scenes/s"},
    ]
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return data


@pytest.fixture(scope="module")
def teacher_setup(tmp_path_factory):
    ckpt = vggt_checkpoint(tmp_path_factory.mktemp("vggt") / "model.safetensors")
    params = {**TINY_VGGT_PARAMS, "checkpoint": str(ckpt)}
    component = registry().get("teacher", "vggt")
    stored = component.params.model_validate(params).model_dump(mode="json")
    return registry().build("teacher", "vggt", params), stored, params


def run(teacher_setup, samples, out, **kwargs):
    teacher, stored, _ = teacher_setup
    return build_cache(teacher, samples, out, teacher_name="vggt", params=stored, dtype="float32", **kwargs)


def test_samples_of_every_kind(dataset):
    samples = {s.id: s for s in read_samples(dataset)}
    assert [p.name for p in samples["a"].paths][:3] == ["1.png", "2.png", "3.png"]  # natural order, 10 after 9
    assert [p.name for p in samples["a"].paths][-3:] == ["10.png", "11.png", "12.png"]
    assert [p.name for p in samples["b"].paths] == ["3.png", "1.png"]
    assert samples["7"].kind == "image" and samples["s"].kind == "scene"
    frames, used = load_frames(samples["a"], max_frames=4)
    assert frames.shape == (4, 3, 20, 30) and used == [0, 4, 7, 11] == uniform_indices(12, 4)
    assert frames.min() >= 0.0 and frames.max() <= 1.0


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "x", "image": "i.png"}', "{oops"], r"data.jsonl:2: not valid JSON"),
        (['{"video": "v"}'], r"data.jsonl:1: missing or empty 'id'"),
        (['{"id": "x", "image": "i.png", "scene": "v"}'], r"data.jsonl:1 \(id 'x'\): expected exactly one of"),
        (['{"id": "x", "image": "i.png"}', "", '{"id": "q", "image": "nope.png"}'], r"data.jsonl:3 \(id 'q'\): no such file"),
        (['{"id": "x", "image": "i.png"}', '{"id": "x", "scene": "v"}'], r"data.jsonl:2 \(id 'x'\): duplicate id 'x' \(first at .*data.jsonl:1"),
        (['{"id": "x", "scene": "empty"}'], r"data.jsonl:1 \(id 'x'\): .*empty holds no image files"),
        (['{"id": "x", "video": "i.png"}'], r"data.jsonl:1 \(id 'x'\): .*i.png is not a folder of frames"),
    ],
)  # fmt: skip
def test_bad_lines_name_line_and_id(tmp_path, lines, message):
    write_frames(tmp_path / "v", 1)
    write_frames(tmp_path, 1)
    (tmp_path / "1.png").rename(tmp_path / "i.png")
    (tmp_path / "empty").mkdir()
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_samples(data)


def test_cache_holds_the_teachers_features(dataset, teacher_setup, tmp_path):
    teacher = teacher_setup[0]
    samples = read_samples(dataset)
    report = run(teacher_setup, samples, tmp_path / "cache")
    assert (report.computed, report.skipped, report.shards_written) == (5, 0, 1)
    cache = FeatureCache(tmp_path / "cache")
    assert len(cache) == 5 and "7" in cache and cache.teacher == "vggt" and cache.get("missing") is None
    for sample in samples:
        frames, used = load_frames(sample, teacher.num_frames)
        expected = teacher.features(TeacherBatch(frames[None])).features[0]
        torch.testing.assert_close(cache.get(sample.id), expected)
    meta = cache.meta("a")
    assert meta["grid"] == [4, 3, 4] and meta["dim"] == 32 and meta["kind"] == "video"
    assert [name.rsplit("/", 1)[-1] for name in meta["files"]] == ["1.png", "5.png", "8.png", "12.png"]
    assert cache.get("b", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_rerun_skips_what_is_cached(dataset, teacher_setup, tmp_path):
    samples = read_samples(dataset)
    out = tmp_path / "cache"
    run(teacher_setup, samples[:2], out, shard_mb=0)  # one shard per sample
    first = FeatureCache(out).get("a").clone()
    computed = []
    report = run(teacher_setup, samples, out, shard_mb=0, on_sample=lambda i, c: c and computed.append(i))
    assert (report.computed, report.skipped) == (3, 2) and computed == ["7", "s", "s2"]
    assert sorted(p.name for p in out.iterdir()) == ["index.json"] + [f"shard-{i:05d}.safetensors" for i in range(5)]
    torch.testing.assert_close(FeatureCache(out).get("a"), first, rtol=0, atol=0)


def test_an_interrupted_run_leaves_only_whole_shards_and_resumes(dataset, teacher_setup, tmp_path):
    samples = read_samples(dataset)
    out = tmp_path / "cache"
    # 'a' has 4 frames x 12 patches, 'b' 2 frames x 16 (x 32 float32 channels): the first shard closes after 'b'
    size = (4 * 12 + 2 * 16) * 32 * 4

    def stop_after_three(sample_id, computed):
        if sample_id == "7":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(teacher_setup, samples, out, shard_mb=size / 2**20, on_sample=stop_after_three)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-00000.safetensors"]
    assert FeatureCache(out).ids() == ["a", "b"]  # "7" was computed but its shard never completed
    (out / ".shard-00001.safetensors.tmp-1").write_bytes(b"half a shard")  # what a killed writer leaves
    report = run(teacher_setup, samples, out, shard_mb=size / 2**20)
    assert (report.computed, report.skipped) == (3, 2)
    assert not list(out.glob(".*")) and len(FeatureCache(out)) == 5


def test_reader_rebuilds_a_stale_index_from_shard_headers(dataset, teacher_setup, tmp_path):
    out = tmp_path / "cache"
    run(teacher_setup, read_samples(dataset), out, shard_mb=0)
    (out / "index.json").unlink()
    cache = FeatureCache(out)
    assert len(cache) == 5 and cache.get("s2").shape == (4 * 12, 32)
    stale = {"format": "moekit-teacher-cache", "version": 1, "shards": ["shard-00000.safetensors"], "samples": {}}
    (out / "index.json").write_text(json.dumps(stale))  # as left by a crash between a shard and its index
    assert len(FeatureCache(out)) == 5


def test_a_cache_made_differently_is_refused_unless_overwritten(dataset, teacher_setup, tmp_path):
    out = tmp_path / "cache"
    samples = read_samples(dataset)[:1]
    run(teacher_setup, samples, out)
    teacher, stored, _ = teacher_setup
    changed = {**stored, "layer": 0, "device": "cuda"}  # device alone would not matter
    with pytest.raises(ValueError, match=r"made differently: layer \(-1 -> 0\); write to another directory"):
        build_cache(teacher, samples, out, teacher_name="vggt", params=changed, dtype="float32")
    report = build_cache(teacher, samples, out, teacher_name="vggt", params=changed, dtype="float32", overwrite=True)
    assert report.computed == 1 and FeatureCache(out).params["layer"] == 0


def test_teach_command_end_to_end(dataset, teacher_setup, tmp_path):
    _, _, params = teacher_setup
    config = tmp_path / "teacher.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in params.items() if k != "checkpoint"}))
    out = tmp_path / "cache"
    args = ["teach", "--teacher", "vggt", "--data", str(dataset), "-o", str(out), "--config", str(config)]
    args += ["--param", f"checkpoint={params['checkpoint']}", "--param", "pooling=mean", "--dtype", "float16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "computed 5, already cached 0" in result.output
    cache = FeatureCache(out)
    assert cache.get("s").shape == (1, 32) and cache.get("s").dtype == torch.float16 and cache.dtype == "float16"
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "computed 0, already cached 5" in again.output
    changed = CliRunner().invoke(app, [*args, "--param", "layer=0"])
    assert changed.exit_code == 1 and "made differently: layer (-1 -> 0)" in changed.output
    assert "teacher vggt (dim" not in changed.output  # refused before the teacher loaded
    typo = CliRunner().invoke(app, [*args, "--param", "layres=0"])
    assert typo.exit_code == 1 and "layres: unknown key" in typo.output


def test_teach_command_errors_are_one_line(dataset, tmp_path):
    out = tmp_path / "never"
    unknown = CliRunner().invoke(app, ["teach", "--teacher", "dino", "--data", str(dataset), "-o", str(out)])
    assert unknown.exit_code == 1
    assert "error: --teacher dino: no teacher named 'dino'; available: clip_vision, vggt, vjepa2" in unknown.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "ok", "image": "x.png"}\n')
    result = CliRunner().invoke(app, ["teach", "--teacher", "vggt", "--data", str(bad), "-o", str(out)])
    assert result.exit_code == 1 and "bad.jsonl:1 (id 'ok'): no such file" in result.output
    missing = CliRunner().invoke(
        app, ["teach", "--teacher", "vggt", "--data", str(dataset), "-o", str(out), "--param", "checkpoint=/no/such"]
    )
    assert missing.exit_code == 1 and "checkpoint: checkpoint path '/no/such' does not exist" in missing.output
    assert not out.exists()
