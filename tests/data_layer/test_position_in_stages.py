"""Position encoders inside recipes: geometry from the data layer reaches them in training, evaluation and
routing; they are saved with a stage's output, inherited by the stages that start from it and by `moekit
upcycle`; learned ones train and keep their weights."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import moekit
from moekit.attach.position import feeding, load_encoders
from moekit.cli.app import app
from moekit.data.config import DataConfig
from moekit.data.loader import build_dataset
from moekit.data.preprocess import Preprocessor
from moekit.evaluate.choices import read_choice_samples, score_choices
from moekit.evaluate.routes import collect_routes
from moekit.train.outputs import load_model
from moekit.upcycle.convert import convert

from ..recipes import losses, run, write_recipe

POLYV_3D = {"name": "polyv_3d", "params": {"min_wavelength": 0.05, "max_wavelength": 20.0}}
LEARNED = {"name": "temporal_frame", "params": {"mode": "learned", "init": "zeros", "max_frames": 8}}


def data_stage(name, synth_dir, file, modality, **fields):
    out = {
        "name": name,
        "data": {
            "datasets": [{"name": modality, "path": str(synth_dir / file), "modality": modality}],
            "frames": {"max_frames": 4},
        },
        "optimizer": {"lr": 1e-2},
        "schedule": {"kind": "constant"},
        "trainable": ["projector"],
        "batch_size": 2,
        "steps": 2,
    }
    out.update(fields)
    return out


def meta(stage_dir):
    return json.loads((stage_dir / "model" / "moekit.json").read_text())


def eval_scores(model_dir, eval_file, root, encoders):
    model = load_model(model_dir, where="t").eval()
    found = load_encoders(model_dir, model) if encoders else {}
    samples = read_choice_samples(eval_file)
    with torch.no_grad():
        report = score_choices(model, Preprocessor.from_dir(model_dir), samples, root, encoders=found)
    return {s["id"]: s["scores"] for s in report["samples"]}


def scene_and_image_questions(synth_dir, out):
    """Multiple-choice questions on two 3D scenes (fed as videos, with geometry) and the images of eval.jsonl."""
    lines = []
    for line in (synth_dir / "stage1_2_3d.jsonl").read_text().splitlines()[:2]:
        sample = json.loads(line)
        sample["conversations"] = sample["conversations"][:2]
        sample["choices"] = sorted({sample["conversations"][1]["value"], "one", "three"})
        lines.append(json.dumps(sample))
    lines += [line for line in (synth_dir / "eval.jsonl").read_text().splitlines() if '"image"' in line][:4]
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory, bundle, synth_dir):
    tmp = tmp_path_factory.mktemp("pe")
    stages = [
        data_stage("with_pe", synth_dir, "stage1_1_3d.jsonl", "3d", position_encoders=[POLYV_3D]),
        data_stage("plain", synth_dir, "stage1_1_3d.jsonl", "3d"),
        data_stage("inherits", synth_dir, "stage1_1_3d.jsonl", "3d", steps=1, **{"from": {"stage": "with_pe"}}),
        data_stage(
            "drops",
            synth_dir,
            "stage1_1_3d.jsonl",
            "3d",
            steps=1,
            position_encoders=[],
            **{"from": {"stage": "with_pe"}},
        ),
    ]
    run(write_recipe(tmp, bundle, stages))
    return tmp / "runs"


def test_geometry_reaches_the_encoder_in_training(sinusoid_run):
    with_pe, plain = losses(sinusoid_run / "with_pe"), losses(sinusoid_run / "plain")
    # same seed, data and start: only the encoding of the 3D tokens differs, so the first loss does
    assert with_pe[0] != pytest.approx(plain[0], rel=1e-6, abs=0)
    assert meta(sinusoid_run / "with_pe")["position_encoders"] == [POLYV_3D]
    assert "position_encoders" not in meta(sinusoid_run / "plain")
    assert not (sinusoid_run / "with_pe" / "model" / "position_encoders.safetensors").exists()  # no weights


def test_later_stages_inherit_or_drop_the_encoders(sinusoid_run):
    assert meta(sinusoid_run / "inherits")["position_encoders"] == [POLYV_3D]
    assert "position_encoders" not in meta(sinusoid_run / "drops")


def test_evaluation_feeds_geometry_to_3d_scenes_only(sinusoid_run, synth_dir, tmp_path):
    model_dir = sinusoid_run / "with_pe" / "model"
    questions = scene_and_image_questions(synth_dir, tmp_path / "questions.jsonl")
    fed, bare = (eval_scores(model_dir, questions, synth_dir, e) for e in (True, False))
    assert len(fed) == 6
    for sample, scores in fed.items():
        if sample.startswith("scn-"):  # a 3D scene: its visual tokens get the encoding
            assert any(abs(scores[c] - bare[sample][c]) > 1e-4 for c in scores), sample
        else:  # an image has no geometry: same scores
            assert scores == pytest.approx(bare[sample], abs=1e-5), sample


def test_upcycle_conversion_keeps_the_encoders(sinusoid_run, synth_dir, tmp_path):
    base = sinusoid_run / "with_pe" / "model"
    spec = moekit.UpcycleSpec(base=str(base), layers="interval:2", num_experts=2, top_k=1)
    convert(spec, tmp_path / "moe", progress=False)
    record = json.loads((tmp_path / "moe" / "moekit.json").read_text())
    assert record["position_encoders"] == [POLYV_3D] and record["format"] == "full"
    assert "stage" not in record  # the base's provenance is not copied as if it were this checkpoint's
    model = moekit.load(tmp_path / "moe").eval()
    encoders = load_encoders(tmp_path / "moe", model)
    assert list(encoders) == ["polyv_3d"]

    # routing analysis: the encoding changes which experts 3D tokens pick, and `moekit routes` applies it
    scenes = str(synth_dir / "stage1_2_3d.jsonl")
    config = DataConfig(datasets=[{"name": "scenes", "path": scenes}])
    dataset = build_dataset(config, Preprocessor.from_dir(tmp_path / "moe"))
    with torch.no_grad():
        fed = collect_routes(model, dataset, encoders=encoders)[1]["3d"].to_dict()
        bare = collect_routes(model, dataset)[1]["3d"].to_dict()
    assert fed != bare
    result = CliRunner().invoke(app, ["routes", str(tmp_path / "moe"), "--data", scenes, "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    cli = json.loads((tmp_path / "r" / "routes.json").read_text())["modalities"]["3d"]["stats"]
    assert cli == json.loads(json.dumps(fed))


def test_a_learned_encoder_trains_saves_and_is_inherited(tmp_path, bundle, synth_dir):
    stages = [
        data_stage(
            "temporal",
            synth_dir,
            "stage1_2_video.jsonl",
            "video",
            position_encoders=[LEARNED],
            trainable=["position_encoders"],
        ),
        data_stage("next", synth_dir, "stage1_2_video.jsonl", "video", steps=1, **{"from": {"stage": "temporal"}}),
    ]
    run(write_recipe(tmp_path, bundle, stages))
    out = tmp_path / "runs" / "temporal" / "model"
    table = load_file(str(out / "position_encoders.safetensors"))["temporal_frame.table.weight"]
    assert table.shape[0] == 8
    used = table.abs().sum(-1) > 0
    assert used[0] and not used[4:].any()  # zeros at start: only the frame positions in the data moved
    model = load_model(out, where="t")
    loaded = load_encoders(out, model)["temporal_frame"]
    torch.testing.assert_close(loaded.table.weight.detach(), table, atol=0, rtol=0)
    # the next stage trained only the projector: the table travels through it unchanged
    inherited = load_file(str(tmp_path / "runs" / "next" / "model" / "position_encoders.safetensors"))
    torch.testing.assert_close(inherited["temporal_frame.table.weight"], table, atol=0, rtol=0)


def test_bad_encoders_are_refused(tmp_path, bundle, synth_dir):
    # neo_native_rope joins a stage (tests/test_neo_rope_model.py), but not with a T group the model lacks
    bad = {"name": "neo_native_rope", "params": {"head_dim_t": 128}}
    rope = data_stage("rope", synth_dir, "stage1_1_3d.jsonl", "3d", position_encoders=[bad])
    with pytest.raises(ValueError, match=r"stages\[0\]\.position_encoders\[0\]: neo_native_rope: head_dim_t=128"):
        run(write_recipe(tmp_path, bundle, [rope], out="rope"))
    unknown = data_stage("x", synth_dir, "stage1_1_3d.jsonl", "3d", position_encoders=[{"name": "polyv3d"}])
    with pytest.raises(ValueError, match=r"stages\[0\]\.position_encoders\[0\].*polyv_3d"):
        run(write_recipe(tmp_path, bundle, [unknown], out="unknown"))
    assert not (tmp_path / "rope" / "rope" / "model").exists() and not (tmp_path / "unknown").exists()


def test_saved_weights_must_be_present_and_fit(tmp_path, bundle):
    from moekit.arch import visual_site

    model = load_model(bundle, where="t")
    hooks = visual_site(model)[1].__dict__.setdefault("_moekit_visual_fns", [])
    (tmp_path / "moekit.json").write_text(json.dumps({"format": "full", "position_encoders": [LEARNED]}))
    with pytest.raises(FileNotFoundError, match=r"temporal_frame.*position_encoders.safetensors is missing"):
        load_encoders(tmp_path, model)
    assert hooks == []  # a failed load leaves the model unhooked
    save_file({"temporal_frame.tabel.weight": torch.zeros(8, 4)}, str(tmp_path / "position_encoders.safetensors"))
    with pytest.raises(KeyError, match=r"missing \['table.weight'\], unexpected \['tabel.weight'\]"):
        load_encoders(tmp_path, model)
    assert hooks == []


def test_geometry_without_a_video_is_an_error(bundle):
    model = load_model(bundle, where="t")
    encoders = load_encoders(bundle, model, refs=[POLYV_3D])
    ids = torch.zeros(2, 5, dtype=torch.long)
    geometry = [None, {"depth": torch.ones(2, 28, 28)}]
    with (
        pytest.raises(ValueError, match=r"samples \[1\] carry 3D geometry but no video tokens"),
        feeding(encoders, model, ids, geometry),
    ):
        pass
