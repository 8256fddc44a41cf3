"""Metrics of the benchmarks: VSI-Bench's mean relative accuracy, the 3D-QA exact match and refined exact match
(after the answer clean-up the 3D VLM codebases share), and BLEU-1..4 / METEOR / ROUGE-L / CIDEr from
pycocoevalcap (the COCO caption evaluation code; METEOR and its PTB tokenizer run Java)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence

import numpy as np

MRA_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # C = {0.5, 0.55, ..., 0.95}, as the authors build it


def mean_relative_accuracy(prediction: float | None, target: float) -> float:
    """VSI-Bench's MRA: the share of thresholds C in {0.5, ..., 0.95} with |pred - gt| / gt <= 1 - C (the
    authors' code uses <=; computed in float64 like numpy there). An unparsable prediction scores 0."""
    if prediction is None or target == 0:
        return 0.0
    error = abs(prediction - target) / target
    return float(np.mean(error <= 1 - MRA_THRESHOLDS))


_TYPOS = (
    (r"\bletf\b", "left"),
    (r"\blet\b", "left"),
    (r"\btehre\b", "there"),
    (r"\brigth\b", "right"),
    (r"\brght\b", "right"),
    (r"\bbehine\b", "behind"),
    (r"\btv\b", "TV"),
    (r"\bchai\b", "chair"),
    (r"\bwasing\b", "washing"),
    (r"\bwaslked\b", "walked"),
    (r"\boclock\b", "o'clock"),
    (r"\bo\'[ ]+clock\b", "o'clock"),
)
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]
_NUMBERS += ["twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


def clean_answer(text: str) -> str:
    """The answer clean-up of LEO (embodied-generalist, data/data_utils.py), which LLaVA-3D, Ross3D and
    Video-3D-LLM reuse for ScanQA / SQA3D: lower case; only letters, digits, comma, apostrophe, hyphen, colon and
    spaces kept; a fixed list of typos mended; 0-20 (and 23) spelt out, "none" as "zero"; digits glued to a word
    dropped; articles dropped; "backwards" as "backward"."""
    text = text.lower()
    text = re.sub(r"[ ]+$", "", text)
    text = re.sub(r"^[ ]+", "", text)
    text = re.sub(r" {2,}", " ", text)
    text = re.sub(r"\.[ ]{2,}", ". ", text)
    text = re.sub(r"[^a-zA-Z0-9,'\s\-:]+", "", text)
    text = re.sub("ç", "c", text)
    text = re.sub("’", "'", text)
    for pattern, repl in _TYPOS:
        text = re.sub(pattern, repl, text)
    text = re.sub(r"\b0\b", "zero", text)
    text = re.sub(r"\bnone\b", "zero", text)
    for number in range(1, 21):
        text = re.sub(rf"\b{number}\b", _NUMBERS[number], text)
    text = re.sub(r"\b23\b", "twenty-three", text)
    text = re.sub(r"\b([a-zA-Z]+)([0-9])\b", r"\g<1>", text)
    text = re.sub(r"\ba\b ([a-zA-Z]+)", r"\g<1>", text)
    text = re.sub(r"\ban\b ([a-zA-Z]+)", r"\g<1>", text)
    text = re.sub(r"\bthe\b ([a-zA-Z]+)", r"\g<1>", text)
    text = re.sub(r"\bbackwards\b", "backward", text)
    return text


def exact_and_refined(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(EM, refined EM) of a cleaned prediction against cleaned answers, as LLaVA-3D / Ross3D match them: EM when
    the prediction is one of the answers; refined also when, spaces removed, one contains the other."""
    if prediction in answers:
        return 1.0, 1.0
    bare = "".join(prediction.split())
    for answer in answers:
        other = "".join(answer.split())
        if bare in other or other in bare:
            return 0.0, 1.0
    return 0.0, 0.0


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(
            "METEOR and the PTB tokenizer of pycocoevalcap run Java, and no `java` is on PATH; install a JRE "
            "(e.g. apt install default-jre-headless) to score ScanQA's caption metrics"
        )
    return java


def caption_metrics(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr (CIDEr-D, idf from these references) of one prediction per id against
    all its references, both through the PTB tokenizer, as ScanQA's own scorer does (scores x 100)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise ImportError("ScanQA's caption metrics need pycocoevalcap: pip install 'moekit[eval]'") from None
    require_java()
    ids = sorted(predictions)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": a} for a in references[k]] for k in ids})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in ids})
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        out[f"BLEU-{n}"] = 100 * float(value)
    meteor = Meteor()  # one Java process, stopped when the scorer is collected
    out["METEOR"] = 100 * float(meteor.compute_score(gts, res)[0])
    del meteor
    out["ROUGE-L"] = 100 * float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = 100 * float(Cider().compute_score(gts, res)[0])
    return out
