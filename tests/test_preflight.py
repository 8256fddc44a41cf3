"""`moekit validate RECIPE --data`: each stage's datasets checked before training for what would stop it mid-run
(bad schema, missing media, samples over the stage's token budget), with the checks of `moekit data check`."""

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.data.check import TokenCounter, check_file
from moekit.data.config import FramesSpec
from moekit.data.media import load_media
from moekit.data.preprocess import Preprocessor
from moekit.data.schema import Record, parse_sample
from moekit.pipeline.data_preflight import encoding_dir
from moekit.recipe import load_plan

TURN = [{"from": "human", "value": "<image>\nwhat colour"}, {"from": "gpt", "value": "red"}]


def picture(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), 90, np.uint8)).save(path)
    return path.name


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(tmp: Path, base: Path, datasets: list[dict], *, stages: int = 1, **data) -> Path:
    """A recipe of `stages` stages on `datasets`, each starting from the one before."""
    rows = []
    for i in range(stages):
        start = "base" if i == 0 else {"stage": f"s{i - 1}"}
        body = {"datasets": datasets, **data}
        rows.append({"name": f"s{i}", "from": start, "trainable": ["projector"], "data": body})
        rows[-1].update(optimizer={"lr": 1e-3}, steps=1)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "output_dir": str(tmp / "runs"), "stages": rows}))
    return path


def validate(*args: str):
    return CliRunner().invoke(app, ["validate", *map(str, args)])


def test_validate_data_fails_on_what_would_stop_the_run(bundle, tmp_path):
    small = picture(tmp_path / "small.png", 56)
    picture(tmp_path / "large.png", 112)
    good = jsonl(tmp_path / "good.jsonl", [{"id": f"g{i}", "image": small, "conversations": TURN} for i in range(3)])
    rows = [
        {"id": "ok", "image": small, "conversations": TURN},
        {"id": "large", "image": "large.png", "conversations": TURN},
        {"id": "gone", "video": "clips/gone", "conversations": [{"from": "human", "value": "<video>\nwhat"}, {"from": "gpt", "value": "red"}]},
        {"id": "bad", "conversations": [{"from": "gpt", "value": "red"}, {"from": "human", "value": "what"}]},
    ]  # fmt: skip
    bad = jsonl(tmp_path / "bad.jsonl", rows)
    small_len = check_file(good, bundle).tokens[0]
    datasets = [{"name": "good", "path": str(good)}, {"name": "bad", "path": str(bad)}]
    path = recipe(tmp_path, bundle, datasets, max_length=small_len + 2)
    assert validate(path).exit_code == 0  # the recipe itself is fine

    result = validate(path, "--data")
    assert result.exit_code == 1, result.output
    out = result.output
    assert f"stages[0].data.datasets[1].path: {bad}: 1 bad sample(s), 1 missing media, 1 over max_length=" in out
    assert f"{bad}:2 (id 'large'): needs" in out and "media do not fit" in out
    assert "clips/gone not found" in out and f"{bad}:4 (id 'bad')" in out
    assert "datasets[0].path:" not in out  # the good dataset is checked and passes
    assert f"{good}: 3 sample(s)" in out

    fits = recipe(tmp_path, bundle, datasets[:1], max_length=small_len + 2)
    result = validate(fits, "--data")
    assert result.exit_code == 0 and "OK" in result.output, result.output


def test_samples_checks_a_random_subset_and_all_checks_every_sample(bundle, tmp_path):
    small = picture(tmp_path / "a.png", 56)
    rows = [{"id": f"s{i}", "image": small, "conversations": TURN} for i in range(10)]
    rows.insert(7, {"id": "gone", "image": "missing.png", "conversations": TURN})
    path = recipe(tmp_path, bundle, [{"name": "d", "path": str(jsonl(tmp_path / "d.jsonl", rows))}])
    result = validate(path, "--data", "--samples", "3")
    assert "media and tokens on 3 of 11 (random sample)" in result.output, result.output
    result = validate(path, "--data", "--all")
    assert result.exit_code == 1 and "(id 'gone')" in result.output and "random sample" not in result.output
    result = validate(path, "--data")  # 64 by default: more than the file holds, so every sample
    assert result.exit_code == 1 and "(id 'gone')" in result.output

    for bad_args, message in ((["--all"], "go with --data"), (["--data", "--all", "--samples", "2"], "not both")):
        result = validate(path, *bad_args)
        assert result.exit_code == 1 and message in result.output, result.output


def test_a_missing_data_file_and_skipped_bad_samples(bundle, tmp_path):
    picture(tmp_path / "a.png", 56)
    rows = [{"id": "ok", "image": "a.png", "conversations": TURN}, {"id": "x", "image": "b.png", "conversations": TURN}]
    data = jsonl(tmp_path / "d.jsonl", rows)
    missing = tmp_path / "data" / "polyv" / "llava3d" / "data.jsonl"
    path = recipe(tmp_path, bundle, [{"name": "gone", "path": str(missing)}])
    result = validate(path, "--data")
    assert result.exit_code == 1
    assert f"stages[0].data.datasets[0].path: {missing}: no such data file (convert the dataset first" in result.output

    no_model = tmp_path / "no-model"
    result = validate(recipe(tmp_path, no_model, [{"name": "d", "path": str(data)}]), "--data")
    assert result.exit_code == 1 and f"{no_model}: cannot count tokens" in result.output
    assert "token budgets not checked for" in result.output and "b.png not found" in result.output  # media still

    path = recipe(tmp_path, bundle, [{"name": "d", "path": str(data)}], bad_samples="skip")
    result = validate(path, "--data")
    assert result.exit_code == 0 and "the samples above would be skipped" in result.output, result.output
    assert "b.png not found" in result.output
    none_usable = jsonl(tmp_path / "none.jsonl", rows[1:])  # skip drops every sample: the run has none to train on
    result = validate(recipe(tmp_path, bundle, [{"name": "d", "path": str(none_usable)}], bad_samples="skip"), "--data")
    assert result.exit_code == 1 and "1 missing media" in result.output, result.output


def test_a_later_stage_counts_with_the_folder_it_will_inherit_its_tokenizer_from(bundle, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", [{"id": "t", "conversations": [{"from": "human", "value": "hi"}, TURN[1]]}])
    plan = load_plan(recipe(tmp_path, bundle, [{"name": "d", "path": str(data)}], stages=3))
    assert [encoding_dir(plan, s) for s in plan.stages] == [bundle] * 3  # no stage has run yet
    output = tmp_path / "runs" / "s1" / "model"
    output.mkdir(parents=True)
    (output / "config.json").write_text((bundle / "config.json").read_text())
    assert [encoding_dir(plan, s) for s in plan.stages] == [bundle, bundle, output]


def test_synergy_tokens_of_paired_samples_are_counted_as_training_encodes_them(bundle, tmp_path):
    small = picture(tmp_path / "a.png", 56)
    for i in range(2):
        picture(tmp_path / "clip" / f"{i}.png", 56)
    row = {"id": "p", "image": small, "paired": {"video": "clip"}, "conversations": TURN}
    sample = parse_sample(Record(row, tmp_path / "d.jsonl", 1, 0))
    tokens = ["<synergy_0>", "<synergy_1>", "<synergy_2>"]
    pre = Preprocessor.from_dir(bundle, synergy_tokens=tokens)
    pre.tokenizer.add_tokens(tokens, special_tokens=True)  # what the synergy head's prepare() does
    spec = FramesSpec()
    encoded = pre.encode(sample, load_media(sample, tmp_path, spec), max_length=10**6, synergy_tokens=3)
    counted, _ = TokenCounter(pre, spec, synergy_tokens=3).ids_and_labels(sample, tmp_path)
    plain, _ = TokenCounter(pre, spec).ids_and_labels(sample, tmp_path)
    assert len(counted) == len(encoded["input_ids"]) == len(plain) + 3


def test_a_file_several_stages_read_alike_is_read_once(bundle, tmp_path, monkeypatch):
    from moekit.pipeline import data_preflight

    picture(tmp_path / "a.png", 56)
    data = jsonl(tmp_path / "d.jsonl", [{"id": "ok", "image": "a.png", "conversations": TURN}])
    plan = load_plan(recipe(tmp_path, bundle, [{"name": "d", "path": str(data)}], stages=3))
    reads = []
    real = data_preflight.read_records
    monkeypatch.setattr(data_preflight, "read_records", lambda *a: reads.append(a) or real(*a))
    checked = data_preflight.check_plan_data(plan)
    assert len(checked.checks) == 3 and len(reads) == 1 and not checked.problems
    assert [c.where.split(": ")[1] for c in checked.checks] == [f"stages[{i}].data.datasets[0]" for i in range(3)]


def test_the_stage_settings_apply_max_samples_media_root_and_a_missing_file_under_skip(bundle, tmp_path):
    picture(tmp_path / "media" / "a.png", 56)
    rows = [{"id": f"s{i}", "image": "a.png", "conversations": TURN} for i in range(3)]
    rows.append({"id": "late", "image": "gone.png", "conversations": TURN})
    data = jsonl(tmp_path / "d.jsonl", rows)
    spec = {"name": "d", "path": str(data), "media_root": str(tmp_path / "media")}
    assert validate(recipe(tmp_path, bundle, [spec]), "--data", "--all").exit_code == 1  # 'late' is read
    result = validate(recipe(tmp_path, bundle, [spec | {"max_samples": 3}]), "--data", "--all")
    assert result.exit_code == 0 and f"{data}: 3 sample(s)" in result.output, result.output  # as training reads it
    result = validate(
        recipe(tmp_path, bundle, [{"name": "x", "path": str(tmp_path / "x.jsonl")}], bad_samples="skip"), "--data"
    )
    assert result.exit_code == 1 and "no such data file" in result.output
