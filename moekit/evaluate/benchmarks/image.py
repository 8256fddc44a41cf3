"""Image benchmarks: MMStar (Lin-Chen/MMStar) and CV-Bench (nyu-visionx/CV-Bench), from their parquet files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from moekit.data.config import FramesSpec
from moekit.data.media import Media
from moekit.evaluate.benchmarks.base import Benchmark, Question, Scored, mean, micro
from moekit.evaluate.benchmarks.extract import cambrian_letter, mmstar_letter, with_fallback
from moekit.evaluate.benchmarks.tables import cell_image, read_table

LETTER_PROMPT = "Answer with the option's letter from the given choices directly."


def pick_file(data: Path, names: tuple[str, ...], what: str) -> list[Path]:
    """`data` itself when it is a file, else the released files `names` found in the folder `data`."""
    if data.is_file():
        return [data]
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: no such file or folder ({what} expects {' or '.join(names)})")
    found = [data / n for n in names if (data / n).is_file()]
    if not found:
        raise FileNotFoundError(f"{data}: none of {list(names)} here; {what} is read from its released files")
    return found


def _image_media(cell: Any, where: str, root: Path) -> Any:
    def media() -> Media:
        return Media([cell_image(cell, where, root)], None, None, None)

    return media


# --- MMStar ------------------------------------------------------------------------------------------------

_OPTION = re.compile(r"(?:^|, )([A-F]): ")


def mmstar_options(question: str) -> list[str]:
    """The option texts inside an MMStar question ("...\\nOptions: A: x, B: y, C: z, D: w")."""
    if "Options:" not in question:
        return []
    tail = question.rsplit("Options:", 1)[1].strip()
    parts = _OPTION.split(tail)
    return [parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)]


def load_mmstar(data: Path, media_root: Path | None, frames: FramesSpec) -> list[Question]:
    (file,) = pick_file(data, ("mmstar.parquet",), "MMStar")
    rows = read_table(file, ("index", "question", "image", "answer", "category", "l2_category"))
    out = []
    for row in rows:
        where = f"{file} (index {row['index']})"
        question = str(row["question"]).strip()
        out.append(
            Question(
                id=str(row["index"]),
                prompt=f"{question}\n{LETTER_PROMPT}",
                answer=str(row["answer"]).strip().upper(),
                category=str(row["category"]),
                media=_image_media(row["image"], where, media_root or file.parent),
                options=mmstar_options(question),
                fields={"l2_category": row["l2_category"]},
            )
        )
    return out


def score_letter(parse, question: Question, prediction: str) -> Scored:
    letter = with_fallback(parse(prediction), prediction, question.options)
    return Scored(letter, float(letter == question.answer))


def aggregate_mmstar(records: list[dict[str, Any]]) -> dict[str, Any]:
    out = micro(records, "accuracy", "l2_category")
    # lmms-eval's `average`: the mean of the 18 axis means (the authors report the micro mean above)
    out["macro_l2_category"] = mean(v["score"] for v in out["per_l2_category"].values())
    return out


MMSTAR = Benchmark(
    name="mmstar",
    title="MMStar",
    metric="accuracy (multiple choice, letter extracted by the authors' rule)",
    load=load_mmstar,
    score=lambda q, p: score_letter(mmstar_letter, q, p),
    aggregate=aggregate_mmstar,
    max_new_tokens=32,
    files="mmstar.parquet (Lin-Chen/MMStar)",
)


# --- CV-Bench ----------------------------------------------------------------------------------------------


def load_cvbench(data: Path, media_root: Path | None, frames: FramesSpec) -> list[Question]:
    files = pick_file(data, ("test_2d.parquet", "test_3d.parquet", "test_2d.jsonl", "test_3d.jsonl"), "CV-Bench")
    stems = {f.stem for f in files if f.suffix == ".parquet"}
    files = [f for f in files if f.suffix == ".parquet" or f.stem not in stems]  # parquet over jsonl + img/
    out = []
    for file in files:
        image_key = "image" if file.suffix == ".parquet" else "filename"
        rows = read_table(file, ("idx", "type", "task", "prompt", "answer", "choices", "source", image_key))
        for row in rows:
            where = f"{file} (idx {row['idx']})"
            root = media_root or file.parent
            if image_key == "filename" and not (root / row["filename"]).is_file():
                raise FileNotFoundError(f"{where}: image {root / row['filename']} not found")
            out.append(
                Question(
                    id=str(row["idx"]),
                    prompt=f"{row['prompt']}\n{LETTER_PROMPT}",
                    answer=str(row["answer"]).strip().strip("()").upper(),
                    category=f"{row['type']} {row['task']}",
                    media=_image_media(row[image_key], where, root),
                    options=[str(c) for c in row["choices"]],
                    fields={"type": row["type"], "task": row["task"], "source": row["source"]},
                )
            )
    return out


def aggregate_cvbench(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The card's overall: 1/2 * ((ADE20K + COCO) / 2 + Omni3D), each a source's accuracy (parts present)."""
    out = micro(records, "accuracy", "source", "task", "type")
    sources = {k: v["score"] for k, v in out["per_source"].items()}
    parts = {}
    two_d = [sources[s] for s in ("ADE20K", "COCO") if s in sources]
    if two_d:
        parts["2D"] = mean(two_d)
    if "Omni3D" in sources:
        parts["3D"] = sources["Omni3D"]
    out["micro"] = out["overall"]  # what lmms-eval's cv_bench reports
    out["overall"] = mean(parts.values())
    out["parts"] = parts
    return out


CVBENCH = Benchmark(
    name="cvbench",
    title="CV-Bench",
    metric="accuracy; overall = (2D + 3D) / 2 with 2D = mean of ADE20K and COCO (the card's formula)",
    load=load_cvbench,
    score=lambda q, p: score_letter(cambrian_letter, q, p),
    aggregate=aggregate_cvbench,
    max_new_tokens=32,
    files="test_2d.parquet, test_3d.parquet (nyu-visionx/CV-Bench); or test_*.jsonl with img/",
)
