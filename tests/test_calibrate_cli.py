"""`moekit calibrate-router` on a converted checkpoint: prototype rows from data, in place, side files kept."""

import torch
from typer.testing import CliRunner

import moekit
from moekit.cli.app import app
from moekit.demo.bundle import write_tiny_vlm
from moekit.demo.synth.writer import SynthSpec, write_synth


def test_calibrate_router_sets_modality_rows_and_keeps_the_rest(tmp_path):
    write_tiny_vlm(tmp_path / "base")
    write_synth(
        tmp_path / "data", SynthSpec(images=4, videos=4, scenes=2, video_pairs=2, scene_pairs=2, eval_per_task=1)
    )
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "upcycle",
            "--base",
            str(tmp_path / "base"),
            "--expert",
            "image",
            "--expert",
            "video",
            "--expert",
            "base",
            "--layers",
            "interval:2",
            "--top-k",
            "1",
            "-o",
            str(tmp_path / "moe"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    before = moekit.load(tmp_path / "moe").model.language_model.layers[2].mlp.gate.weight.clone()
    data = [str(tmp_path / "data" / f"stage1_2_{m}.jsonl") for m in ("image", "video")]
    result = runner.invoke(
        app, ["calibrate-router", str(tmp_path / "moe"), "--data", data[0], "--data", data[1], "--scale", "5"]
    )
    assert result.exit_code == 0, result.output
    assert "layer 2: router rows set for image, video" in result.output
    model = moekit.load(tmp_path / "moe")
    after = model.model.language_model.layers[2].mlp.gate.weight
    assert torch.allclose(after[:2].norm(dim=1), torch.tensor([5.0, 5.0]), atol=1e-4)
    assert torch.equal(after[2], before[2])  # "base" has no modality: its row stays
    assert model.config.moekit["router_calibration"] == {"scale": 5.0, "experts": ["image", "video"]}
    assert (tmp_path / "moe" / "tokenizer.json").is_file() and (tmp_path / "moe" / "moekit.json").is_file()
    result = runner.invoke(app, ["calibrate-router", str(tmp_path / "moe"), "--data", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 1 and "no such file" in result.output
