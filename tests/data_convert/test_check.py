"""`moekit data check`: missing media, bad samples, modality counts and the per-sample token budget of a model.

The token counts come from sizes and headers only; they are held to what `Preprocessor.encode` produces on the
decoded media, for every kind of medium (image, frame folder, mp4, 3D scene).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.data import check as check_mod
from moekit.data.check import TokenCounter, check_file
from moekit.data.config import FramesSpec
from moekit.data.media import load_media
from moekit.data.schema import Record, parse_sample, read_records
from moekit.demo.synth.mp4 import write_mp4


def picture(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(path)


def encoded_length(preprocessor, sample, root: Path, spec: FramesSpec) -> int:
    """What training feeds the model for this sample (no truncation)."""
    return len(preprocessor.encode(sample, load_media(sample, root, spec), max_length=10**6)["input_ids"])


def sample_of(data: dict):
    return parse_sample(Record(data, Path("x.jsonl"), 1, 0))


def test_token_counts_from_headers_equal_what_encoding_produces(preprocessor, synth_dir, tmp_path):
    spec = FramesSpec(max_frames=5, max_width=56, max_height=48)  # small: frames are scaled down before patching
    counter = TokenCounter(preprocessor, spec)
    samples = []
    for name in ("stage1_2_image", "stage1_2_video", "stage1_2_3d"):
        samples += [parse_sample(r) for r in read_records(synth_dir / f"{name}.jsonl", max_samples=2)]
    cases = [(s, synth_dir) for s in samples]
    # 7 frames (an odd count pads a patch), wider than 640: scaled down as frames are before patching
    frames = [np.full((96, 704, 3), 40 * k, np.uint8) for k in range(7)]
    write_mp4(tmp_path / "clip.mp4", frames)
    picture(tmp_path / "wide.png", (300, 90))  # resized down by the model's pixel budget
    video = {
        "id": "v",
        "video": "clip.mp4",
        "conversations": [{"from": "human", "value": "<video>\nwhat"}, {"from": "gpt", "value": "red"}],
    }
    image = {
        "id": "i",
        "image": "wide.png",
        "conversations": [{"from": "human", "value": "colour?"}, {"from": "gpt", "value": "red"}],
    }
    cases += [(sample_of(video), tmp_path), (sample_of(image), tmp_path)]
    assert {s.modality for s, _ in cases} == {"image", "video", "3d"}
    for sample, root in cases:
        ids, _ = counter.ids_and_labels(sample, root)
        assert len(ids) == encoded_length(preprocessor, sample, root, spec), sample.id


def _dataset(root: Path) -> Path:
    """A file with: a small image (fits), a large image (its media do not fit), a video that is not there,
    a bad sample, a text-only sample, and a paired sample whose teacher video is missing."""
    picture(root / "media/small.png", (56, 56))
    picture(root / "media/large.png", (112, 112))
    turn = [{"from": "human", "value": "<image>\nwhat colour"}, {"from": "gpt", "value": "red"}]
    rows = [
        {"id": "small", "image": "media/small.png", "conversations": turn},
        {"id": "large", "image": "media/large.png", "conversations": turn},
        {"id": "gone", "video": "media/gone.mp4", "conversations": [{"from": "human", "value": "<video>\nwhat"}, {"from": "gpt", "value": "red"}]},
        {"id": "bad", "conversations": [{"from": "gpt", "value": "red"}, {"from": "human", "value": "what"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "what colour"}, {"from": "gpt", "value": "red"}]},
        {"id": "pair", "image": "media/small.png", "paired": {"video": "media/clips/pair"}, "conversations": turn},
    ]  # fmt: skip
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_check_reports_missing_media_bad_samples_and_samples_over_the_budget(
    preprocessor, bundle, tmp_path, monkeypatch
):
    path = _dataset(tmp_path)
    small = encoded_length(
        preprocessor, sample_of(json.loads(path.read_text().splitlines()[0])), tmp_path, FramesSpec()
    )
    monkeypatch.setattr(check_mod, "load_image", lambda *a: pytest.fail("a Qwen-VL check decodes no image"))
    report = check_file(path, bundle, max_length=small + 2)
    assert report.samples == 6 and dict(report.modalities) == {"image": 3, "video": 1, "text": 1}
    assert [m.split(": ")[0] for m in report.missing] == [f"{path}:3 (id 'gone')", f"{path}:6 (id 'pair')"]
    assert "media/gone.mp4 not found" in report.missing[0] and "media/clips/pair not found" in report.missing[1]
    assert len(report.bad) == 1 and f"{path}:4 (id 'bad')" in report.bad[0]
    assert len(report.over_budget) == 1 and report.over_budget[0].startswith(f"{path}:2 (id 'large')")
    assert "media do not fit" in report.over_budget[0]
    assert sorted(report.tokens)[-1] == small + 12  # 16 merged patches of 112x112 instead of 4 of 56x56
    assert report.failed and report.truncated == []

    clean = check_file(path, bundle, max_length=small + 12)
    assert clean.over_budget == [] and clean.failed  # the missing video and the bad sample still fail


def test_a_long_text_is_reported_as_truncated_not_failed(bundle, tmp_path):
    picture(tmp_path / "a.png", (56, 56))
    row = {
        "id": "long",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nwhat"}, {"from": "gpt", "value": "red " * 40}],
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    report = check_file(tmp_path / "d.jsonl", bundle, max_length=30)
    assert report.over_budget == [] and len(report.truncated) == 1 and not report.failed


def test_the_cli_exits_1_and_lists_what_would_fail(preprocessor, bundle, tmp_path):
    path = _dataset(tmp_path)
    small = encoded_length(
        preprocessor, sample_of(json.loads(path.read_text().splitlines()[0])), tmp_path, FramesSpec()
    )
    runner = CliRunner()
    result = runner.invoke(app, ["data", "check", str(path), "--model", str(bundle), "--max-length", str(small + 2)])
    assert result.exit_code == 1, result.output
    assert "media/gone.mp4 not found" in result.output and "(id 'large')" in result.output
    assert "would fail" in result.output and "image: 3, text: 1, video: 1" in result.output

    ok = tmp_path / "ok.jsonl"
    ok.write_text(path.read_text().splitlines()[0] + "\n")
    result = runner.invoke(app, ["data", "check", str(ok), "--media-root", str(tmp_path)])
    assert result.exit_code == 0 and result.output.strip().endswith("OK"), result.output
