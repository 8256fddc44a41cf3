"""3D question answering on ScanNet scenes: ScanQA (ATR-DBI/ScanQA) and SQA3D (SilongYong/SQA3D), from their
released annotation JSON; scenes as the `posed_images/<scene_id>/` folders the video 3D VLMs use (or moekit's
ScanNet export layout, see moekit.data.scene), fed as video with their geometry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.data.config import FramesSpec
from moekit.data.media import Media
from moekit.data.scene import read_scene
from moekit.evaluate.benchmarks.base import Benchmark, Question, Scored, accuracy_by, mean
from moekit.evaluate.benchmarks.image import pick_file
from moekit.evaluate.benchmarks.metrics import caption_metrics, clean_answer, exact_and_refined, require_java
from moekit.evaluate.benchmarks.tables import read_table


def scene_folder(root: Path, scene_id: str, where: str) -> Path:
    for folder in (root / scene_id, root / "posed_images" / scene_id, root / "scannet" / "posed_images" / scene_id):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"{where}: scene {scene_id} not found under {root} (looked for {scene_id}/, posed_images/{scene_id}/ and "
        f"scannet/posed_images/{scene_id}/); pass the folder that holds the scenes with --media"
    )


def _scene(folder: Path, frames: FramesSpec) -> Any:
    def media() -> Media:
        scene = read_scene(folder, frames)
        return Media([], scene.frames, scene, None)

    return media


# --- ScanQA ------------------------------------------------------------------------------------------------


def scanqa_class(question: str) -> str:
    """ScanQA's own question classes (scripts/score.py), first match in this order."""
    if "Where" in question:
        return "Place"
    if "How many" in question:
        return "Number"
    if "What color" in question or "What is the color" in question:
        return "Color"
    if any(k in question for k in ("What shape", "What type", "What kind")):
        return "Object nature"
    if "What is" in question:
        return "Object"
    return "Other"


def load_scanqa(data: Path, media_root: Path | None, frames: FramesSpec) -> list[Question]:
    require_java()  # the caption metrics need it: refuse before anything runs
    (file,) = pick_file(data, ("ScanQA_v1.0_val.json",), "ScanQA")
    rows = read_table(file, ("question_id", "scene_id", "question", "answers"))
    root = media_root or file.parent
    out = []
    for row in rows:
        where = f"{file} (question_id {row['question_id']})"
        if not row["answers"]:
            raise ValueError(f"{where}: no answers (the test splits hide them; score val)")
        folder = scene_folder(root, row["scene_id"], where)
        out.append(
            Question(
                id=str(row["question_id"]),
                prompt=f"{row['question']} Answer the question simply.",
                answer=[str(a).strip() for a in row["answers"]],
                category=scanqa_class(row["question"]),
                media=_scene(folder, frames),
                fields={"scene_id": row["scene_id"]},
            )
        )
    return out


def score_qa(question: Question, prediction: str) -> Scored:
    """EM (the per-question score) after the shared clean-up; refined EM is kept in `parsed`."""
    answers = question.answer if isinstance(question.answer, list) else [question.answer]
    cleaned = clean_answer(prediction)
    em, refined = exact_and_refined(cleaned, [clean_answer(a) for a in answers])
    return Scored({"answer": cleaned, "refined": refined}, em)


def _em(records: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """EM and refined EM, overall and per `key`."""
    refined = [{**r, "score": r["parsed"]["refined"]} for r in records]
    return {
        "overall": mean(r["score"] for r in records),
        "count": len(records),
        "refined": mean(r["score"] for r in refined),
        f"per_{key}": accuracy_by(records, key),
        f"refined_per_{key}": accuracy_by(refined, key),
    }


def aggregate_scanqa(records: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"metric": "EM@1 and refined EM (cleaned answers); BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap)"}
    out.update(_em(records, "category"))
    references = {r["id"]: r["answer"] for r in records}
    predictions = {r["id"]: r["prediction"] for r in records}
    out["captions"] = caption_metrics(references, predictions) if records else {}
    return out


SCANQA = Benchmark(
    name="scanqa",
    title="ScanQA",
    metric="EM@1 / refined EM, BLEU-1..4, METEOR, ROUGE-L, CIDEr",
    load=load_scanqa,
    score=score_qa,
    aggregate=aggregate_scanqa,
    max_new_tokens=32,
    files="ScanQA_v1.0_val.json, and the scenes as posed_images/<scene_id>/ (--media)",
)


# --- SQA3D -------------------------------------------------------------------------------------------------

SQA_TYPES = ("what", "is", "how", "can", "which")


def sqa_type(question: str) -> str:
    """The question type the 3D VLMs report (LEO's rule): the first of what / is / how / can / which that the
    question starts with (case-insensitive), else "others"."""
    lowered = question.lstrip().lower()
    return next((t for t in SQA_TYPES if lowered.startswith(t)), "others")


def _sqa_files(data: Path) -> tuple[Path, Path]:
    if data.is_file():
        if "_questions_" not in data.name:
            raise ValueError(f"{data}: give the v1_balanced_questions_<split>_scannetv2.json file or its folder")
        return data, data.with_name(data.name.replace("_questions_", "_sqa_annotations_"))
    for folder in (data, data / "balanced", data / "sqa_task" / "balanced"):
        questions = folder / "v1_balanced_questions_test_scannetv2.json"
        if questions.is_file():
            return questions, folder / "v1_balanced_sqa_annotations_test_scannetv2.json"
    raise FileNotFoundError(f"{data}: no balanced/v1_balanced_questions_test_scannetv2.json (SQA3D's sqa_task/)")


def _records(path: Path, key: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SQA3D file")
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(body, dict) or key not in body:
        raise ValueError(f"{path}: expected an object with a {key!r} list (SQA3D's released layout)")
    rows = body[key]
    for number, row in enumerate(rows):
        missing = [c for c in required if c not in row]
        if missing:
            raise ValueError(f"{path}: {key}[{number}] (question_id {row.get('question_id')!r}) lacks {missing}")
    return rows


def load_sqa3d(data: Path, media_root: Path | None, frames: FramesSpec) -> list[Question]:
    questions_file, annotations_file = _sqa_files(data)
    questions = _records(questions_file, "questions", ("scene_id", "situation", "question", "question_id"))
    annotations = _records(annotations_file, "annotations", ("question_id", "answers"))
    answers = {a["question_id"]: a["answers"] for a in annotations}
    root = media_root or questions_file.parent
    out = []
    for row in questions:
        where = f"{questions_file} (question_id {row['question_id']})"
        if not answers.get(row["question_id"]):
            raise ValueError(f"{where}: no answer in {annotations_file}")
        folder = scene_folder(root, row["scene_id"], where)
        out.append(
            Question(
                id=str(row["question_id"]),
                prompt=f"{row['situation']} {row['question']} Answer the question using a single word or phrase.",
                answer=str(answers[row["question_id"]][0]["answer"]),
                category=sqa_type(row["question"]),
                media=_scene(folder, frames),
                fields={"scene_id": row["scene_id"]},
            )
        )
    return out


def aggregate_sqa3d(records: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"metric": "EM@1 and refined EM (cleaned answers), per question type"}
    out.update(_em(records, "category"))
    return out


SQA3D = Benchmark(
    name="sqa3d",
    title="SQA3D",
    metric="EM@1 / refined EM per question type (what, is, how, can, which, others)",
    load=load_sqa3d,
    score=score_qa,
    aggregate=aggregate_sqa3d,
    max_new_tokens=16,
    files="balanced/v1_balanced_{questions,sqa_annotations}_test_scannetv2.json, scenes (--media)",
)
