import hashlib
import json

from moekit.data.schema import parse_sample, read_records
from moekit.demo.synth.vocab import NUMBERS, vocabulary, words_of
from moekit.demo.synth.writer import SynthSpec, write_synth

from ..conftest import SMALL

FILES = {
    "pretrain_captions.jsonl": 13,  # 6 images + 4 videos + 3 scenes
    "stage1_1_3d.jsonl": 3,
    "stage1_2_image.jsonl": 6,
    "stage1_2_video.jsonl": 4,
    "stage1_2_3d.jsonl": 3,
    "stage2_1_pairs.jsonl": 7,
    "stage2_2_csqa.jsonl": 7,
    "teach_video.jsonl": 4,
    "teach_scene.jsonl": 3,
    "eval.jsonl": 12,
}


def _digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_structure_and_schema(synth_dir):
    manifest = json.loads((synth_dir / "moekit.json").read_text())["params"]
    assert manifest["files"] == FILES and manifest["spec"] == SMALL.model_dump()
    for name in FILES:
        samples = (
            [parse_sample(r) for r in read_records(synth_dir / name)] if name.startswith(("stage", "eval")) else None
        )
        if samples is None:
            continue
        for s in samples:  # every medium exists
            paths = [*s.image_paths, *([s.clip[1]] if s.clip else [])]
            paths += [p for p in (s.paired.video, s.paired.scene) if p] if s.paired else []
            assert all((synth_dir / p).exists() for p in paths), s.id
    modalities = {parse_sample(r).modality for r in read_records(synth_dir / "stage2_2_csqa.jsonl")}
    assert modalities == {"video", "3d"}  # image + video, image + scene
    scene = synth_dir / "media" / "scenes" / "scn-00000"
    assert {p.name for p in scene.iterdir()} == {"color", "depth", "pose", "intrinsic.txt", "scene_graph.json"}
    assert len(list((scene / "depth").iterdir())) == SMALL.views
    teach = [json.loads(line) for line in (synth_dir / "teach_video.jsonl").read_text().splitlines()]
    pairs = {json.loads(line)["id"] for line in (synth_dir / "stage2_1_pairs.jsonl").read_text().splitlines()}
    assert {t["id"] for t in teach} <= pairs  # the feature cache is read by the pairs' ids


def test_eval_questions_are_checkable(synth_dir):
    samples = [parse_sample(r) for r in read_records(synth_dir / "eval.jsonl")]
    assert sorted({s.task for s in samples}) == ["background", "colour", "count", "motion", "nearer", "scene_count"]
    for s in samples:
        assert s.conversations[-1].value in s.choices and len(set(s.choices)) == len(s.choices) >= 2
        if s.task == "scene_count":  # a multi-view scene with its geometry, counted from its scene graph
            graph = json.loads((synth_dir / s.scene / "scene_graph.json").read_text())
            assert s.conversations[-1].value == NUMBERS[len(graph["objects"])]


def test_pretrain_captions_describe_every_training_sample(synth_dir):
    captions = [parse_sample(r) for r in read_records(synth_dir / "pretrain_captions.jsonl")]
    sources = {}
    for name in ("stage1_2_image.jsonl", "stage1_2_video.jsonl", "stage1_2_3d.jsonl"):
        sources |= {s.id: s for s in map(parse_sample, read_records(synth_dir / name))}
    assert {c.id.removesuffix("-cap") for c in captions} == set(sources)
    for caption in captions:
        source = sources[caption.id.removesuffix("-cap")]
        assert len(caption.conversations) == 2 and caption.conversations[0].value.split("\n")[-1].startswith("Describe")
        assert caption.conversations[1].value in [t.value for t in source.conversations[1::2]]  # its description
        assert caption.modality == source.modality


def test_answers_follow_the_graphs(synth_dir):
    for record in read_records(synth_dir / "stage1_2_video.jsonl"):
        sample = parse_sample(record)
        graph = sample.meta["graph"]
        mover = next(o for o in graph["objects"] if o["name"] == graph["mover"])
        (x0, y0), (x1, y1) = mover["track"][0], mover["track"][-1]
        direction = ("right" if x1 > x0 else "left") if abs(x1 - x0) > abs(y1 - y0) else ("down" if y1 > y0 else "up")
        assert sample.conversations[1].value == direction


def test_every_word_is_in_the_vocabulary(synth_dir):
    vocab = set(vocabulary())
    for name in FILES:
        for record in read_records(synth_dir / name):
            for turn in record.data.get("conversations", []):
                text = turn["value"].replace("<image>", " ").replace("<video>", " ")
                assert set(words_of(text)) <= vocab, (record.where, set(words_of(text)) - vocab)


def test_deterministic_for_a_seed(tmp_path, synth_dir):
    write_synth(tmp_path / "again", SMALL)
    assert _digest(tmp_path / "again") == _digest(synth_dir)
    write_synth(tmp_path / "other", SynthSpec(**{**SMALL.model_dump(), "seed": 8}))
    assert _digest(tmp_path / "other") != _digest(synth_dir)


def test_cli_writes_and_validates(tmp_path):
    from typer.testing import CliRunner

    from moekit.cli.app import app

    args = ["synth", "-o", str(tmp_path / "s"), "--images", "2", "--videos", "1", "--scenes", "1"]
    args += ["--video-pairs", "1", "--scene-pairs", "1", "--eval-per-task", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s" / "moekit.json").read_text())["params"]["files"]["stage1_2_image.jsonl"] == 2
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "--overwrite" in again.output
    bad = CliRunner().invoke(app, ["synth", "-o", str(tmp_path / "t"), "--width", "20"])
    assert bad.exit_code == 1 and "width" in bad.output and not (tmp_path / "t").exists()
