"""What flows through the builder: candidate question-answer pairs, dropped ones with their reason, and the one
text normalisation that deduplication and answer matching share."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Stage = Literal["generate", "dedupe", "verify", "balance"]
NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
    )
}
ARTICLES = {"a", "an", "the"}


@dataclass
class Candidate:
    pair: str
    family: str
    question: str
    answer: str
    origin: str  # "rules" or the generator model's folder name
    verified: bool = False
    prediction: str | None = None


@dataclass
class Drop:
    pair: str
    stage: Stage
    reason: str  # short, grouped in the report
    family: str | None = None
    detail: dict = field(default_factory=dict)


def normalise(text: str) -> str:
    """Lower case, punctuation and articles removed, number words as digits, single spaces."""
    words = re.findall(r"[a-z0-9]+", text.lower().replace("_", " "))
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def answers_match(prediction: str, gold: str) -> bool:
    """The verifier agrees: the normalised answers are equal, or the prediction starts with the whole gold answer
    ("yes, it is" matches "yes"; "no" does not match "not sure")."""
    pred, want = normalise(prediction), normalise(gold)
    if not want:
        return False
    return pred == want or pred.startswith(want + " ")
