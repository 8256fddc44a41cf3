"""The model-based generator: the two graphs as text in, question-answer pairs as JSON out, schema-checked.

A generator is any callable `prompts -> texts` (`TextGenerator`); `model_generator(DIR)` is the one backed by a
local model folder through moekit's generation (`evaluate.generate.generate_batch`, greedy). Each pair gets
one prompt per level (object, relation) from `Templates.generator`. A reply must be one JSON object
`{"qas": [{"family", "question", "answer"}]}` (a ```json fence or text around it is tolerated); a reply that is
not, and each item that fails `GeneratedQA` or names a family of the other level, is dropped with its reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pydantic
from pydantic import Field

from moekit.config import StrictModel
from moekit.csqa.graphs import PairedGraph, graph_text
from moekit.csqa.records import Candidate, Drop
from moekit.csqa.templates import LEVEL, Family, Level, Templates

TextGenerator = Callable[[Sequence[str]], list[str]]
SHOWN = 300  # characters of a bad reply kept in the report


class GeneratedQA(StrictModel):
    family: Family
    question: str = Field(min_length=8, max_length=400)
    answer: str = Field(min_length=1, max_length=120)


class GeneratedReply(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    qas: list[dict] = Field(min_length=1)


def model_generator(model_dir: str | Path, max_new_tokens: int = 512, batch_size: int = 4) -> TextGenerator:
    """A `TextGenerator` that asks the model in `model_dir` (text only, greedy)."""
    from moekit.evaluate.generate import Sampling, generate_batch, make_request
    from moekit.evaluate.model_dir import open_model_dir

    opened = open_model_dir(model_dir)
    sampling = Sampling(max_new_tokens=max_new_tokens)

    def run(prompts: Sequence[str]) -> list[str]:
        return generate_batch(opened, [make_request(p) for p in prompts], sampling, batch_size=batch_size)

    return run


def prompt(pair: PairedGraph, level: Level, templates: Templates, families: Sequence[str]) -> str:
    """The generator prompt of one pair and level, listing the `families` of that level."""
    other = pair.other_name
    notes = "\n".join(f"- {f}: {templates.family_notes[f].format(other=other)}" for f in families if LEVEL[f] == level)
    return templates.generator[level].format(
        other=other,
        Other=other[0].upper() + other[1:],
        image_graph=graph_text(pair.image),
        other_graph=graph_text(pair.other),
        count=templates.qas_per_prompt,
        families=notes,
    )


def _json_object(text: str) -> object:
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    body = fenced.group(1) if fenced else text
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("no JSON object in the reply")
    return json.loads(body[start : end + 1])


def parse_reply(pair_id: str, text: str, level: Level, families: Sequence[str], origin: str):
    """(candidates, drops) from one reply."""
    shown = {"reply": text[:SHOWN]}
    try:
        data = _json_object(text)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        reason = str(exc) if "no JSON object" in str(exc) else "invalid JSON"
        return [], [Drop(pair_id, "generate", reason, detail={**shown, "error": str(exc)})]
    try:
        reply = GeneratedReply.model_validate(data)
    except pydantic.ValidationError as exc:
        return [], [Drop(pair_id, "generate", "reply is not {'qas': [...]}", detail={**shown, "error": _first(exc)})]
    out, drops = [], []
    for item in reply.qas:
        try:
            qa = GeneratedQA.model_validate(item)
        except pydantic.ValidationError as exc:
            family = item.get("family") if isinstance(item, dict) and isinstance(item.get("family"), str) else None
            drops.append(Drop(pair_id, "generate", "QA fails the schema", family, {"item": item, "error": _first(exc)}))
            continue
        if LEVEL[qa.family] != level:
            drops.append(
                Drop(pair_id, "generate", f"family of the {LEVEL[qa.family]} level in a {level}-level reply", qa.family)
            )
        elif qa.family not in families:
            drops.append(Drop(pair_id, "generate", "family not asked for", qa.family))
        else:
            out.append(Candidate(pair_id, qa.family, qa.question.strip(), qa.answer.strip(), origin))
    return out, drops


def _first(exc: pydantic.ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or '<reply>'}: {err['msg']}"


def model_qas(
    pairs: Sequence[PairedGraph],
    generate: TextGenerator,
    templates: Templates,
    families: Sequence[str],
    origin: str,
) -> tuple[list[Candidate], list[Drop]]:
    """Ask `generate` once per pair and level; every reply parsed and checked."""
    asks = [(p, level) for p in pairs for level in ("object", "relation") if any(LEVEL[f] == level for f in families)]
    texts = generate([prompt(p, level, templates, families) for p, level in asks])
    if len(texts) != len(asks):
        raise ValueError(f"the generator returned {len(texts)} replies for {len(asks)} prompts")
    out, drops = [], []
    for (pair, level), text in zip(asks, texts):
        found, dropped = parse_reply(pair.id, text, level, families, origin)
        out += found
        drops += dropped
    return out, drops
