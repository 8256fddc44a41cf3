"""`write_synth(out, SynthSpec())`: the synthetic dataset for the tiny PolyV pipeline, written in seconds.

Files (JSONL in the LLaVA-style schema of `moekit.data.schema`, media under `media/`):

    pretrain_captions.jsonl  a description of every training image, video and scene (one turn each): the tiny
                             pipeline's stand-in for the pretraining a real base VLM has had
    stage1_1_3d.jsonl        3D alignment: a scene (multi-view frames + depth + poses) and its description
    stage1_2_image.jsonl     image instructions (colour, shape, count, existence, description), multi-turn
    stage1_2_video.jsonl     video instructions (motion direction, moving colour, description)
    stage1_2_3d.jsonl        3D instructions (object count, colour, description)
    stage2_1_pairs.jsonl     distillation pairs: the student sees an image, `paired` names the teacher's video
                             (the image is the clip's first frame) or 3D scene (the image is one more view)
    teach_video.jsonl        ids + videos of the pairs, for `moekit teach` (the cache is read by these ids)
    teach_scene.jsonl        ids + scene views of the pairs, likewise
    stage2_2_csqa.jsonl      cross-vision QA: image + video or image + scene, questions from paired graphs
    eval.jsonl               held-out multiple-choice questions with `choices`: colour, count, background (images),
                             motion (videos), nearer (a view of a 3D scene), scene_count (a multi-view 3D scene
                             with depth and poses, fed as a video)
    moekit.json              provenance: the moekit version and, as `params`, the spec and each file's sample count
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import Field

from moekit.config import StrictModel
from moekit.config.provenance import Provenance, write_provenance
from moekit.data.scene import write_scene
from moekit.demo.synth import draw2d, render3d
from moekit.demo.synth.questions import (
    MIN_VISIBLE,
    QA,
    image_questions,
    listing,
    scene_pair_questions,
    scene_questions,
    video_pair_questions,
    video_questions,
    view_questions,
)
from moekit.demo.synth.vocab import TEMPLATES
from moekit.io.atomic import atomic_dir

EVAL_TASKS = ("colour", "count", "background", "motion", "nearer", "scene_count")


class SynthSpec(StrictModel):
    """Sizes of the synthetic dataset; everything follows from `seed`."""

    seed: int = 0
    images: int = Field(48, ge=1)
    videos: int = Field(24, ge=1)
    scenes: int = Field(12, ge=1)
    video_pairs: int = Field(24, ge=1)
    scene_pairs: int = Field(12, ge=1)
    eval_per_task: int = Field(16, ge=1)
    width: int = Field(112, ge=56)
    height: int = Field(84, ge=56)
    frames: int = Field(8, ge=2, description="frames per video clip")
    views: int = Field(8, ge=2, description="views per 3D scene")
    image_gap: int = Field(3, ge=0, description="frames between a pair's image and the start of its clip")
    mp4: bool = Field(False, description="store videos as .mp4 (needs the `video` extra) instead of frame folders")


def _conversation(media_prefix: str, qas: list[QA]) -> list[dict]:
    turns = []
    for n, qa in enumerate(qas):
        turns.append({"from": "human", "value": (media_prefix if n == 0 else "") + qa.question})
        turns.append({"from": "gpt", "value": qa.answer})
    return turns


class _Writer:
    def __init__(self, root: Path, spec: SynthSpec):
        self.root, self.spec = root, spec
        self.size = (spec.width, spec.height)
        self.files: dict[str, list[dict]] = {}

    def add(self, file: str, sample: dict) -> None:
        self.files.setdefault(file, []).append(sample)

    def image(self, rel: str, pixels: np.ndarray) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        return rel

    def video(self, rel: str, frames: list[np.ndarray]) -> str:
        if self.spec.mp4:
            from moekit.demo.synth.mp4 import write_mp4

            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            write_mp4(self.root / f"{rel}.mp4", frames)
            return f"{rel}.mp4"
        for t, frame in enumerate(frames):
            self.image(f"{rel}/{t}.png", frame)
        return rel

    def scene(self, rel: str, rng: np.random.Generator, count: int | None = None) -> tuple[str, dict]:
        objects = render3d.random_objects(rng, count or int(rng.integers(2, 4)))
        k = render3d.intrinsics(*self.size, focal=0.9 * self.spec.width)
        poses = render3d.orbit(
            self.spec.views, float(rng.uniform(3.2, 3.8)), float(rng.uniform(1.6, 2.2)), float(rng.uniform(0, 6.3))
        )
        renders = [render3d.render(objects, pose, k, self.size) for pose in poses]
        write_scene(self.root / rel, [r[0] for r in renders], np.stack([r[1] for r in renders]), k, np.stack(poses))
        graph = {
            "objects": [
                {"name": o.name, "shape": o.shape, "colour": o.colour, "centre": list(o.centre), "size": o.size}
                for o in objects
            ]
        }
        (self.root / rel / "scene_graph.json").write_text(json.dumps(graph, indent=1))
        return rel, {"graph": graph, "objects": objects, "k": k}

    def view(self, rel: str, scene: dict, rng: np.random.Generator) -> tuple[str, dict]:
        """One more view of a scene, from closer and at a random angle (so some objects may be out of frame)."""
        angle, radius = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(2.4, 3.2))
        eye = np.array([radius * np.cos(angle), radius * np.sin(angle), float(rng.uniform(1.2, 1.8))])
        target = np.array([float(rng.uniform(-0.8, 0.8)), float(rng.uniform(-0.8, 0.8)), 0.3])
        pose = render3d.look_at(eye, target)
        rgb, _, ids = render3d.render(scene["objects"], pose, scene["k"], self.size)
        objects = [
            {
                "name": o.name,
                "camera": render3d.camera_point(pose, o.middle)[:3].tolist(),
                "visible_pixels": int((ids == i).sum()),
            }
            for i, o in enumerate(scene["objects"])
        ]
        return self.image(rel, rgb), {"objects": objects}


def _caption(w: _Writer, sid: str, media: dict, prefix: str, qas: list[QA]) -> None:
    describe = [qa for qa in qas if qa.task == "describe"]
    w.add("pretrain_captions.jsonl", {"id": f"{sid}-cap", **media, "conversations": _conversation(prefix, describe)})


def _train(w: _Writer, rngs: list[np.random.Generator]) -> None:
    spec = w.spec
    for n in range(spec.images):
        pixels, graph = draw2d.still_image(rngs[0], w.size)
        rel = w.image(f"media/images/img-{n:05d}.png", pixels)
        qas = image_questions(graph, rngs[0])
        _caption(w, f"img-{n:05d}", {"image": rel}, "<image>\n", qas)
        w.add(
            "stage1_2_image.jsonl",
            {
                "id": f"img-{n:05d}",
                "image": rel,
                "conversations": _conversation("<image>\n", qas),
                "meta": {"graph": graph},
            },
        )
    for n in range(spec.videos):
        frames, graph = draw2d.clip(rngs[1], spec.frames, w.size)
        rel = w.video(f"media/videos/vid-{n:05d}", frames)
        _caption(w, f"vid-{n:05d}", {"video": rel}, "<video>\n", video_questions(graph))
        w.add(
            "stage1_2_video.jsonl",
            {
                "id": f"vid-{n:05d}",
                "video": rel,
                "conversations": _conversation("<video>\n", video_questions(graph)),
                "meta": {"graph": graph},
            },
        )
    for n in range(spec.scenes):
        rel, scene = w.scene(f"media/scenes/scn-{n:05d}", rngs[2])
        qas = scene_questions(scene["graph"], rngs[2])
        describe = [qa for qa in qas if qa.task == "describe"]
        _caption(w, f"scn-{n:05d}", {"scene": rel}, "<video>\n", qas)
        w.add(
            "stage1_1_3d.jsonl",
            {"id": f"scn-{n:05d}-align", "scene": rel, "conversations": _conversation("<video>\n", describe)},
        )
        w.add(
            "stage1_2_3d.jsonl", {"id": f"scn-{n:05d}", "scene": rel, "conversations": _conversation("<video>\n", qas)}
        )


def _pairs(w: _Writer, rngs: list[np.random.Generator]) -> None:
    spec = w.spec
    for n in range(spec.video_pairs):
        frames, graph = draw2d.clip(rngs[3], spec.frames, w.size, image_gap=spec.image_gap, events=True)
        pid = f"pv-{n:05d}"
        image = w.image(f"media/pairs/{pid}.png", frames[0])
        video = w.video(f"media/pairs/{pid}-clip", frames[spec.image_gap :])
        caption = image_questions(
            {**graph, "objects": [o for o in graph["objects"] if o["track"][0] is not None]}, rngs[3]
        )[-1]
        w.add(
            "stage2_1_pairs.jsonl",
            {
                "id": pid,
                "image": image,
                "paired": {"video": video},
                "conversations": _conversation("<image>\n", [caption]),
            },
        )
        w.add("teach_video.jsonl", {"id": pid, "video": video})
        qas = video_pair_questions(graph, rngs[3])
        w.add(
            "stage2_2_csqa.jsonl",
            {
                "id": f"{pid}-csqa",
                "image": image,
                "video": video,
                "conversations": _conversation("<image>\n<video>\n", qas),
                "meta": {"graph": graph},
            },
        )
    for n in range(spec.scene_pairs):
        pid = f"ps-{n:05d}"
        rel, scene = w.scene(f"media/pairs/{pid}-scene", rngs[4], count=3)
        image, view = w.view(f"media/pairs/{pid}.png", scene, rngs[4])
        seen = [o["name"] for o in view["objects"] if o["visible_pixels"] >= MIN_VISIBLE]
        answer = (listing(seen) + " " + TEMPLATES["in_room"]) if seen else "no"
        caption = QA("describe", TEMPLATES["describe_image_q"], answer, [])
        w.add(
            "stage2_1_pairs.jsonl",
            {
                "id": pid,
                "image": image,
                "paired": {"scene": rel},
                "conversations": _conversation("<image>\n", [caption]),
            },
        )
        w.add("teach_scene.jsonl", {"id": pid, "scene": f"{rel}/color"})
        qas = scene_pair_questions(view, scene["graph"], rngs[4])
        w.add(
            "stage2_2_csqa.jsonl",
            {
                "id": f"{pid}-csqa",
                "image": image,
                "scene": rel,
                "conversations": _conversation("<image>\n<video>\n", qas),
                "meta": {"view": view, "graph": scene["graph"]},
            },
        )


def _eval(w: _Writer, rng: np.random.Generator) -> None:
    """Held-out multiple-choice questions on media made from a separate random stream."""
    spec = w.spec
    counts = dict.fromkeys(EVAL_TASKS, 0)
    n = 0
    while min(counts.values()) < spec.eval_per_task and n < 50 * spec.eval_per_task:
        kind = EVAL_TASKS[n % len(EVAL_TASKS)]
        n += 1
        if counts[kind] >= spec.eval_per_task:
            continue
        sid = f"eval-{kind}-{counts[kind]:04d}"
        media: dict
        if kind in ("colour", "count", "background"):
            pixels, graph = draw2d.still_image(rng, w.size)
            media, prefix = {"image": w.image(f"media/eval/{sid}.png", pixels)}, "<image>\n"
            qa = next(q for q in image_questions(graph, rng) if q.task == kind)
        elif kind == "motion":
            frames, graph = draw2d.clip(rng, spec.frames, w.size)
            media, prefix = {"video": w.video(f"media/eval/{sid}", frames)}, "<video>\n"
            qa = video_questions(graph)[0]
        elif kind == "scene_count":
            rel, scene = w.scene(f"media/eval/{sid}", rng)
            qa = next(q for q in scene_questions(scene["graph"], rng) if q.task == kind)
            media, prefix = {"scene": rel}, "<video>\n"
        else:
            _, scene = w.scene(f"media/eval/{sid}-scene", rng, count=3)
            image, view = w.view(f"media/eval/{sid}.png", scene, rng)
            found = [q for q in view_questions(view, rng) if q.task == "nearer"]
            if not found:
                continue
            qa, media, prefix = found[0], {"image": image}, "<image>\n"
        choices = _choices(qa, rng)
        w.add(
            "eval.jsonl",
            {"id": sid, **media, "task": kind, "choices": choices, "conversations": _conversation(prefix, [qa])},
        )
        counts[kind] += 1


def _choices(qa: QA, rng: np.random.Generator, most: int = 4) -> list[str]:
    """The answer plus up to `most - 1` distractors, in a random order."""
    others = [c for c in qa.choices if c != qa.answer]
    picked = [qa.answer] + [others[i] for i in rng.permutation(len(others))[: most - 1]]
    return [picked[i] for i in rng.permutation(len(picked))]


def write_synth(out: str | Path, spec: SynthSpec | None = None, overwrite: bool = False) -> dict:
    """Write the dataset to `out` (atomically) and return its manifest (`spec` and sample count per `files`),
    which its `moekit.json` keeps as `params`."""
    spec = spec or SynthSpec()
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(6)]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        w = _Writer(tmp, spec)
        _train(w, rngs)
        _pairs(w, rngs)
        _eval(w, rngs[5])
        for name, samples in w.files.items():
            (tmp / name).write_text("".join(json.dumps(s) + "\n" for s in samples))
        manifest = {
            "spec": spec.model_dump(),
            "files": {name: len(samples) for name, samples in sorted(w.files.items())},
        }
        write_provenance(tmp, Provenance(made_by="moekit synth", params=manifest))
    return manifest
