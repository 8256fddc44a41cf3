"""Questions grounded in scene graphs: per-modality instructions and cross-vision (CSQA-style) questions.

PolyV's CSQA data was written by a generator LLM from paired scene graphs and kept only where a verifier VLM
gave the same answer. There is no LLM here, so these questions come from fixed templates and are answered from
the graphs directly (which makes every answer correct by construction). Each function returns `QA` items:
task name, question, answer and the candidate answers an evaluation may rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moekit.demo.synth.vocab import BACKGROUNDS, COLOURS, DIRECTIONS, NUMBERS, SHAPES_2D, TEMPLATES

MIN_VISIBLE = 12  # pixels of an object that count as "seen" in a view


@dataclass
class QA:
    task: str
    question: str
    answer: str
    choices: list[str]


def _t(key: str, **fields: str) -> str:
    return TEMPLATES[key].format(**fields)


def listing(names: list[str]) -> str:
    items = [f"a {n}" for n in names]
    return items[0] if len(items) == 1 else " , ".join(items[:-1]) + " and " + items[-1]


def _present(obj: dict, frame: int) -> bool:
    return obj["track"][frame] is not None


def image_questions(graph: dict, rng: np.random.Generator) -> list[QA]:
    objects = graph["objects"]
    obj = objects[int(rng.integers(len(objects)))]
    other = [c for c in COLOURS if c not in {o["colour"] for o in objects}]
    absent = f"{rng.choice(other)} {rng.choice(SHAPES_2D)}"
    probe = obj["name"] if rng.random() < 0.5 else absent
    return [
        QA("colour", _t("colour_q", shape=obj["shape"]), obj["colour"], list(COLOURS)),
        QA("shape", _t("shape_q", colour=obj["colour"]), obj["shape"], list(SHAPES_2D)),
        QA("count", _t("count_q"), NUMBERS[len(objects)], list(NUMBERS[1:4])),
        QA(
            "exists",
            _t("exists_q", colour=probe.split()[0], shape=probe.split()[1]),
            "yes" if probe == obj["name"] else "no",
            ["yes", "no"],
        ),
        QA("background", _t("background_q"), graph["background"], list(BACKGROUNDS)),
        QA(
            "describe",
            _t("describe_image_q"),
            listing([o["name"] for o in objects]) + " " + _t("on_background", background=graph["background"]),
            [],
        ),
    ]


def video_questions(graph: dict) -> list[QA]:
    mover = graph["mover"]
    colour, shape = mover.split()
    return [
        QA("motion", _t("motion_q", colour=colour, shape=shape), graph["direction"], list(DIRECTIONS)),
        QA("moving_colour", _t("moving_colour_q"), colour, list(COLOURS)),
        QA("background", _t("background_q"), graph["background"], list(BACKGROUNDS)),
        QA(
            "describe",
            _t("describe_video_q"),
            f"the {_t('moves', a=mover, direction=graph['direction'])} "
            + _t("on_background", background=graph["background"]),
            [],
        ),
    ]


def scene_questions(graph: dict, rng: np.random.Generator) -> list[QA]:
    objects = graph["objects"]
    out = [
        QA("scene_count", _t("scene_count_q"), NUMBERS[len(objects)], list(NUMBERS[1:5])),
        QA("describe", _t("describe_scene_q"), listing([o["name"] for o in objects]) + " " + _t("in_room"), []),
    ]
    shapes = [o["shape"] for o in objects]
    unique = [o for o in objects if shapes.count(o["shape"]) == 1]
    if unique:
        obj = unique[int(rng.integers(len(unique)))]
        out.append(QA("scene_colour", _t("scene_colour_q", shape=obj["shape"]), obj["colour"], list(COLOURS)))
    return out


def view_questions(view: dict, rng: np.random.Generator) -> list[QA]:
    """Spatial questions about one rendered view of a 3D scene (`view` lists visible objects with camera xyz)."""
    seen = [o for o in view["objects"] if o["visible_pixels"] >= MIN_VISIBLE]
    if len(seen) < 2:
        return []
    a, b = (seen[i] for i in rng.choice(len(seen), 2, replace=False))
    nearer = a if a["camera"][2] < b["camera"][2] else b
    side = "left" if a["camera"][0] / a["camera"][2] < b["camera"][0] / b["camera"][2] else "right"
    pair = [f"the {a['name']}", f"the {b['name']}"]
    return [
        QA("nearer", _t("nearer_q", a=a["name"], b=b["name"]), f"the {nearer['name']}", pair),
        QA("side", _t("side_q", a=a["name"], b=b["name"]), side, ["left", "right"]),
    ]


def video_pair_questions(graph: dict, rng: np.random.Generator) -> list[QA]:
    """Image (frame 0) <-> video (last frames) questions: appearance, disappearance, motion, relations."""
    objects, last = graph["objects"], -1
    names = [f"the {o['name']}" for o in objects]
    out = [QA("moved", _t("moved_q", a=graph["mover"]), graph["direction"], list(DIRECTIONS))]
    new = [o for o in objects if not _present(o, 0) and _present(o, last)]
    gone = [o for o in objects if _present(o, 0) and not _present(o, last)]
    out.append(QA("new_count", _t("new_count_q"), NUMBERS[len(new)], list(NUMBERS[:3])))
    if len(new) == 1:
        out.append(QA("appears", _t("appears_q"), f"the {new[0]['name']}", names))
    if len(gone) == 1:
        out.append(QA("gone", _t("gone_q"), f"the {gone[0]['name']}", names))
    in_image = [o for o in objects if _present(o, 0)]
    probe = in_image[int(rng.integers(len(in_image)))]
    out.append(QA("still", _t("still_q", a=probe["name"]), "yes" if _present(probe, last) else "no", ["yes", "no"]))
    both = [o for o in objects if _present(o, 0) and _present(o, last)]
    if len(both) >= 2:
        a, b = sorted(both[:2], key=lambda o: o["track"][0][0])
        still = a["track"][last][0] < b["track"][last][0]
        out.append(QA("relation", _t("relation_q", a=a["name"], b=b["name"]), "yes" if still else "no", ["yes", "no"]))
    return out


def scene_pair_questions(view: dict, graph: dict, rng: np.random.Generator) -> list[QA]:
    """Image (one view) <-> 3D scene (all views) questions: what the image misses, counts, spatial relations."""
    seen = [o for o in view["objects"] if o["visible_pixels"] >= MIN_VISIBLE]
    hidden = [o for o in view["objects"] if o["visible_pixels"] < MIN_VISIBLE]
    names = [f"the {o['name']}" for o in graph["objects"]]
    out = [QA("image_count", _t("image_count_q"), NUMBERS[len(seen)], list(NUMBERS[:5]))]
    if len(hidden) == 1:
        out.append(QA("hidden", _t("hidden_q"), f"the {hidden[0]['name']}", names))
    return out + view_questions(view, rng)
