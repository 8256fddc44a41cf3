"""The rule-based generator (the default, no model): questions from `Templates.rules`, answered from the graphs.

Every answer follows from the paired graph, so rule QAs are correct by construction (a verifier may still be
run over them). Objects are named by label, so only objects whose label names one object across both sides
are asked about. Position and motion compare box centres: a move under `STILL` of the frame size counts as none.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np

from moekit.csqa.graphs import Obj, PairedGraph, SideGraph
from moekit.csqa.records import Candidate
from moekit.csqa.templates import Templates

STILL = 0.1  # fraction of the frame width / height
SIDE = 0.05  # left/right needs centres this far apart (fraction of the width)
NEARER = 0.3  # metres between two objects' depths for "nearer"
END = 0.95  # a span ending after this fraction of the clip holds at the end
NEGATIVE = {"not_looking_at", "not looking at", "not_contacting", "not contacting", "unsure", "other_relationship"}


def words(text: str) -> str:
    return text.replace("_", " ")


class _Ctx:
    def __init__(self, g: PairedGraph, t: Templates, rng: np.random.Generator):
        self.g, self.t, self.rng, self.out = g, t, rng, []
        ids: dict[str, set[str]] = defaultdict(set)
        for side in (g.image, g.other):
            for o in side.objects:
                ids[o.label].add(o.id)
        self.namable = {label for label, found in ids.items() if len(found) == 1}
        self.linked = {a.id: b for a, b in g.linked()}

    def ok(self, *objs: Obj | None) -> bool:
        return all(o is not None and o.label in self.namable for o in objs)

    def pick(self, items: list, count: int = 1) -> list:
        return [items[i] for i in self.rng.permutation(len(items))[:count]] if items else []

    def add(self, family: str, key: str, answer: str, **fields: str) -> None:
        text = self.t.rules[key].format(**{k: words(v) for k, v in fields.items()})
        self.out.append(Candidate(self.g.id, family, text, words(answer), "rules"))

    def word(self, key: str) -> str:
        return self.t.words[key]

    def join(self, items: list[str]) -> str:
        items = sorted({words(i) for i in items})
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {self.word('and')} " + items[-1]


def _centre(box: tuple[float, float, float, float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _shift(c: _Ctx, a, b, size, keys: tuple[str, str, str, str, str]) -> str:
    """The word for a move from box `a` to box `b`: keys = (still, left, right, up, down)."""
    (x0, y0), (x1, y1) = _centre(a), _centre(b)
    dx, dy = (x1 - x0) / size[0], (y1 - y0) / size[1]
    if max(abs(dx), abs(dy)) < STILL:
        return c.word(keys[0])
    if abs(dx) >= abs(dy):
        return c.word(keys[1] if dx < 0 else keys[2])
    return c.word(keys[3] if dy < 0 else keys[4])


def _triples(side: SideGraph) -> dict[tuple[str, str, str], list[tuple[float, float]] | None]:
    return {(r.subject, r.predicate, r.object): r.spans for r in side.relations}


def _when(c: _Ctx, t: float) -> str:
    return c.word("start" if t < 1 / 3 else "middle" if t < 2 / 3 else "end")


def _video_objects(c: _Ctx) -> None:
    img, vid = c.g.image, c.g.other
    size = img.size or vid.size or (1, 1)
    named = [o for o in img.objects if c.ok(o)]
    for obj in c.pick([o for o in named if o.id in c.linked]) + c.pick([o for o in named if o.id not in c.linked]):
        c.add("appearance", "appearance_video", c.word("yes" if obj.id in c.linked else "no"), a=obj.label)
    new = [o for o in vid.objects if img.find(o.id) is None]
    if len(new) == 1 and c.ok(new[0]):
        c.add("new_object", "new_object_video", new[0].label)
    moved = [(a, b) for a, b in c.g.linked() if c.ok(a) and a.box and (b.box_end or b.box)]
    for a, b in c.pick(moved):
        keys = ("same_place", "further_left", "further_right", "higher", "lower")
        c.add("position", "position_video", _shift(c, a.box, b.box_end or b.box, size, keys), a=a.label)
    motion = [o for o in vid.objects if c.ok(o) and o.box and o.box_end]
    for o in c.pick(motion):
        c.add(
            "motion",
            "motion",
            _shift(c, o.box, o.box_end, vid.size or size, ("still", "left", "right", "up", "down")),
            a=o.label,
        )
    pairs: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in vid.relations:
        if r.subject in c.linked and r.object in c.linked and r.predicate not in NEGATIVE:
            pairs[(r.subject, r.object)].append(r.predicate)
    for s, o in c.pick([k for k in pairs if c.ok(img.find(k[0]), img.find(k[1]))]):
        c.add("interaction", "interaction", c.join(pairs[(s, o)]), a=img.label(s), b=img.label(o))
    changed = [(a, b) for a, b in c.g.linked() if c.ok(a) and set(a.attributes) - set(b.attributes)]
    changed = [(a, b) for a, b in changed if set(b.attributes) - set(a.attributes)]
    for a, b in c.pick(changed):
        before = sorted(set(a.attributes) - set(b.attributes))[0]
        c.add(
            "state_change",
            "state_change",
            c.join(list(set(b.attributes) - set(a.attributes))),
            a=a.label,
            before=before,
        )


def _video_relations(c: _Ctx) -> None:
    img, vid = c.g.image, c.g.other
    before, after = _triples(img), _triples(vid)
    named = {
        k for k in set(before) | set(after) if c.ok(img.find(k[0]) or vid.find(k[0]), img.find(k[2]) or vid.find(k[2]))
    }
    label = lambda oid: img.label(oid) if img.find(oid) else vid.label(oid)  # noqa: E731
    kept = [k for k in before if k in named and k[0] in c.linked and k[2] in c.linked]
    for k in c.pick([k for k in kept if k in after]) + c.pick([k for k in kept if k not in after]):
        answer = c.word("yes" if k in after else "no")
        c.add("relation_persists", "relation_persists_video", answer, a=label(k[0]), p=k[1], b=label(k[2]))
    begins = [k for k in after if k in named and k not in before and after[k]]
    for k in c.pick(begins):
        c.add("relation_appears", "relation_appears", _when(c, after[k][0][0]), a=label(k[0]), p=k[1], b=label(k[2]))
    ends = [k for k in kept if after.get(k) and after[k][-1][1] < END - 0.1]
    for k in c.pick(ends):
        c.add(
            "relation_appears", "relation_disappears", _when(c, after[k][-1][1]), a=label(k[0]), p=k[1], b=label(k[2])
        )
    then: dict[tuple[str, str], set[str]] = defaultdict(set)
    now: dict[tuple[str, str], set[str]] = defaultdict(set)
    for (s, p, o), spans in after.items():
        if spans is None or spans[-1][1] >= END:
            then[(s, o)].add(p)
    for s, p, o in before:
        now[(s, o)].add(p)
    evolve = [k for k in now if then.get(k) and then[k] != now[k] and (k[0], sorted(now[k])[0], k[1]) in named]
    for s, o in c.pick(evolve):
        c.add(
            "relation_evolves",
            "relation_evolves",
            c.join(list(then[(s, o)])),
            a=label(s),
            p=sorted(now[(s, o)])[0],
            b=label(o),
        )
    both = [
        k
        for k in set(now) | set(then)
        if k[0] in c.linked and k[1] in c.linked and c.ok(img.find(k[0]), img.find(k[1]))
    ]
    for s, o in c.pick(both):
        old = len(now.get((s, o), set()) - NEGATIVE)
        new = len(then.get((s, o), set()) - NEGATIVE)
        answer = c.word("stronger" if new > old else "weaker" if new < old else "same")
        c.add("relation_strength", "relation_strength", answer, a=label(s), b=label(o))
    fresh: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s, p, o in after:
        if s in c.linked and img.find(o) is None:
            fresh[(s, p)].add(o)
    for s, p in c.pick(
        [k for k, objs in fresh.items() if len(objs) == 1 and c.ok(img.find(k[0]), vid.find(next(iter(objs))))]
    ):
        c.add("relation_new", "relation_new_video", vid.label(next(iter(fresh[(s, p)]))), a=label(s), p=p)


def _scene(c: _Ctx) -> None:
    img, room = c.g.image, c.g.other
    seen = {o.id for o in img.objects}
    named = [o for o in room.objects if c.ok(o)]
    for o in c.pick([o for o in named if o.id in seen]) + c.pick([o for o in named if o.id not in seen]):
        c.add("appearance", "appearance_3d", c.word("yes" if o.id in seen else "no"), a=o.label)
    if seen:
        c.add("new_object", "new_object_3d", str(len([o for o in room.objects if o.id not in seen])))
    width = (img.size or (1, 1))[0]
    boxed = [o for o in img.objects if c.ok(o) and o.box]
    sides = [
        (a, b)
        for a in boxed
        for b in boxed
        if a.id < b.id and abs(_centre(a.box)[0] - _centre(b.box)[0]) > SIDE * width
    ]
    for a, b in c.pick(sides):
        c.add(
            "position",
            "position_3d",
            c.word("left" if _centre(a.box)[0] < _centre(b.box)[0] else "right"),
            a=a.label,
            b=b.label,
        )
    deep = [o for o in img.objects if c.ok(o) and o.depth is not None]
    near = [(a, b) for a in deep for b in deep if a.id < b.id and abs(a.depth - b.depth) > NEARER]
    for a, b in c.pick(near):
        c.add("position", "nearer_3d", (a if a.depth < b.depth else b).label, a=a.label, b=b.label)
    rels = [r for r in room.relations if c.ok(room.find(r.subject), room.find(r.object))]
    for r in c.pick(rels):
        answer = c.word("yes" if r.subject in seen and r.object in seen else "no")
        c.add(
            "relation_persists",
            "relation_persists_3d",
            answer,
            a=room.label(r.subject),
            p=r.predicate,
            b=room.label(r.object),
        )
    fresh: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in room.relations:
        if r.subject in seen and r.object not in seen:
            fresh[(r.subject, r.predicate)].add(r.object)
    good = [k for k, objs in fresh.items() if len(objs) == 1 and c.ok(room.find(k[0]), room.find(next(iter(objs))))]
    for s, p in c.pick(good):
        c.add("relation_new", "relation_new_3d", room.label(next(iter(fresh[(s, p)]))), a=room.label(s), p=p)


def rule_qas(g: PairedGraph, templates: Templates, rng: np.random.Generator) -> list[Candidate]:
    """The rule questions of one pair (at most a few per family)."""
    c = _Ctx(g, templates, rng)
    steps: list[Callable[[_Ctx], None]] = [_scene] if g.other.modality == "3d" else [_video_objects, _video_relations]
    for step in steps:
        step(c)
    return c.out
