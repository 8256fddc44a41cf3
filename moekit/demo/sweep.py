"""The coverage sweep: every model type of transformers' image-text-to-text and causal-LM mappings, built tiny
from its config (`moekit.demo.shrink`), upcycled with no override and compared with its dense self.

`bench/family_sweep.py` writes the table of docs/upcycling.md from it; `tests/test_coverage.py` holds the
numbers to the goal (at least 95% of the dense families upcycle and keep their logits; no silent mismatch).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moekit.arch import ArchError
from moekit.demo.shrink import dense_decoder_types, text_inputs_any, tiny_model_any
from moekit.upcycle import UpcycleSpec, upcycle

SPEC = UpcycleSpec(layers="full", num_experts=3, top_k=2)
TOLERANCE = 1e-4
# What a family's forward asks for when text alone is not enough (its logits are then proven layer by layer).
MEDIA_WORDS = ("pixel", "image", "qformer", "state", "flattened_patches", "encoder_outputs", "bbox", "language")
NOT_DENSE = {"already MoE": "moe", "encoder-only": "encoder", "no FFN:": "no_ffn"}

# Outcomes: upcycled (text logits within TOLERANCE), upcycled_layers (its forward needs media: every converted
# layer was proven on a probe input instead), refused (a dense family moekit explains it cannot upcycle),
# mismatch (upcycled but the logits moved: a silent wrong result), crash (an unexplained error), and outside the
# denominator: moe / encoder / no_ffn (not dense decoders), not_built (the tiny model could not be built or run).
DENSE = ("upcycled", "upcycled_layers", "refused", "mismatch", "crash")


@dataclass
class Outcome:
    model_type: str
    outcome: str
    model_class: str = ""
    detail: str = ""
    difference: float | None = None
    seconds: float = 0.0


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:240]


@torch.no_grad()
def sweep_one(model_type: str) -> Outcome:
    start = time.perf_counter()
    out = Outcome(model_type, "not_built")
    try:
        model = tiny_model_any(model_type)
    except Exception as exc:  # a config transformers cannot build tiny (missing optional packages, ...)
        out.detail = f"build: {_first_line(exc)}"
        return _done(out, start)
    out.model_class = type(model).__name__
    batch = text_inputs_any()
    dense = None
    try:
        dense = model(**batch, use_cache=False).logits
    except Exception as exc:
        text = str(exc).lower()
        if not any(w in text for w in MEDIA_WORDS):
            out.detail = f"forward: {_first_line(exc)}"
            return _done(out, start)
    try:
        moe = upcycle(model, SPEC)
    except ArchError as exc:
        message = str(exc)
        out.outcome = next((kind for words, kind in NOT_DENSE.items() if words in message), "refused")
        out.detail = message.splitlines()[0][:300]
        return _done(out, start)
    except Exception as exc:
        out.outcome, out.detail = "crash", _first_line(exc)
        return _done(out, start)
    if dense is None:
        out.outcome, out.detail = "upcycled_layers", "its forward needs media; every converted layer was proven"
        return _done(out, start)
    out.difference = float((moe(**batch, use_cache=False).logits - dense).abs().max())
    out.outcome = "upcycled" if out.difference <= TOLERANCE else "mismatch"
    return _done(out, start)


def _done(out: Outcome, start: float) -> Outcome:
    out.seconds = round(time.perf_counter() - start, 3)
    return out


def sweep(model_types: list[str] | None = None) -> list[Outcome]:
    return [sweep_one(t) for t in (model_types or dense_decoder_types())]


def coverage(outcomes: list[Outcome]) -> tuple[int, int]:
    """(families upcycled, dense families built): the goal's numerator and denominator."""
    dense = [o for o in outcomes if o.outcome in DENSE]
    return sum(o.outcome.startswith("upcycled") for o in dense), len(dense)


def markdown(outcomes: list[Outcome]) -> str:
    """The docs table: one row per model type, grouped by outcome."""
    done, total = coverage(outcomes)
    lines = [
        f"{done} of {total} dense decoder families ({100 * done / max(total, 1):.1f}%) upcycle with no override and "
        "keep their function; the rest of the mappings' model types are not dense decoders or could not be built "
        "tiny here.",
        "",
        "| model type | class | outcome | detail |",
        "| --- | --- | --- | --- |",
    ]
    order = {
        k: i
        for i, k in enumerate(
            ("upcycled", "upcycled_layers", "refused", "mismatch", "crash", "moe", "encoder", "no_ffn", "not_built")
        )
    }
    for o in sorted(outcomes, key=lambda o: (order.get(o.outcome, 99), o.model_type)):
        detail = (f"max logit diff {o.difference:.1e}" if o.difference is not None else o.detail).replace("|", "/")
        lines.append(f"| `{o.model_type}` | {o.model_class or '-'} | {o.outcome} | {detail} |")
    return "\n".join(lines) + "\n"


def write_json(outcomes: list[Outcome], path: str | Path) -> None:
    import json

    Path(path).write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
