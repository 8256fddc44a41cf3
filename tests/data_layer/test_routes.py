import json

import torch
from typer.testing import CliRunner

import moekit
from moekit.cli.app import app
from moekit.demo.bundle import copy_processing_files


def _upcycled(bundle, out):
    from transformers import AutoModelForImageTextToText

    dense = AutoModelForImageTextToText.from_pretrained(str(bundle)).eval()
    spec = moekit.UpcycleSpec(
        layers="interval:2", num_experts=3, top_k=2, experts=[{"name": n} for n in ("image", "video", "3d")]
    )
    moekit.upcycle(dense, spec).save_pretrained(out)
    copy_processing_files(bundle, out)
    return out


def test_routes_per_dataset_and_modality(bundle, synth_dir, tmp_path):
    ckpt = _upcycled(bundle, tmp_path / "moe")
    out = tmp_path / "routes"
    args = [
        "routes",
        str(ckpt),
        "--data",
        str(synth_dir / "stage1_2_image.jsonl"),
        "--data",
        str(synth_dir / "stage1_2_video.jsonl"),
        "--data",
        str(synth_dir / "stage1_2_3d.jsonl"),
        "-o",
        str(out),
        "--max-samples",
        "2",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "routes.json").read_text())
    assert report["experts"] == ["image", "video", "3d"]
    assert set(report["datasets"]) == {"stage1_2_image", "stage1_2_video", "stage1_2_3d"}
    assert set(report["modalities"]) == {"image", "video", "3d"}
    assert report["datasets"]["stage1_2_image"]["samples"] == 2
    for group in ("datasets", "modalities"):
        for entry in report[group].values():
            assert abs(sum(entry["expert_share"]) - 1) < 1e-9
            for layer in entry["stats"]["layers"].values():  # top-2: two selections per routed token
                assert all(sum(k["topk_counts"]) == 2 * k["tokens"] for k in layer.values())
    tokens = report["modalities"]["3d"]["stats"]["layers"]["0"]
    assert "3d" in tokens and "video" not in tokens  # scene tokens are counted as 3d, not video
    image = report["datasets"]["stage1_2_image"]["stats"]["layers"]["0"]
    assert set(image) == {"text", "image"}
    for name in ("routes_by_dataset.png", "routes_by_modality.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "--overwrite" in again.output


def test_routes_refuses_a_dense_model(bundle, synth_dir, tmp_path):
    result = CliRunner().invoke(
        app, ["routes", str(bundle), "--data", str(synth_dir / "eval.jsonl"), "-o", str(tmp_path / "r")]
    )
    assert result.exit_code == 1 and "dense checkpoint" in result.output
    torch.set_grad_enabled(True)
