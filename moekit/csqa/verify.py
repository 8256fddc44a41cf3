"""The verifier: a VLM answers each question from the two graphs and the visuals; a QA stays only if it agrees.

A verifier is any callable `items -> answers` (`Verifier`); `model_verifier(DIR)` asks a local model folder
through moekit's generation with the pair's image and its clip (or scene) from the output folder. Agreement is
`records.answers_match`: equal after normalisation, or the answer starts with the whole gold answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from moekit.csqa.graphs import PairedGraph, graph_text
from moekit.csqa.records import Candidate, Drop, answers_match
from moekit.csqa.templates import Templates


@dataclass(frozen=True)
class VerifyItem:
    prompt: str
    image: Path
    video: Path | None = None
    scene: Path | None = None


Verifier = Callable[[Sequence[VerifyItem]], list[str]]


def model_verifier(model_dir: str | Path, max_new_tokens: int = 32, batch_size: int = 4) -> Verifier:
    """A `Verifier` backed by the VLM in `model_dir` (greedy)."""
    from moekit.evaluate.generate import Sampling, generate_batch, make_request
    from moekit.evaluate.model_dir import open_model_dir

    opened = open_model_dir(model_dir)
    sampling = Sampling(max_new_tokens=max_new_tokens)

    def run(items: Sequence[VerifyItem]) -> list[str]:
        requests = [make_request(i.prompt, images=[i.image], video=i.video, scene=i.scene) for i in items]
        return generate_batch(opened, requests, sampling, batch_size=batch_size)

    return run


def verify_prompt(pair: PairedGraph, question: str, templates: Templates) -> str:
    other = pair.other_name
    return templates.verifier.format(
        other=other,
        Other=other[0].upper() + other[1:],
        image_graph=graph_text(pair.image),
        other_graph=graph_text(pair.other),
        question=question,
    )


def verify(
    candidates: Sequence[Candidate],
    pairs: dict[str, PairedGraph],
    media: dict[str, dict[str, str]],
    root: Path,
    verifier: Verifier,
    templates: Templates,
) -> tuple[list[Candidate], list[Drop]]:
    """Candidates the verifier agrees with (marked `verified`), and a drop for each disagreement."""
    items = []
    for c in candidates:
        paths = {k: root / v for k, v in media[c.pair].items()}
        prompt = verify_prompt(pairs[c.pair], c.question, templates)
        items.append(VerifyItem(prompt, paths["image"], paths.get("video"), paths.get("scene")))
    answers = verifier(items)
    if len(answers) != len(items):
        raise ValueError(f"the verifier returned {len(answers)} answers for {len(items)} questions")
    kept, drops = [], []
    for c, answer in zip(candidates, answers):
        c.prediction = answer
        if answers_match(answer, c.answer):
            c.verified = True
            kept.append(c)
        else:
            detail = {"question": c.question, "answer": c.answer, "verifier": answer}
            drops.append(Drop(c.pair, "verify", "verifier answered differently", c.family, detail))
    return kept, drops
