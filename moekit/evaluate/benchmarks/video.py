"""Video benchmarks: VSI-Bench (nyu-visionx/VSI-Bench) and Video-MME (lmms-lab/Video-MME), from their released
annotation files and videos, extracted or still inside the released zip archives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.data.config import FramesSpec
from moekit.data.media import Media
from moekit.evaluate.benchmarks.base import Benchmark, Question, Scored, accuracy_by, grouped, mean
from moekit.evaluate.benchmarks.extract import first_word, to_float, videomme_letter, with_fallback
from moekit.evaluate.benchmarks.image import LETTER_PROMPT, pick_file
from moekit.evaluate.benchmarks.metrics import mean_relative_accuracy
from moekit.evaluate.benchmarks.tables import ZipIndex, read_table


def _clip(load) -> Any:
    def media() -> Media:
        return Media([], load(), None, None)

    return media


def _option_texts(options: list[str]) -> list[str]:
    """ "A. left" -> "left" (both benchmarks store options with their letter)."""
    return [o.split(". ", 1)[1] if len(o) > 2 and o[1:3] == ". " else o for o in options]


# --- VSI-Bench ---------------------------------------------------------------------------------------------

VSI_MC = (
    "object_rel_direction_easy",
    "object_rel_direction_medium",
    "object_rel_direction_hard",
    "object_rel_distance",
    "route_planning",
    "obj_appearance_order",
)
VSI_NUMERIC = ("object_abs_distance", "object_counting", "object_size_estimation", "room_size_estimation")
VSI_ARCHIVES = ("arkitscenes.zip", "scannet.zip", "scannetpp.zip")
VSI_PRE = "These are frames of a video."  # the authors' code falls back to it when the yaml's pre_prompt is ""
VSI_NUMERIC_POST = "Please answer the question using a single word or phrase."


def load_vsibench(data: Path, media_root: Path | None, frames: FramesSpec) -> list[Question]:
    # "full": test.jsonl (current release) or the original single parquet; never a glob of test*.parquet,
    # which would also take test_debiased / test_pruned. A file path picks a subset (test_debiased.parquet).
    (file,) = pick_file(data, ("test.jsonl", "test-00000-of-00001.parquet"), "VSI-Bench")[:1]
    rows = read_table(file, ("id", "dataset", "scene_name", "question_type", "question", "ground_truth"))
    root = media_root or file.parent
    archives = ZipIndex(root, VSI_ARCHIVES)
    out = []
    for row in rows:
        where = f"{file} (id {row['id']})"
        kind = row["question_type"]
        options = list(row.get("options") or [])
        if kind in VSI_MC:
            if not options:
                raise ValueError(f"{where}: a {kind} question needs 'options'")
            prompt = "\n".join([VSI_PRE, row["question"], "Options:\n" + "\n".join(options), LETTER_PROMPT])
        elif kind in VSI_NUMERIC:
            if to_float(str(row["ground_truth"])) is None:
                raise ValueError(f"{where}: ground_truth {row['ground_truth']!r} of a {kind} question is not a number")
            prompt = f"{VSI_PRE}\n{row['question']}\n{VSI_NUMERIC_POST}"
        else:
            raise ValueError(f"{where}: unknown question_type {kind!r}; VSI-Bench has {[*VSI_MC, *VSI_NUMERIC]}")
        member = f"{row['dataset']}/{row['scene_name']}.mp4"
        video = archives.video(root, member, where, frames, VSI_ARCHIVES)
        out.append(
            Question(
                id=str(row["id"]),
                prompt=prompt,
                answer=str(row["ground_truth"]),
                category=kind,
                media=_clip(video),
                options=_option_texts(options),
                fields={"dataset": row["dataset"], "scene_name": row["scene_name"]},
            )
        )
    return out


def score_vsibench(question: Question, prediction: str) -> Scored:
    word = first_word(prediction)
    if question.category in VSI_NUMERIC:
        value = to_float(word)
        return Scored(value, mean_relative_accuracy(value, float(question.answer)))
    letter = with_fallback(word.upper() if len(word) == 1 else word, prediction, question.options)
    return Scored(letter, float(letter.lower() == question.answer.lower()))


def aggregate_vsibench(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per question type (MRA for numerical, accuracy for multiple choice), the three relative-direction types
    merged into their mean, overall = the mean of the task scores (not of the questions)."""
    per_type = accuracy_by(records, "category")
    tasks = {k: v["score"] for k, v in per_type.items()}
    directions = [tasks.pop(k) for k in VSI_MC[:3] if k in tasks]
    if directions:
        tasks["object_rel_direction"] = mean(directions)
    return {
        "metric": "mean of task scores (MRA for numerical, accuracy for multiple choice)",
        "overall": mean(tasks.values()),
        "count": len(records),
        "per_task": tasks,
        "per_category": per_type,
    }


VSIBENCH = Benchmark(
    name="vsibench",
    title="VSI-Bench",
    metric="mean relative accuracy (numerical) and accuracy (multiple choice), averaged over tasks",
    load=load_vsibench,
    score=score_vsibench,
    aggregate=aggregate_vsibench,
    max_new_tokens=16,
    files="test.jsonl or test-00000-of-00001.parquet, and arkitscenes/ scannet/ scannetpp/ (or their .zip)",
)


# --- Video-MME ---------------------------------------------------------------------------------------------

VIDEOMME_PROMPT = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter (A, B, C, or D) of the correct option."
)
VIDEOMME_ARCHIVES = ("videos_chunked_*.zip",)


def load_videomme(data: Path, media_root: Path | None, frames: FramesSpec) -> list[Question]:
    (file,) = pick_file(data, ("videomme/test-00000-of-00001.parquet",), "Video-MME")
    columns = ("video_id", "duration", "domain", "sub_category", "videoID", "question_id", "task_type")
    rows = read_table(file, (*columns, "question", "options", "answer"))
    root = media_root or (file.parent.parent if file.parent.name == "videomme" else file.parent)
    archives = ZipIndex(root, VIDEOMME_ARCHIVES)
    out = []
    for row in rows:
        where = f"{file} (question_id {row['question_id']})"
        member = next(
            (
                f"data/{row['videoID']}{s}"
                for s in (".mp4", ".MP4", ".mkv")
                if (root / "data" / f"{row['videoID']}{s}").exists() or f"data/{row['videoID']}{s}" in archives.members
            ),
            f"data/{row['videoID']}.mp4",
        )
        video = archives.video(root, member, where, frames, VIDEOMME_ARCHIVES)
        options = list(row["options"])
        prompt = "\n".join([VIDEOMME_PROMPT, row["question"], *options, "The best answer is:"])
        out.append(
            Question(
                id=str(row["question_id"]),
                prompt=prompt,
                answer=str(row["answer"]).strip(),
                category=str(row["task_type"]),
                media=_clip(video),
                options=_option_texts(options),
                fields={k: row[k] for k in ("video_id", "videoID", "duration", "domain", "sub_category")},
            )
        )
    return out


def score_videomme(question: Question, prediction: str) -> Scored:
    letter = videomme_letter(prediction)
    if not letter:
        letter = with_fallback("", prediction, question.options)
    return Scored(letter, float(letter == question.answer))


def aggregate_videomme(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The official scorer's accuracy: over the questions whose answer could be parsed, pooled per duration,
    domain and task type; `accuracy_all` counts unparsed answers as wrong (lmms-eval's rule)."""
    answered = [r for r in records if r["parsed"]]
    out: dict[str, Any] = {
        "metric": "accuracy over answered questions (official); accuracy_all over all",
        "overall": mean(r["score"] for r in answered),
        "count": len(records),
        "answered": len(answered),
        "accuracy_all": mean(r["score"] for r in records),
    }
    for key in ("duration", "domain", "category"):
        out[f"per_{key}"] = accuracy_by(answered, key)
    out["unanswered_by_duration"] = {
        k: sum(not r["parsed"] for r in v) for k, v in grouped(records, "duration").items()
    }
    return out


VIDEOMME = Benchmark(
    name="videomme",
    title="Video-MME",
    metric="accuracy (official: over answered questions), per duration, domain and task type",
    load=load_videomme,
    score=score_videomme,
    aggregate=aggregate_videomme,
    max_new_tokens=16,
    files="videomme/test-00000-of-00001.parquet, and data/<videoID>.mp4 (or videos_chunked_NN.zip)",
)
