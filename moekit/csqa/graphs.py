"""Paired scene graphs: the image side and the video (or 3D) side of one pair, with cross-modal object links.

A `PairedGraph` is what every loader yields and every generator reads. Object ids are the dataset's own (PVSG
`object_id`, Action Genome class name, 3RScan instance id, as strings); `links` join an image-side object to the
same object on the other side. Boxes are `(x1, y1, x2, y2)` pixels of that side's frames; a video-side object
has its box at the clip's first (`box`) and last (`box_end`) frame where it is seen. A video-side relation has
`spans`: where in the clip it holds, as fractions of the clip (0 = first frame, 1 = last).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

import pydantic
from pydantic import Field

from moekit.config import StrictModel
from moekit.data.convert.sink import LayoutError  # one error for every released layout moekit reads

Box = tuple[float, float, float, float]
Source = Literal["pvsg", "action-genome", "3dssg"]
M = TypeVar("M", bound=pydantic.BaseModel)


class Obj(StrictModel):
    id: str
    label: str
    attributes: list[str] = Field(default_factory=list)
    box: Box | None = None
    box_end: Box | None = None
    depth: float | None = Field(None, description="distance from the camera in metres (3D pairs' image side)")


class Relation(StrictModel):
    subject: str
    predicate: str
    object: str
    kind: str | None = Field(None, description="the dataset's relation group, e.g. Action Genome's 'contacting'")
    spans: list[tuple[float, float]] | None = None


class SideGraph(StrictModel):
    modality: Literal["image", "video", "3d"]
    objects: list[Obj]
    relations: list[Relation] = Field(default_factory=list)
    size: tuple[int, int] | None = Field(None, description="frame (width, height) the boxes refer to")

    def find(self, oid: str) -> Obj | None:
        return next((o for o in self.objects if o.id == oid), None)

    def label(self, oid: str) -> str:
        obj = self.find(oid)
        return obj.label if obj is not None else oid

    def unique(self) -> list[Obj]:
        """Objects whose label is unique on this side (so 'the cup' names one thing)."""
        labels = [o.label for o in self.objects]
        return [o for o in self.objects if labels.count(o.label) == 1]


class Link(StrictModel):
    image: str
    other: str


class SceneView(StrictModel):
    """One view of a 3D scene as released: colour image, depth map (optional), camera-to-world pose."""

    color: str
    depth: str | None = None
    pose: list[list[float]]


class PairMedia(StrictModel):
    """Source files of a pair: the image, and the clip's frames (video) or the scene's views and intrinsics."""

    image: str
    frames: list[str] | None = None
    views: list[SceneView] | None = None
    intrinsics: list[list[float]] | None = None


class PairedGraph(StrictModel):
    id: str
    source: Source
    image: SideGraph
    other: SideGraph
    links: list[Link]
    media: PairMedia

    @property
    def other_name(self) -> str:
        """How prompts name the other side: 'video' or '3D scene'."""
        return "video" if self.other.modality == "video" else "3D scene"

    def linked(self) -> list[tuple[Obj, Obj]]:
        """(image object, other-side object) for every link."""
        pairs = []
        for link in self.links:
            a, b = self.image.find(link.image), self.other.find(link.other)
            if a is not None and b is not None:
                pairs.append((a, b))
        return pairs


def graph_text(side: SideGraph) -> str:
    """One side as compact JSON for prompts: objects (id, label, attributes, boxes) and relations."""
    data = side.model_dump(mode="json", exclude_none=True, exclude={"modality"})
    for obj in data["objects"]:
        if not obj.get("attributes"):
            obj.pop("attributes", None)
    return json.dumps(data, separators=(", ", ": "))


class SourceRecord(pydantic.BaseModel):
    """Base of the models that check released annotation records: typed fields, other keys ignored (the releases
    carry more than the builder reads)."""

    model_config = pydantic.ConfigDict(extra="ignore")


def check_record(model: type[M], data: object, file: str | Path, record: str | None, what: str) -> M:
    """`data` validated against `model`, or a `LayoutError` naming the file, the record and the field."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "<record>"
        raise LayoutError(file, f"field {loc!r}: {err['msg']} (expected {what})", record) from None
