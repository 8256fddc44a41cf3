"""`moekit csqa build`: paired scene graphs -> CSQA question-answer samples, as PolyV's Appendix B.1 builds them.

Load the pairs (every source file checked before anything is written) -> generate (rules, or a generator
model) -> deduplicate (normalised question text, per pair or globally) -> write each pair's media -> verify (a
verifier model, optional) -> balance over the question families up to `target` -> write, atomically:

    OUT/data.jsonl     moekit samples (`data.schema.Sample`), one QA each, `task` = its family
    OUT/report.json    counts: pairs, generated / kept / dropped per family, drop reasons per stage
    OUT/dropped.jsonl  every dropped QA or reply with its stage, reason and details
    OUT/media/...      the pairs' images, clips (frame folders) and scenes (scene folders)
    OUT/moekit.json    provenance: the build spec and the counts

`layout: joint` (default) gives the student both inputs, `image` + `video` (or `scene`), as PolyV's stage 2-2
feeds "multi-modal inputs and the synergy question" jointly (and as `moekit synth` writes its CSQA file);
`layout: paired` writes `image` + `paired: {video | scene}` instead.
"""

from __future__ import annotations

import importlib
import json
import random
import shutil
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from moekit.config import StrictModel, parse_config
from moekit.config.provenance import Provenance, write_provenance
from moekit.csqa.generate import TextGenerator, model_generator, model_qas
from moekit.csqa.graphs import PairedGraph, Source
from moekit.csqa.media import Mode, folder_name, write_media
from moekit.csqa.records import Candidate, Drop, normalise
from moekit.csqa.rules import rule_qas
from moekit.csqa.templates import FAMILIES, LEVEL, Family, Templates, load_templates
from moekit.csqa.verify import Verifier, model_verifier, verify
from moekit.data.schema import Sample
from moekit.io.atomic import atomic_dir, is_nonempty_dir

LOADERS = {"pvsg": "pvsg", "action-genome": "action_genome", "3dssg": "threedssg"}


class BuildSpec(StrictModel):
    """Everything one build depends on (kept in the output's moekit.json)."""

    source: Source
    path: str = Field(description="the released dataset folder")
    options: dict[str, Any] = Field(default_factory=dict, description="the source loader's options")
    generator: str = Field("rules", description="'rules' or a local model folder")
    verifier: str | None = Field(None, description="a local VLM folder; none: no verification")
    target: int = Field(20000, ge=1, description="QA samples wanted (PolyV: 20K)")
    seed: int = 0
    families: list[Family] | None = Field(None, description="families to build (default: all)")
    templates: str | None = Field(None, description="YAML merged over the default templates")
    media: Mode = "link"
    layout: Literal["joint", "paired"] = "joint"
    dedupe: Literal["pair", "global"] = "pair"
    max_new_tokens: int = Field(512, ge=1, description="generator reply length")
    verifier_tokens: int = Field(32, ge=1, description="verifier answer length")
    batch_size: int = Field(4, ge=1)


def load_source(spec: BuildSpec) -> tuple[list[PairedGraph], list[tuple[str, str]]]:
    module = importlib.import_module(f"moekit.csqa.{LOADERS[spec.source]}")
    opts = parse_config(module.Options, spec.options, source=f"csqa {spec.source} options")
    return module.load_pairs(spec.path, opts)


def _generate(spec, pairs, templates, families, generator) -> tuple[list[Candidate], list[Drop]]:
    if generator is None:
        rng = np.random.default_rng(spec.seed)
        found = [c for p in pairs for c in rule_qas(p, templates, rng) if c.family in families]
        return found, []
    return model_qas(pairs, generator, templates, families, Path(spec.generator).name)


def _dedupe(cands: list[Candidate], scope: str) -> tuple[list[Candidate], list[Drop]]:
    seen, kept, drops = set(), [], []
    for c in cands:
        key = (c.pair if scope == "pair" else "", normalise(c.question))
        if key in seen:
            drops.append(Drop(c.pair, "dedupe", "duplicate question", c.family, {"question": c.question}))
            continue
        seen.add(key)
        kept.append(c)
    return kept, drops


def balance(cands: list[Candidate], target: int, seed: int) -> tuple[list[Candidate], list[Drop]]:
    """Up to `target` candidates, taken round-robin over the families (each family shuffled with `seed`)."""
    rng = random.Random(seed)
    groups = {f: [c for c in cands if c.family == f] for f in FAMILIES}
    for group in groups.values():
        rng.shuffle(group)
    kept: list[Candidate] = []
    while len(kept) < target and any(groups.values()):
        for group in groups.values():
            if group and len(kept) < target:
                kept.append(group.pop())
    drops = [
        Drop(c.pair, "balance", "over the target (balanced over families)", c.family)
        for g in groups.values()
        for c in g
    ]
    return kept, drops


def _sample(c: Candidate, n: int, pair: PairedGraph, paths: dict[str, str], layout: str) -> dict:
    kind = "video" if "video" in paths else "scene"
    sample: dict[str, Any] = {"id": f"{pair.id}-{c.family}-{n}", "image": paths["image"]}
    if layout == "joint":
        sample[kind], prefix = paths[kind], "<image>\n<video>\n"
    else:
        sample["paired"], prefix = {kind: paths[kind]}, "<image>\n"
    meta = {
        "source": pair.source,
        "pair": pair.id,
        "level": LEVEL[c.family],
        "origin": c.origin,
        "verified": c.verified,
    }
    if c.prediction is not None:
        meta["verifier_answer"] = c.prediction
    sample.update(
        conversations=[{"from": "human", "value": prefix + c.question}, {"from": "gpt", "value": c.answer}],
        task=c.family,
        meta=meta,
    )
    Sample.model_validate(sample)
    return sample


def _report(spec, pairs, skipped, generated, kept, drops) -> dict[str, Any]:
    families: dict[str, dict[str, Any]] = {f: {"generated": 0, "kept": 0, "dropped": {}} for f in FAMILIES}
    for c in generated:
        families[c.family]["generated"] += 1
    for c in kept:
        families[c.family]["kept"] += 1
    by_stage: dict[str, Counter] = defaultdict(Counter)
    for d in drops:
        by_stage[d.stage][d.reason] += 1
        if d.family in families:
            if d.stage == "generate":
                families[d.family]["generated"] += 1
            families[d.family]["dropped"][d.reason] = families[d.family]["dropped"].get(d.reason, 0) + 1
    return {
        "source": spec.source,
        "path": spec.path,
        "generator": spec.generator,
        "verifier": spec.verifier,
        "target": spec.target,
        "seed": spec.seed,
        "pairs": len(pairs),
        "pairs_skipped": dict(Counter(reason for _, reason in skipped)),
        "generated": len(generated) + sum(1 for d in drops if d.stage == "generate" and d.family),
        "kept": len(kept),
        "verified": spec.verifier is not None,
        "families": {f: v for f, v in families.items() if v["generated"] or v["kept"] or v["dropped"]},
        "dropped": {stage: dict(counts) for stage, counts in by_stage.items()},
    }


def build_csqa(
    spec: BuildSpec,
    out: str | Path,
    *,
    generator: TextGenerator | None = None,
    verifier: Verifier | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the dataset into `out` and return its report. `generator` / `verifier` callables replace the model
    folders of `spec` (a plug-in point: any `prompts -> texts` and `items -> answers`)."""
    out = Path(out)
    if not overwrite and is_nonempty_dir(out):
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    templates: Templates = load_templates(spec.templates)
    families: Sequence[str] = spec.families or FAMILIES
    pairs, skipped = load_source(spec)
    if not pairs:
        raise ValueError(f"{spec.path}: no usable pair ({dict(Counter(r for _, r in skipped))})")
    if generator is None and spec.generator != "rules":
        generator = model_generator(spec.generator, spec.max_new_tokens, spec.batch_size)
    if verifier is None and spec.verifier is not None:
        verifier = model_verifier(spec.verifier, spec.verifier_tokens, spec.batch_size)
    by_id = {p.id: p for p in pairs}
    generated, drops = _generate(spec, pairs, templates, families, generator)
    cands, dropped = _dedupe(generated, spec.dedupe)
    drops += dropped
    with atomic_dir(out, overwrite=overwrite) as tmp:
        media = {pid: write_media(by_id[pid], tmp, spec.media) for pid in sorted({c.pair for c in cands})}
        if verifier is not None and cands:
            cands, dropped = verify(cands, by_id, media, tmp, verifier, templates)
            drops += dropped
        kept, dropped = balance(cands, spec.target, spec.seed)
        drops += dropped
        order = {pid: i for i, pid in enumerate(by_id)}
        kept.sort(key=lambda c: (order[c.pair], FAMILIES.index(c.family)))
        counters: Counter = Counter()
        lines = []
        for c in kept:
            lines.append(json.dumps(_sample(c, counters[c.pair], by_id[c.pair], media[c.pair], spec.layout)))
            counters[c.pair] += 1
        for pid in set(media) - set(counters):
            shutil.rmtree(tmp / "media" / folder_name(pid))
        (tmp / "data.jsonl").write_text("".join(line + "\n" for line in lines))
        (tmp / "dropped.jsonl").write_text("".join(json.dumps(_drop_json(d)) + "\n" for d in drops))
        report = _report(spec, pairs, skipped, generated, kept, drops)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        params = {"spec": spec.model_dump(), "kept": report["kept"], "pairs": report["pairs"]}
        write_provenance(tmp, Provenance(made_by="moekit csqa build", params=params))
    return report


def _drop_json(d: Drop) -> dict[str, Any]:
    return {"pair": d.pair, "stage": d.stage, "reason": d.reason, "family": d.family, **d.detail}
