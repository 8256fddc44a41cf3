"""`moekit eval`: each benchmark read from files in its released layout (tests/bench_fixtures.py), scored by its
official metric on hand-written predictions with hand-computed scores, and run end to end on a tiny VLM
(resume, output files, bad input)."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.data.config import FramesSpec
from moekit.evaluate.benchmarks import BENCHMARKS, get_benchmark
from moekit.evaluate.benchmarks.extract import cambrian_letter, first_word, mmstar_letter, videomme_letter
from moekit.evaluate.benchmarks.metrics import (
    caption_metrics,
    clean_answer,
    exact_and_refined,
    mean_relative_accuracy,
)
from moekit.evaluate.run import EvalSettings, run_eval

from . import bench_fixtures as fx

FRAMES = FramesSpec(max_frames=4)
JAVA = shutil.which("java") is not None


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    fx.mmstar(root / "MMStar")
    scanqa_file, scanqa_scenes = fx.scanqa(root / "ScanQA")
    sqa_root, sqa_scenes = fx.sqa3d(root / "SQA3D")
    return {
        "mmstar": (root / "MMStar", None),
        "cvbench": (fx.cvbench(root / "CV-Bench"), None),
        "vsibench": (fx.vsibench(root / "VSI-Bench"), None),
        "videomme": (fx.videomme(root / "Video-MME"), None),
        "scanqa": (scanqa_file, scanqa_scenes),
        "sqa3d": (sqa_root, sqa_scenes),
    }


def scored(name, folders, predictions):
    """Score hand-written predictions {question id: text}; returns (records, aggregate)."""
    benchmark = get_benchmark(name)
    data, media = folders[name]
    questions = benchmark.load(data, media, FRAMES)
    records = []
    for q in questions:
        s = benchmark.score(q, predictions[q.id])
        records.append(
            {
                "id": q.id,
                "prediction": predictions[q.id],
                "parsed": s.parsed,
                "answer": q.answer,
                "score": s.score,
                "category": q.category,
                "options": q.options,
                **q.fields,
            }
        )
    return records, benchmark.aggregate(records)


# --- answer extraction and metrics against the reference scorers' behaviour ---------------------------------


@pytest.mark.parametrize(
    "rule, text, letter",
    [
        (mmstar_letter, "B", "B"),
        (mmstar_letter, "(c) the cat", "C"),
        (mmstar_letter, "The answer is D", "D"),
        (mmstar_letter, "option a", "A"),
        (cambrian_letter, "The answer is (B).", "B"),
        (cambrian_letter, "c.", "C"),
        (cambrian_letter, "Answer: A", "A"),
        (videomme_letter, "C. Berries.", "C"),
        (videomme_letter, "Answer: C. Jade.", "C"),
        (videomme_letter, "The best answer is: B", "B"),
        (videomme_letter, "b", ""),
        (videomme_letter, "it is hard to say what happens in this long video, maybe something else", ""),
    ],
)
def test_letter_extraction_follows_each_benchmarks_reference_scorer(rule, text, letter):
    assert rule(text) == letter


def test_mean_relative_accuracy_matches_vsibench_on_its_float_boundaries():
    # the authors' code: thresholds np.linspace(.5, .95, 10), |p - t| / t <= 1 - C in float64
    cases = {(10, 10): 1.0, (11, 10): 0.9, (9, 10): 0.9, (12, 10): 0.6, (13, 10): 0.5, (15, 10): 0.1, (4, 10): 0.0}
    for (prediction, target), want in cases.items():
        assert mean_relative_accuracy(prediction, target) == pytest.approx(want), (prediction, target)
    assert mean_relative_accuracy(None, 10) == 0.0
    assert first_word("4.") == "4" and first_word("30.9 square meters") == "30.9"


def test_clean_answer_and_refined_exact_match_of_the_3d_qa_codebases():
    assert clean_answer("The brown chair.") == "brown chair"
    assert clean_answer("2") == "two" and clean_answer("None") == "zero" and clean_answer("tv stand") == "TV stand"
    assert clean_answer("mat2") == "mat" and clean_answer("Backwards") == "backward"
    assert exact_and_refined("brown", ["dark brown", "brown"]) == (1.0, 1.0)  # LLaVA-3D: any answer, not the first
    assert exact_and_refined("brown", ["dark brown"]) == (0.0, 1.0)
    assert exact_and_refined("blue", ["dark brown"]) == (0.0, 0.0)


@pytest.mark.skipif(not JAVA, reason="pycocoevalcap's METEOR and PTB tokenizer run Java")
def test_caption_metrics_come_from_pycocoevalcap():
    refs = {"a": ["dark brown", "brown"], "b": ["white cabinet"], "c": ["two"]}
    perfect = caption_metrics(refs, {"a": "brown", "b": "white cabinet", "c": "two"})
    worse = caption_metrics(refs, {"a": "brown", "b": "a table.", "c": "three"})
    assert perfect["BLEU-1"] == pytest.approx(100.0) and perfect["ROUGE-L"] == pytest.approx(100.0)
    for key in ("BLEU-1", "METEOR", "ROUGE-L", "CIDEr"):
        assert worse[key] < perfect[key], key
    assert set(perfect) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}


# --- each benchmark from its released files, scored by hand --------------------------------------------------


def test_mmstar_scores_letters_option_text_and_reports_micro_and_axis_means(folders):
    # answers: 0 A, 1 B, 2 C, 3 D (red, green, blue, white)
    records, scores = scored("mmstar", folders, {"0": "A", "1": "(B) green", "2": "blue", "3": "white"})
    # the authors' rule reads "blue" as its first letter, B; "white" gives no letter, so its option text counts
    assert [r["parsed"] for r in records] == ["A", "B", "B", "D"]
    assert scores["overall"] == 0.75
    assert scores["per_category"]["math"] == {"score": 0.5, "count": 2}
    assert scores["per_l2_category"]["geometry"]["score"] == 0.0
    assert scores["macro_l2_category"] == 0.75
    question = get_benchmark("mmstar").load(*folders["mmstar"], FRAMES)[0]
    assert question.options == ["red", "green", "blue", "white"]
    assert question.prompt.endswith("\nAnswer with the option's letter from the given choices directly.")
    assert question.media().images[0].getpixel((0, 0)) == fx.COLOURS["red"]


def test_cvbench_overall_is_the_cards_formula(folders):
    # 2D: ADE20K 1/2 right, COCO 2/2; 3D: Omni3D 0/2  ->  ((0.5 + 1) / 2 + 0) / 2
    predictions = {"0": "(C)", "1": "B", "2": "The answer is (B).", "3": "below", "4": "B", "5": "A"}
    _, scores = scored("cvbench", folders, predictions)
    assert scores["per_source"]["ADE20K"]["score"] == 0.5 and scores["per_source"]["COCO"]["score"] == 1.0
    assert scores["parts"] == {"2D": 0.75, "3D": 0.0}
    assert scores["overall"] == pytest.approx(0.375)
    assert scores["micro"] == pytest.approx(0.5)


def test_vsibench_mra_for_numbers_accuracy_for_choices_directions_merged(folders):
    # ids: 0 counting (4), 1 direction easy (A), 2 direction hard (C), 3 room size (30.9), 4 route (B)
    predictions = {"0": "5", "1": "A.", "2": "B", "3": "30.9 square meters", "4": "Turn Right, Turn Left"}
    records, scores = scored("vsibench", folders, predictions)
    assert records[0]["score"] == pytest.approx(0.6)  # |5 - 4| / 4 = 0.25 <= 1 - C for C <= 0.75
    tasks = scores["per_task"]
    assert tasks["object_rel_direction"] == 0.5  # (easy 1 + hard 0) / 2
    assert tasks["room_size_estimation"] == 1.0 and tasks["route_planning"] == 1.0  # option text named
    assert scores["overall"] == pytest.approx((0.6 + 0.5 + 1.0 + 1.0) / 4)  # mean of tasks, not questions


def test_vsibench_reads_videos_inside_the_released_zips_or_extracted(folders, tmp_path):
    zipped = get_benchmark("vsibench").load(folders["vsibench"][0], None, FRAMES)
    fx.vsibench(tmp_path, zipped=False)
    extracted = get_benchmark("vsibench").load(tmp_path, None, FRAMES)
    a, b = zipped[0].media().clip, extracted[0].media().clip
    assert len(a) == len(b) == 4 and list(a[0].getdata()) == list(b[0].getdata())


def test_videomme_counts_only_answered_questions_like_the_official_scorer(folders):
    # answers: 001-1 C, 001-2 D, 002-1 D, 002-2 A
    predictions = {
        "001-1": "C. Blue.",
        "001-2": "the video shows many different things happening at the same time",
        "002-1": "D",
        "002-2": "B",
    }
    _, scores = scored("videomme", folders, predictions)
    assert scores["answered"] == 3 and scores["overall"] == pytest.approx(2 / 3)
    assert scores["accuracy_all"] == pytest.approx(0.5)
    assert scores["per_duration"] == {"long": {"score": 0.5, "count": 2}, "short": {"score": 1.0, "count": 1}}


@pytest.mark.skipif(not JAVA, reason="ScanQA's caption metrics run Java")
def test_scanqa_exact_refined_and_caption_metrics(folders):
    predictions = {"val-scene0011-0": "Brown.", "val-scene0011-1": "2", "val-scene0015-0": "left of the bed"}
    records, scores = scored("scanqa", folders, predictions)
    assert [r["score"] for r in records] == [1.0, 1.0, 0.0]  # "2" -> "two" matches the answer "2" -> "two"
    assert scores["refined"] == 1.0 and scores["overall"] == pytest.approx(2 / 3)
    assert scores["per_category"]["Place"]["score"] == 0.0 and scores["refined_per_category"]["Place"]["score"] == 1.0
    assert scores["captions"]["CIDEr"] > 0 and 0 < scores["captions"]["METEOR"] < 100


def test_sqa3d_joins_annotations_by_question_id_and_types_questions(folders):
    predictions = {"220602000002": "the piano", "220602000003": "yes", "220602000004": "2", "220602000005": "left side"}
    records, scores = scored("sqa3d", folders, predictions)
    assert [r["answer"] for r in records] == ["piano", "no", "two", "left"]
    assert [r["category"] for r in records] == ["what", "is", "how", "which"]
    assert [r["score"] for r in records] == [1.0, 0.0, 1.0, 0.0]
    assert scores["refined"] == 0.75 and scores["per_category"]["is"]["score"] == 0.0


# --- end to end: moekit eval on a tiny VLM -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mmstar", "cvbench", "vsibench", "videomme", "sqa3d"])
def test_eval_writes_predictions_and_scores_that_agree(name, folders, bundle, tmp_path):
    data, media = folders[name]
    out = tmp_path / "out"
    settings = EvalSettings(max_new_tokens=6, max_frames=4)
    scores = run_eval(name, bundle, data, out, media=media, settings=settings, batch_size=3, progress=False)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    questions = get_benchmark(name).load(data, media, FRAMES)
    assert [r["id"] for r in records] == [q.id for q in questions]
    for record, question in zip(records, questions):
        assert set(record) >= {"id", "prompt", "prediction", "parsed", "answer", "score", "category"}
        assert record["score"] == get_benchmark(name).score(question, record["prediction"]).score
    saved = json.loads((out / "scores.json").read_text())
    assert saved["overall"] == scores["overall"] and saved["count"] == len(questions)
    assert saved["model_fingerprint"] and saved["data_fingerprint"] and saved["machine"]["cpu"]


def test_an_interrupted_eval_resumes_where_it_stopped(folders, bundle, tmp_path):
    data, _ = folders["cvbench"]
    settings = EvalSettings(max_new_tokens=6)
    full = run_eval("cvbench", bundle, data, tmp_path / "full", settings=settings, progress=False)
    out = tmp_path / "cut"
    run_eval("cvbench", bundle, data, out, settings=settings, progress=False)
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:2]) + lines[2][:15])  # killed mid-write
    (out / "scores.json").unlink()
    said = []
    again = run_eval("cvbench", bundle, data, out, settings=settings, progress=False, log=said.append)
    assert said and "2 of 6" in said[0]
    assert again["overall"] == full["overall"]
    assert (out / "predictions.jsonl").read_text() == (tmp_path / "full" / "predictions.jsonl").read_text()
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_eval("cvbench", bundle, data, out, settings=EvalSettings(max_new_tokens=7), progress=False)


def test_the_likelihood_ranking_is_a_benchmark_and_evaluate_its_alias(bundle, synth_dir, tmp_path):
    eval_file = synth_dir / "eval.jsonl"
    runner = CliRunner()
    done = runner.invoke(
        app, ["eval", "choices", str(bundle), "--data", str(eval_file), "-o", str(tmp_path / "a"), "-q"]
    )
    assert done.exit_code == 0, done.output
    ranked = json.loads((tmp_path / "a" / "scores.json").read_text())
    old = runner.invoke(app, ["evaluate", str(bundle), "--data", str(eval_file), "-o", str(tmp_path / "b.json")])
    assert old.exit_code == 0 and "deprecated" in old.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert ranked["overall"] == pytest.approx(report["accuracy"])
    assert ranked["chance"] == pytest.approx(report["chance"])
    generated = runner.invoke(
        app,
        [
            "eval",
            "choices-generate",
            str(bundle),
            "--data",
            str(eval_file),
            "-o",
            str(tmp_path / "c"),
            "-q",
            "--limit",
            "3",
        ],
    )
    assert generated.exit_code == 0, generated.output
    assert json.loads((tmp_path / "c" / "scores.json").read_text())["count"] == 3


def test_bad_benchmark_input_is_refused_before_anything_is_written(folders, bundle, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown benchmark 'mmstr'; choose one of mmstar"):
        run_eval("mmstr", bundle, folders["mmstar"][0], out)
    import pyarrow.parquet as pq

    broken = tmp_path / "MMStar"
    broken.mkdir()
    table = pq.read_table(folders["mmstar"][0] / "mmstar.parquet").drop_columns(["answer"])
    pq.write_table(table, broken / "mmstar.parquet")
    with pytest.raises(ValueError, match=r"mmstar.parquet: missing column\(s\) \['answer'\]"):
        run_eval("mmstar", bundle, broken, out)
    lost = tmp_path / "VSI"
    fx.vsibench(lost, zipped=False)
    shutil.rmtree(lost / "scannetpp")
    with pytest.raises(FileNotFoundError, match=r"id 3\): video scannetpp/45b0dac5e3.mp4"):
        run_eval("vsibench", bundle, lost, out)
    with pytest.raises(FileNotFoundError, match="scene scene0050_00 not found"):
        run_eval("sqa3d", bundle, folders["sqa3d"][0], out, media=tmp_path)
    assert not out.exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no run.json"):
        run_eval("mmstar", bundle, folders["mmstar"][0], other)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_every_benchmark_names_its_files_and_metric():
    for name, benchmark in BENCHMARKS.items():
        assert benchmark.name == name and benchmark.metric and benchmark.files
