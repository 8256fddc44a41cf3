"""`llava-3d`: LLaVA-3D-Instruct JSONs over ScanNet scenes -> 3D samples fed through moekit's `<video>` slot.

SRC is one instruction file or a folder of them (`llava3d_scannet_*.json` from the `ChaimZhu/llava-3d-instruct`
dataset): a JSON list of LLaVA-style records, as LLaVA-3D's `docs/fintune_custom_data.md` and its loader
(`llava/train/train.py`, `llava/model/multimodal_encoder/video_processor.py`) read them:

    {"id": 0, "video": "scannet/scene0011_00",                      # a whole scene, or a list of its views:
     #  "video": ["scannet/posed_images/scene0678_00/01000.jpg", ...]
     "target": {"boxes": [[x, y, z, ...], ...]},                    # optional: object positions (axis-aligned)
     "conversations": [{"from": "human", "value": "<video>\\nThe related object is located at <boxes>. ...",
                        "boxes_seq": [[0]]},
                       {"from": "gpt", "value": "..."}]}            # an answer may be a list of strings

`scenes` names a folder of ScanNet scene folders `<scene_id>/`: the user's `posed_images/`, or
`OUT/media/scenes` of a `moekit data convert scannet` run. A whole-scene record's sample points into that folder
(no copy); a view list becomes OUT/media/views/<scene_id>-<digest>/ holding hard links to just those views
(`frames: scene` uses the whole scene instead). LLaVA-3D replaces `<boxes>` / `<points>` with learned click
embeddings of each box's first three numbers; moekit writes them as text, `[x, y, z]` to 3 decimals (the form of
LLaVA-3D's demo prompts). Those coordinates are in ScanNet's axis-aligned frame, so records using them need
axis-aligned scene folders (a `scannet` conversion with `scans`), or `boxes: skip`. `<video>` / `<image>` tags
move to the start of the first human turn as one `<video>`; a list answer keeps its first entry.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import pydantic
from pydantic import Field

from moekit.config import StrictModel
from moekit.data.convert.scene_out import is_scene_folder, read_json, read_record, scene_views, subset_scene
from moekit.data.convert.sink import Context, Converted, LayoutError, Skipped
from moekit.data.schema import IMAGE_TAG, VIDEO_TAG, Sample

PLACEHOLDERS = {"<boxes>": ("boxes", "boxes_seq"), "<points>": ("points", "points_seq")}
WHAT = "a LLaVA-3D instruction file: a JSON list of {'video', 'conversations'} records"


class Options(StrictModel):
    scenes: str = Field(description="folder of ScanNet scene folders <scene_id>/ (posed_images or a scannet output)")
    frames: Literal["views", "scene"] = Field("views", description="a view list: just those views, or the scene")
    boxes: Literal["text", "skip"] = Field("text", description="records with <boxes>/<points>: coordinates as text")


class _Skip(Exception):
    """A record that cannot be converted; the message is the skip reason."""


def source_files(src: Path) -> list[Path]:
    if src.is_dir():
        files = sorted(src.glob("*.json"))
        if not files:
            raise LayoutError(src, f"no .json files; expected {WHAT}")
        return files
    return [src]


def _records(file: Path) -> list[dict[str, Any]]:
    data = read_json(file, WHAT)
    if not isinstance(data, list):
        raise LayoutError(file, f"the top level is a {type(data).__name__}; expected {WHAT}")
    return data


def _check_record(file: Path, index: int, rec: Any) -> None:
    """Structure only (field names and types); content that moekit cannot use is skipped later, with a reason."""
    where = f"#{index}" + (f" id {rec.get('id')!r}" if isinstance(rec, dict) and "id" in rec else "")

    def bad(expected: str) -> LayoutError:
        return LayoutError(file, expected, where)

    if not isinstance(rec, dict):
        raise bad(f"expected a JSON object; {WHAT}")
    video = rec.get("video")
    if not (isinstance(video, str) or (isinstance(video, list) and video and all(isinstance(v, str) for v in video))):
        raise bad("expected 'video': a scene 'scannet/<scene_id>' or a list of its posed images")
    turns = rec.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise bad("expected 'conversations': a list of at least two {'from', 'value'} turns")
    for turn in turns:
        value = turn.get("value") if isinstance(turn, dict) else None
        if not (
            isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
        ):
            raise bad("expected every turn to be {'from': 'human' | 'gpt', 'value': text}")
        if turn.get("from") not in ("human", "gpt", "system"):
            raise bad(f"expected 'from' to be 'human' or 'gpt', got {turn.get('from')!r}")
    target = rec.get("target")
    if target is not None and not isinstance(target, dict):
        raise bad("expected 'target' to be an object with 'boxes' / 'points'")


def parse_video(video: str | list[str]) -> tuple[str, str, list[int] | None]:
    """(dataset, scene id, listed frame numbers or None for the whole scene) of a record's `video`."""
    items = [video] if isinstance(video, str) else video
    if isinstance(video, str) and not video.lower().endswith((".jpg", ".jpeg", ".png")):
        parts = PurePosixPath(video).parts
        if len(parts) < 2:
            raise _Skip("'video' is not '<dataset>/<scene_id>'")
        return parts[0], parts[-1], None
    scenes, numbers = set(), []
    for item in items:
        path = PurePosixPath(item)
        if len(path.parts) < 3 or not path.stem.isdigit():
            raise _Skip("a listed view is not '<dataset>/posed_images/<scene_id>/<frame>.jpg'")
        scenes.add((path.parts[0], path.parts[-2]))
        numbers.append(int(path.stem))
    if len(scenes) != 1:
        raise _Skip("listed views come from several scenes")
    dataset, scene_id = scenes.pop()
    return dataset, scene_id, numbers


def _uses_coords(rec: dict[str, Any]) -> bool:
    return any(
        seq in turn or tag in turn["value"]
        for turn in rec["conversations"]
        if isinstance(turn["value"], str)
        for tag, (_, seq) in PLACEHOLDERS.items()
    )


def _point(item: Any) -> str:
    if not isinstance(item, list) or len(item) < 3 or not all(isinstance(x, int | float) for x in item[:3]):
        raise _Skip("a target box / point is not a list of at least three numbers")
    return "[" + ", ".join(f"{float(x):.3f}" for x in item[:3]) + "]"


def _fill(text: str, turn: dict[str, Any], target: dict[str, Any]) -> str:
    """`<boxes>` / `<points>` replaced by the coordinates their `*_seq` group names, in order."""
    for tag, (key, seq_key) in PLACEHOLDERS.items():
        seq = turn.get(seq_key)
        if tag not in text and seq is None:
            continue
        items = target.get(key)
        if not isinstance(seq, list) or not isinstance(items, list) or text.count(tag) != len(seq):
            raise _Skip(f"{tag} placeholders do not match target.{key} / {seq_key}")
        parts = text.split(tag)
        out = parts[0]
        for group, rest in zip(seq, parts[1:]):
            try:
                out += ", ".join(_point(items[j]) for j in group) + rest
            except (IndexError, TypeError):
                raise _Skip(f"{seq_key} names a {key[:-1]} that target.{key} lacks") from None
        text = out
    return text


def convert_turns(rec: dict[str, Any]) -> tuple[list[dict[str, str]], list[str] | None]:
    """moekit turns (one `<video>` at the start of the first human turn) and, for a list answer, all its entries."""
    target = rec.get("target") or {}
    turns, answers = [], None
    for turn in rec["conversations"]:
        value = turn["value"]
        if turn["from"] == "gpt":
            if isinstance(value, list):
                answers = answers or (value if len(value) > 1 else None)
                value = value[0]
            if "<LOC>" in value:
                raise _Skip("answer uses LLaVA-3D's <LOC> grounding token (not text)")
        elif isinstance(value, list):
            raise _Skip("a human turn holds a list")
        else:
            value = _fill(value, turn, target).replace(VIDEO_TAG, "").replace(IMAGE_TAG, "").strip()
        turns.append({"from": turn["from"], "value": value})
    first = next((t for t in turns if t["from"] == "human"), None)
    if first is None:
        raise _Skip("no human turn")
    first["value"] = f"{VIDEO_TAG}\n{first['value']}"
    return turns, answers


def check_source(src: Path, opts: Options) -> None:
    _frame_numbers.cache_clear()  # a new run lists the scene folders afresh
    scenes = Path(opts.scenes)
    if not scenes.is_dir() or not any(is_scene_folder(p) for p in scenes.iterdir() if p.is_dir()):
        raise LayoutError(scenes, "expected a folder of ScanNet scene folders <scene_id>/ (option scenes)")
    checked: set[str] = set()
    for file in source_files(src):
        for index, rec in enumerate(_records(file)):
            _check_record(file, index, rec)
            try:
                dataset, scene_id, _ = parse_video(rec["video"])
            except _Skip:
                continue
            folder = scenes / scene_id
            if dataset != "scannet" or not folder.is_dir():
                continue
            if scene_id not in checked:
                scene_views(folder)  # a broken scene folder is refused now, before OUT is touched
                checked.add(scene_id)
            if opts.boxes == "text" and _uses_coords(rec) and not read_record(folder).get("axis_aligned"):
                raise LayoutError(
                    folder,
                    "record gives object coordinates in ScanNet's axis-aligned frame (<boxes>/<points>) but this scene "
                    "folder's poses are not axis-aligned (scene.json 'axis_aligned'): convert the scenes with "
                    "`moekit data convert scannet ... --option scans=SCANNET/scans` or pass --option boxes=skip",
                    f"{file.name} #{index}",
                )


def count(src: Path, opts: Options) -> int:
    return sum(len(_records(f)) for f in source_files(src))


@functools.lru_cache(maxsize=64)
def _frame_numbers(folder: Path) -> frozenset[int]:
    return frozenset(v.number for v in scene_views(folder))


def _scene_path(ctx: Context, folder: Path, scene_id: str, frames: list[int] | None, opts: Options) -> Path:
    if frames is None or opts.frames == "scene":
        return folder
    missing = [n for n in frames if n not in _frame_numbers(folder)]
    if missing:
        raise _Skip("a listed view is not in the scene folder")
    digest = hashlib.sha1(",".join(map(str, frames)).encode()).hexdigest()[:12]
    rel = Path("views") / f"{scene_id}-{digest}"
    if not (ctx.media / rel).is_dir():  # shared by records listing the same views; complete once it exists
        with ctx.media_dir(rel) as tmp:
            subset_scene(folder, frames, tmp, "link")
    return ctx.media / rel


def convert(rec: dict[str, Any], key: str, file: Path, ctx: Context, opts: Options) -> Sample:
    dataset, scene_id, frames = parse_video(rec["video"])
    if dataset != "scannet":
        raise _Skip(f"not a ScanNet scene (dataset {dataset!r})")
    folder = Path(opts.scenes) / scene_id
    if not folder.is_dir():
        raise _Skip("scene folder not found under the scenes option")
    if opts.boxes == "skip" and _uses_coords(rec):
        raise _Skip("uses <boxes>/<points> coordinates (boxes: skip)")
    turns, answers = convert_turns(rec)
    meta = {"file": file.name, "source_id": rec.get("id"), "prompt_id": rec.get("prompt_id"), "answers": answers}
    if frames is not None:
        meta["frames"] = frames
    scene = _scene_path(ctx, folder, scene_id, frames, opts)
    return Sample.model_validate(
        {
            "id": key,
            "scene": ctx.rel(scene),
            "conversations": turns,
            "meta": {k: v for k, v in meta.items() if v is not None},
        }
    )


def records(src: Path, ctx: Context, opts: Options) -> Iterator[Converted | Skipped]:
    for file in source_files(src):
        for index, rec in enumerate(_records(file)):
            key = f"{file.stem}-{index}"
            if ctx.is_done(key):
                continue
            try:
                yield Converted(convert(rec, key, file, ctx, opts))
            except _Skip as exc:
                yield Skipped(key, str(exc))
            except pydantic.ValidationError as exc:  # e.g. turns that do not alternate human / gpt
                problem = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
                yield Skipped(key, f"does not fit moekit's sample schema: {problem}")
