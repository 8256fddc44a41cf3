"""The tiny PolyV pipeline end to end (a few steps per stage): prepare, six stages, report."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

import moekit
from moekit.cli.app import app

RECIPES = Path(__file__).parents[1] / "recipes"
SMALL = [
    "steps=2",
    "prepare[1].spec.images=8",
    "prepare[1].spec.videos=4",
    "prepare[1].spec.scenes=4",
    "prepare[1].spec.video_pairs=4",
    "prepare[1].spec.scene_pairs=4",
    "prepare[1].spec.eval_per_task=2",
]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Run `moekit run recipes/polyv-tiny/pipeline.yaml` with few steps in a fresh folder."""
    root = tmp_path_factory.mktemp("polyv-tiny")
    shutil.copytree(RECIPES, root / "recipes")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        runner = CliRunner()
        validated = runner.invoke(app, ["validate", "recipes/polyv-tiny/pipeline.yaml"])
        result = runner.invoke(
            app, ["run", "recipes/polyv-tiny/pipeline.yaml", *[a for s in SMALL for a in ("--set", s)]]
        )
    finally:
        os.chdir(cwd)
    return root, validated, result


def test_pipeline_validates_before_its_inputs_exist_and_runs(smoke_run):
    root, validated, result = smoke_run
    assert validated.exit_code == 0, validated.output
    assert result.exit_code == 0, result.output
    stages = ("pretrain", "stage1_1", "stage1_2_image", "stage1_2_video", "stage1_2_3d", "dense_control", "stage2_1")
    for stage in (*stages, "stage2_2"):
        assert f"wrote runs/polyv-tiny/{stage}/model" in result.output
        assert (root / "runs" / "polyv-tiny" / stage / "model" / "moekit.json").is_file()


def test_specialists_are_ffn_only_and_the_final_model_is_a_polyv_moe(smoke_run):
    root, _, _ = smoke_run
    runs = root / "runs" / "polyv-tiny"
    with safe_open(runs / "stage1_2_video" / "model" / "model.safetensors", "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(".mlp." in k and "visual" not in k for k in keys)
    final = moekit.load(runs / "stage2_2" / "model")
    meta = final.config.moekit
    assert meta["experts"] == ["image", "video", "3d", "base"] and meta["layers"] == [0, 2]
    assert meta["spec"]["top_k"] == 2
    from moekit.modeling.load import load_any

    dense_rows = load_any(runs / "stage1_1" / "model").get_input_embeddings().num_embeddings
    assert final.get_input_embeddings().num_embeddings == dense_rows + 4  # the four <synergy_i> rows of stage 2-1
    # PolyV's 3D position encoding: added in stage 1-1, carried through the upcycle to the final model
    for stage in ("stage1_1", "dense_control", "stage2_1", "stage2_2"):
        record = json.loads((runs / stage / "model" / "moekit.json").read_text())
        assert [e["name"] for e in record["position_encoders"]] == ["polyv_3d"], stage
    assert "position_encoders" not in json.loads((runs / "pretrain" / "model" / "moekit.json").read_text())


def test_report_has_curves_routing_parameters_and_accuracy(smoke_run):
    root, _, _ = smoke_run
    report = root / "runs" / "polyv-tiny" / "report"
    for png in ("loss_curves.png", "accuracy.png", "routes/routes_by_modality.png", "routes/routes_by_dataset.png"):
        assert (report / png).stat().st_size > 5_000, png
    data = json.loads((report / "report.json").read_text())
    assert list(data["accuracy"]) == ["base", "pretrain", "stage1_1", "dense_control", "stage2_2"]
    tasks = {"colour", "count", "background", "motion", "nearer", "scene_count"}
    assert set(data["accuracy"]["base"]["per_task"]) == tasks
    assert set(data["routes"]) == {"image", "video", "3d"}
    for row in data["routes"].values():
        assert len(row["expert_share"]) == 4 and abs(sum(row["expert_share"]) - 1) < 1e-6
    base, final = data["parameters"]["base"], data["parameters"]["stage2_2"]
    assert base["total"] == base["active"] and final["total"] > final["active"] > base["active"]
    synergy = data["stages"]["stage2_1"]["final"]
    assert {"loss/polyv_synergy/synergy_temporal", "loss/polyv_synergy/synergy_spatial", "loss/load_balancing"} <= set(
        synergy
    )
    assert all(row["seconds"] is not None for row in data["stages"].values())
    text = (report / "report.md").read_text()
    assert "## Held-out accuracy" in text and "## Routing of stage2_2 by modality" in text
    # the same questions asked by generation (`evaluate:`), beside the likelihood ranking, and the machine
    generated = data["benchmarks"]["choices-generate"]
    assert list(generated) == ["base", "pretrain", "stage1_1", "dense_control", "stage2_2"]
    assert all(row["count"] == data["accuracy"]["base"]["total"] for row in generated.values())
    assert (root / "runs" / "polyv-tiny" / "eval" / "choices-generate" / "stage2_2" / "predictions.jsonl").is_file()
    assert "## Benchmarks" in text and "| stage2_2 |" in text.split("## Benchmarks")[1]
    assert data["machine"]["cpu"] and "Measured on" in text


def test_every_tiny_yaml_runs_alone_from_its_header_command():
    for path in sorted((RECIPES / "polyv-tiny").glob("*.yaml")):
        header = path.read_text().splitlines()[0]
        assert header.startswith(f"# moekit run recipes/polyv-tiny/{path.name}"), header
        yaml.safe_load(path.read_text())
