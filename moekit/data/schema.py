"""The strict schema of one conversation sample (LLaVA style) and the reader of JSON / JSONL files.

A sample:

    {"id": "img-0001",
     "image": "images/0001.png",            # or "images": [...]; or "video": a frame folder or an .mp4;
                                            # or "scene": a ScanNet-style folder (see moekit.data.scene)
     "paired": {"video": "...", "scene": "..."},   # distillation: what the teacher sees (optional)
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                       {"from": "gpt", "value": "red"}],
     "choices": ["red", "blue"], "task": "colour"}  # evaluation only: candidate answers, report group

`<image>` marks where each image goes (in order), `<video>` where the video or scene goes; when a sample has
media but no placeholder, the placeholders are put at the start of the first human turn (LLaVA convention).
Unknown keys are errors; free-form extras go under `meta`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import Field, field_validator, model_validator

from moekit.config import StrictModel

IMAGE_TAG, VIDEO_TAG = "<image>", "<video>"


class Turn(StrictModel):
    role: Literal["human", "gpt", "system"] = Field(alias="from")
    value: str


class Paired(StrictModel):
    """What a distillation teacher sees for this sample (the student sees the sample's image)."""

    video: str | None = None
    scene: str | None = None

    @model_validator(mode="after")
    def _some(self) -> Paired:
        if self.video is None and self.scene is None:
            raise ValueError("paired needs a video or a scene (or both)")
        return self


class Sample(StrictModel):
    id: str = Field(min_length=1)
    image: str | None = None
    images: list[str] | None = None
    video: str | None = None
    scene: str | None = None
    paired: Paired | None = None
    conversations: list[Turn] = Field(min_length=2)
    choices: list[str] | None = Field(None, min_length=2)
    task: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _check(self) -> Sample:
        if self.image is not None and self.images is not None:
            raise ValueError("give either 'image' or 'images', not both")
        if self.video is not None and self.scene is not None:
            raise ValueError("give either 'video' or 'scene', not both (one <video> slot per sample)")
        turns = [t for t in self.conversations if t.role != "system"]
        if self.conversations[0].role == "system" and len(turns) == len(self.conversations) - 1:
            pass
        elif len(turns) != len(self.conversations):
            raise ValueError("a 'system' turn may only come first")
        for i, turn in enumerate(turns):
            want = "human" if i % 2 == 0 else "gpt"
            if turn.role != want:
                raise ValueError(f"conversations must alternate human/gpt starting with human; turn {i} is {turn.role}")
            if turn.role == "gpt" and (IMAGE_TAG in turn.value or VIDEO_TAG in turn.value):
                raise ValueError(f"turn {i}: media placeholders belong in human turns, not in answers")
        if turns[-1].role != "gpt":
            raise ValueError("the last turn must be a gpt answer")
        self._check_placeholders()
        if self.choices is not None and turns[-1].value not in self.choices:
            raise ValueError(f"the answer {turns[-1].value!r} is not among choices {self.choices}")
        return self

    def _check_placeholders(self) -> None:
        text = "".join(t.value for t in self.conversations if t.role == "human")
        for tag, want in ((IMAGE_TAG, len(self.image_paths)), (VIDEO_TAG, int(self.clip is not None))):
            have = text.count(tag)
            if have and have != want:
                raise ValueError(f"{have} {tag} placeholder(s) but {want} {tag[1:-1]}(s) given")

    @property
    def image_paths(self) -> list[str]:
        return [self.image] if self.image is not None else list(self.images or [])

    @property
    def clip(self) -> tuple[Literal["video", "scene"], str] | None:
        """The student's `<video>` input: ("video", path) or ("scene", path), or None."""
        if self.video is not None:
            return "video", self.video
        if self.scene is not None:
            return "scene", self.scene
        return None

    @property
    def modality(self) -> str:
        """ "3d" for scenes, "video", "image", else "text" (a paired sample is an image sample: the student's view)."""
        if self.scene is not None:
            return "3d"
        if self.video is not None:
            return "video"
        return "image" if self.image_paths else "text"

    def human_texts(self) -> list[str]:
        """Human turn texts with missing placeholders put at the start of the first human turn."""
        roles = [t.role for t in self.conversations]
        return with_placeholders(roles, [t.value for t in self.conversations], len(self.image_paths), self.clip)


def with_placeholders(roles: list[str], texts: list[str], images: int, clip: object) -> list[str]:
    """`texts` with the media placeholders a conversation lacks put at the start of its first human turn: one
    `<image>` per image when none is written, `<video>` when there is a clip and none is written."""
    out = list(texts)
    text = "".join(v for r, v in zip(roles, out) if r == "human")
    prefix = ""
    if images and IMAGE_TAG not in text:
        prefix += (IMAGE_TAG + "\n") * images
    if clip is not None and VIDEO_TAG not in text:
        prefix += VIDEO_TAG + "\n"
    first = roles.index("human")
    out[first] = prefix + out[first]
    return out


@dataclass(frozen=True)
class Record:
    """A raw sample and where it came from, for error messages: `file:line (id 'x')`."""

    data: Any
    file: Path
    line: int | None  # JSONL line (1-based), or None for an element of a JSON list
    index: int

    @property
    def where(self) -> str:
        place = f"{self.file}:{self.line}" if self.line is not None else f"{self.file}[{self.index}]"
        sample_id = self.data.get("id") if isinstance(self.data, dict) else None
        return f"{place} (id {sample_id!r})" if sample_id is not None else place


class BadSample(ValueError):
    """A sample that cannot be used; the message names its file, line and id."""


def read_records(path: str | Path, max_samples: int | None = None) -> Iterator[Record]:
    """Yield the records of a JSON list or JSONL file; a syntax error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    text = path.read_text()
    stripped = text.lstrip()
    if path.suffix == ".json" or stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: a .json data file must hold a list of samples")
        for i, item in enumerate(items[:max_samples]):
            yield Record(item, path, None, i)
        return
    count = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if max_samples is not None and count >= max_samples:
            return
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            item = _Unparsed(f"not valid JSON ({exc.msg})")
        yield Record(item, path, number, count)
        count += 1


class _Unparsed(dict):
    """Stands in for a JSONL line that did not parse, so the error surfaces with the other bad samples."""

    def __init__(self, message: str):
        super().__init__()
        self.message = message


def parse_sample(record: Record) -> Sample:
    """Validate one record; `BadSample` lists every problem with the record's file, line and id."""
    if isinstance(record.data, _Unparsed):
        raise BadSample(f"{record.where}: {record.data.message}")
    if not isinstance(record.data, dict):
        raise BadSample(f"{record.where}: a sample must be a JSON object, got {type(record.data).__name__}")
    try:
        return Sample.model_validate(record.data)
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<sample>"
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (put free-form fields under 'meta')"
            problems.append(f"{loc}: {msg}")
        raise BadSample(f"{record.where}: " + "; ".join(problems)) from None
