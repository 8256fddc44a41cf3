"""Answer extraction: a model's free text -> the answer a benchmark compares (a letter, a number).

Each benchmark's official rule is written here as its authors' scorer applies it (the source is named at each
function). One moekit addition, applied only when the official rule finds no valid letter: a reply that
names exactly one option's text counts as that option's letter (small models often answer "red", not "B").
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

LETTERS = string.ascii_uppercase


def letters_for(options: Sequence[str], count: int = 4) -> str:
    return LETTERS[: len(options) or count]


def by_option_text(text: str, options: Sequence[str]) -> str | None:
    """The letter of the one option whose text the reply equals or contains as whole words, else None."""
    said = _words(text)
    if not said:
        return None
    exact = [i for i, o in enumerate(options) if _words(o) == said]
    if len(exact) == 1:
        return LETTERS[exact[0]]
    named = [i for i, o in enumerate(options) if _words(o) and re.search(rf"\b{re.escape(_words(o))}\b", said)]
    return LETTERS[named[0]] if len(named) == 1 else None


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def with_fallback(letter: str, text: str, options: Sequence[str]) -> str:
    """`letter` when it is one of the options' letters, else the option the text names, else `letter`."""
    valid = letters_for(options)
    if letter.upper() in valid and letter:
        return letter.upper()
    return by_option_text(text, options) or letter


def mmstar_letter(text: str) -> str:
    """MMStar's authors' rule (MMStar-Benchmark/MMStar, eval/vlmeval/evaluate/mmstar.py): the reply's first
    character, or the one after "(", "option " or "the answer is " (lower case, newlines as spaces)."""
    said = text.lower().strip().replace("\n", " ")
    for prefix in ("the answer is ", "option ", "("):
        if said.startswith(prefix):
            return said[len(prefix) : len(prefix) + 1].upper()
    return said[:1].upper()


def cambrian_letter(text: str) -> str:
    """CV-Bench as Cambrian-1 scores it (cambrian-mllm/cambrian, eval/eval/ade/ade_test.py): the text after the
    last "answer is" / "answer:", stripped of "." and parentheses, its first character."""
    said = text.lower().strip()
    for key in ("answer is", "answer is:", "answer:"):
        if key in said:
            said = said.split(key)[-1]
    said = said.strip().rstrip(".:,").lstrip("(").rstrip(")").strip()
    return said[:1].upper()


# Video-MME's official scorer (thanku-all/parse_answer, eval_your_results.py) strips these answer prefixes.
# Its source lacks two commas, which glues four of them into two strings that never match; moekit strips each.
VIDEOMME_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
    "Answer:",
    "Option:",
    "The correct answer",
    "The correct option",
)


def videomme_letter(text: str) -> str:
    """Video-MME's rule: strip the answer prefixes; a reply of more than 10 words without any of A-D gives "";
    else the first capital A, B, C or D anywhere (case-sensitive)."""
    said = text.strip()
    for prefix in VIDEOMME_PREFIXES:
        said = said.replace(prefix, "")
    if len(said.split()) > 10 and not re.search("[ABCD]", said):
        return ""
    found = re.search("[ABCD]", said)
    return found.group(0) if found else ""


def first_word(text: str) -> str:
    """VSI-Bench's `fuzzy_matching` (vision-x-nyu/thinking-in-space, lmms_eval/tasks/vsibench/utils.py): the
    first space-separated token, trailing dots removed."""
    return text.strip().split(" ")[0].rstrip(".").strip()


def to_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
