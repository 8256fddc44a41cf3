"""Score a model on multiple-choice samples (those with `choices`): ranked by answer log-likelihood, or generated.

Ranking: every choice is put in place of the sample's final answer; the model's summed (or per-token mean)
log-probability of that answer's tokens, end-of-turn marker included, ranks the choices. This stays meaningful
for tiny models that cannot yet produce well-formed text. Generated answers (from any decoder) are scored by
`score_generated`, which normalises case, punctuation and a leading article before comparing.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import send_to_device
from torch import nn

from moekit.attach.position import feeding
from moekit.data.chat import IGNORE
from moekit.data.collate import Collator, split_batch
from moekit.data.config import FramesSpec
from moekit.data.media import load_media
from moekit.data.preprocess import Preprocessor
from moekit.data.schema import Sample, parse_sample, read_records

Normalise = Literal["sum", "mean"]


def read_choice_samples(path: str | Path) -> list[Sample]:
    """The samples of a data file that carry `choices` (schema errors raise with file, line and id)."""
    samples = [parse_sample(record) for record in read_records(path)]
    out = [s for s in samples if s.choices]
    if not out:
        raise ValueError(f"{path}: no sample has 'choices'; multiple-choice evaluation needs them")
    return out


def final_answer_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probabilities, token count) of each row's last labelled run (its final answer)."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE
    # keep only the last contiguous run of labelled positions in each row
    last = torch.zeros_like(mask)
    for r in range(mask.shape[0]):
        where = mask[r].nonzero().flatten()
        if len(where):
            end = int(where[-1])
            start = end
            while start - 1 >= 0 and mask[r, start - 1]:
                start -= 1
            last[r, start : end + 1] = True
    picked = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * last).sum(-1), last.sum(-1)


@torch.no_grad()
def score_choices(
    model: Any,
    preprocessor: Preprocessor,
    samples: Iterable[Sample],
    root: str | Path,
    *,
    normalise: Normalise = "sum",
    frames: FramesSpec | None = None,
    max_length: int = 2048,
    encoders: dict[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """Rank each sample's choices with `model`; returns accuracy overall and per task, and per-sample details.

    `encoders`: position encoders attached to `model` (`moekit.attach.position.load_encoders`), fed each sample's geometry.
    """
    frames = frames or FramesSpec()
    collate = Collator(preprocessor.pad_id)
    device = next(model.parameters()).device
    details = []
    for sample in samples:
        media = load_media(sample, Path(root), frames)
        items = []
        for choice in sample.choices:
            variant = sample.model_copy(deep=True)
            variant.conversations[-1].value = choice
            items.append(preprocessor.encode(variant, media, max_length))
        inputs, extras = split_batch(collate(items))
        inputs = send_to_device(inputs, device)
        labels = inputs.pop("labels")
        with feeding(encoders or {}, model, inputs["input_ids"], extras.get("geometry")):
            logits = model(**inputs).logits
        total, count = final_answer_logprobs(logits, labels)
        scores = total / count.clamp(min=1) if normalise == "mean" else total
        best = int(scores.argmax())
        answer = sample.conversations[-1].value
        details.append(
            {
                "id": sample.id,
                "task": sample.task or "default",
                "answer": answer,
                "predicted": sample.choices[best],
                "correct": sample.choices[best] == answer,
                "scores": dict(zip(sample.choices, scores.tolist())),
                "chance": 1 / len(sample.choices),
            }
        )
    return summarise(details)


def summarise(details: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy and chance level overall and per task from per-sample results (`correct`, `task`, `chance`)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for d in details:
        groups[d["task"]].append(d)

    def stats(rows: list[dict]) -> dict[str, Any]:
        correct = sum(bool(r["correct"]) for r in rows)
        return {
            "correct": correct,
            "total": len(rows),
            "accuracy": correct / len(rows) if rows else 0.0,
            "chance": sum(r["chance"] for r in rows) / len(rows) if rows else 0.0,
        }

    return {**stats(details), "per_task": {t: stats(rows) for t, rows in sorted(groups.items())}, "samples": details}


def normalise_answer(text: str) -> str:
    """Lower case, punctuation and a leading article removed, whitespace collapsed."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    if words and words[0] in ("the", "a", "an"):
        words = words[1:]
    return " ".join(words)


def named_choices(said: str, choices: Iterable[str]) -> list[str]:
    """The choices whose normalised text appears as whole words in the normalised reply `said`."""
    return [c for c in choices if re.search(rf"\b{re.escape(normalise_answer(c))}\b", said)]


def score_generated(predictions: Mapping[str, str], samples: Iterable[Sample]) -> dict[str, Any]:
    """Score generated answers `{sample_id: text}`: correct when the normalised text equals the normalised
    answer, or names exactly one of the choices and that one is the answer. Missing predictions count wrong."""
    details = []
    for sample in samples:
        answer = sample.conversations[-1].value
        text = predictions.get(sample.id)
        correct = False
        if text is not None:
            said = normalise_answer(text)
            correct = said == normalise_answer(answer)
            if not correct and sample.choices:
                correct = named_choices(said, sample.choices) == [answer]
        chance = 1 / len(sample.choices) if sample.choices else 0.0
        details.append(
            {
                "id": sample.id,
                "task": sample.task or "default",
                "answer": answer,
                "predicted": text,
                "correct": correct,
                "chance": chance,
            }
        )
    return summarise(details)
