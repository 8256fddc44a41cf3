"""`llava-pretrain`: LLaVA-1.5-558K (and any LLaVA-style instruction JSON) -> image / text samples.

The released layout (`liuhaotian/LLaVA-Pretrain` on the Hugging Face hub; LLaVA's `docs/Data.md`, read by its
`LazySupervisedDataset` in `llava/train/train.py`):

    LLaVA-Pretrain/
      blip_laion_cc_sbu_558k.json          a JSON list of records (the `_meta.json` beside it is not used)
      images/00453/004539375.jpg           images.zip extracted here (or straight into the folder itself)

    {"id": "004539375", "image": "00453/004539375.jpg",
     "conversations": [{"from": "human", "value": "Render a clear and concise summary of the photo.\\n<image>"},
                       {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]}

LLaVA-style instruction files such as `llava_v1_5_mix665k.json` read the same way: records without "image" are
text-only samples, "image" may be a list (several images), image paths are relative to the `images` folder
(for mix665k the folder holding `coco/`, `gqa/`, `ocr_vqa/`, `textvqa/`, `vg/`). A record with "video" and no
image becomes a video sample (`<image>` tags turn into `<video>`). The JSON is decoded one record at a time.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
from pydantic import Field

from moekit.config import StrictModel
from moekit.data.convert.sink import Context, Converted, LayoutError, Skipped
from moekit.data.schema import IMAGE_TAG, VIDEO_TAG, Sample

DEFAULT_JSON = "blip_laion_cc_sbu_558k.json"
WHAT = "a LLaVA-style JSON list of {'id', 'image', 'conversations': [{'from', 'value'}, ...]} records"
_PROBE = 200  # records looked at (at most) to find the first image when checking the layout
_CHUNK = 1 << 20


class Options(StrictModel):
    json_file: str | None = Field(
        None, description=f"annotation JSON (relative to SRC); default {DEFAULT_JSON} or the folder's only .json"
    )
    images: str | None = Field(None, description="folder image paths are relative to; default SRC/images or SRC")
    check_images: bool = Field(True, description="skip records whose image file does not exist (a stat each)")


# ---- streaming JSON lists (shared with the other LLaVA-style formats) ----


class _Stream:
    """Characters of a text file read in chunks, with the line number of the read position for errors."""

    def __init__(self, fh: Any, path: Path):
        self.fh, self.path = fh, path
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False

    def more(self) -> bool:
        if self.eof:
            return False
        text = self.fh.read(_CHUNK)
        if not text:
            self.eof = True
            return False
        self.line += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos :] + text, 0
        return True

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos : self.pos + 1]

    def error(self, message: str, offset: int | None = None) -> ValueError:
        line = self.line + self.buf.count("\n", 0, self.pos if offset is None else offset)
        return ValueError(f"{self.path}:{line}: not valid JSON ({message})")

    def value(self, decoder: json.JSONDecoder) -> Any:
        self.peek()  # raw_decode does not skip blanks
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if self.more():
                    continue
                raise self.error(exc.msg, exc.pos) from None
            if end == len(self.buf) and self.more():
                continue  # a number may go on in the next chunk
            self.pos = end
            return value


def iter_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    """(index, element) of the top-level JSON list in `path`, decoded one element at a time (bounded memory)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as fh:
        stream = _Stream(fh, path)
        if stream.peek() != "[":
            raise LayoutError(path, f"the file does not hold a JSON list; expected {WHAT}")
        stream.pos += 1
        if stream.peek() == "]":
            return
        index = 0
        while True:
            yield index, stream.value(decoder)
            index += 1
            nxt = stream.peek()
            if nxt == "]":
                return
            if nxt != ",":
                raise stream.error(
                    "expected ',' or ']' after a list element" if nxt else "the file ends inside the list"
                )
            stream.pos += 1


def count_key(path: Path, key: bytes = b'"conversations"') -> int:
    """How many times `key` occurs in the file: the record count of a LLaVA-style JSON, without decoding it
    (inside JSON strings quotes are escaped, so the quoted key only occurs as a key)."""
    total, tail = 0, b""
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            data = tail + chunk
            total += data.count(key)
            tail = data[-(len(key) - 1) :]
            total -= tail.count(key)  # counted again next round
    return total + tail.count(key)


# ---- the layout ----


def annotation_file(src: Path, opts: Options) -> Path:
    if src.is_file():
        if opts.json_file is not None:
            raise LayoutError(src, "SRC is already an annotation file; drop json_file or pass the folder as SRC")
        return src
    if not src.is_dir():
        raise LayoutError(src, f"no such file or folder; expected {DEFAULT_JSON} or the folder holding it")
    if opts.json_file is not None:
        path = Path(opts.json_file) if Path(opts.json_file).is_absolute() else src / opts.json_file
        if not path.is_file():
            raise LayoutError(path, "no such annotation file (option json_file)")
        return path
    if (src / DEFAULT_JSON).is_file():
        return src / DEFAULT_JSON
    found = [p for p in sorted(src.glob("*.json")) if not p.stem.endswith("_meta")]
    if len(found) == 1:
        return found[0]
    if not found:
        raise LayoutError(src, f"no {DEFAULT_JSON} and no other .json here; expected {WHAT}")
    names = ", ".join(p.name for p in found)
    raise LayoutError(src, f"several annotation files ({names}); choose one with --option json_file=NAME")


def record_where(index: int, rec: Any) -> str:
    return f"#{index}" + (f" id {rec.get('id')!r}" if isinstance(rec, dict) and "id" in rec else "")


def check_record(file: Path, index: int, rec: Any) -> None:
    """Field names and types of one LLaVA-style record; LayoutError naming the file, record and field."""
    where = record_where(index, rec)
    if not isinstance(rec, dict):
        raise LayoutError(file, f"a record must be a JSON object; expected {WHAT}", where)
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise LayoutError(file, "expected field 'conversations' (a list of {'from', 'value'} turns)", where)
    for k, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            raise LayoutError(file, f"conversations[{k}]: expected fields 'from' and 'value' (strings)", where)
    for field in ("image", "video"):
        value = rec.get(field)
        paths = value if isinstance(value, list) else [value]
        if value is not None and not (paths and all(isinstance(v, str) for v in paths)):
            raise LayoutError(file, f"expected field '{field}' to be a path (or a list of paths)", where)


def _first_paths(value: Any) -> str:
    return value if isinstance(value, str) else value[0]


def image_root(src: Path, file: Path, opts: Options) -> Path:
    """The folder image paths are relative to: `images`, else SRC/images or SRC, whichever holds the first image."""
    base = src if src.is_dir() else file.parent
    if opts.images is not None:
        root = Path(opts.images) if Path(opts.images).is_absolute() else base / opts.images
        if not root.is_dir():
            raise LayoutError(root, "no such folder (option images)")
        return root
    candidates = [base / "images", base]
    for index, rec in iter_json_list(file):
        if index >= _PROBE:
            break
        check_record(file, index, rec)
        media = rec.get("image") or rec.get("video")
        if media is None:
            continue
        for root in candidates:
            if (root / _first_paths(media)).exists():
                return root
        if not opts.check_images:
            break
        raise LayoutError(
            file,
            f"its image {_first_paths(media)!r} is neither under {candidates[0]} nor under {candidates[1]}; extract "
            "images.zip into SRC/images or pass --option images=DIR",
            record_where(index, rec),
        )
    return candidates[0] if candidates[0].is_dir() else candidates[1]


def check_source(src: Path, opts: Options) -> None:
    file = annotation_file(src, opts)
    image_root(src, file, opts)  # checks the first records and finds the image folder


def count(src: Path, opts: Options) -> int:
    return count_key(annotation_file(src, opts))


# ---- records ----


def convert(rec: dict[str, Any], sample_id: str, root: Path, ctx: Context, opts: Options) -> Sample | str:
    """The sample of one record, or the reason it is skipped."""
    image, video = rec.get("image"), rec.get("video")
    turns = [{"from": t["from"], "value": t["value"]} for t in rec["conversations"]]
    if image is not None:
        key = "image" if isinstance(image, str) else "images"
        paths, missing = ([image] if key == "image" else list(image)), "image not found"
    elif video is not None:
        key, paths, missing = "video", [video], "video not found"
        for turn in turns:
            if turn["from"] == "human":
                turn["value"] = turn["value"].replace(IMAGE_TAG, VIDEO_TAG)
    else:
        key, paths, missing = None, [], ""
    if opts.check_images and any(not (root / p).exists() for p in paths):
        return missing
    stored = [ctx.rel(root / p) for p in paths]
    media = {} if key is None else {key: stored if key == "images" else stored[0]}
    meta = {"source_id": str(rec["id"])} if "id" in rec and str(rec["id"]) != sample_id else {}
    try:
        return Sample.model_validate({"id": sample_id, **media, "conversations": turns, "meta": meta})
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "sample"
        return f"bad sample ({loc}: {str(err['msg']).removeprefix('Value error, ')})"


def unique_id(base: str, seen: Counter) -> str:
    """`base`, or `base#n` for its n-th repeat in the file (some LLaVA mixtures repeat ids)."""
    seen[base] += 1
    return base if seen[base] == 1 else f"{base}#{seen[base] - 1}"


def records(src: Path, ctx: Context, opts: Options) -> Iterator[Converted | Skipped]:
    file = annotation_file(src, opts)
    root = image_root(src, file, opts)
    seen: Counter = Counter()
    for index, rec in iter_json_list(file):
        base = str(rec.get("id", f"{file.stem}-{index}")) if isinstance(rec, dict) else f"{file.stem}-{index}"
        sample_id = unique_id(base, seen)
        if ctx.is_done(sample_id):
            continue
        try:
            check_record(file, index, rec)
        except LayoutError as exc:
            yield Skipped(sample_id, f"malformed record ({str(exc).rsplit(': ', 1)[-1]})")
            continue
        out = convert(rec, sample_id, root, ctx, opts)
        yield Skipped(sample_id, out) if isinstance(out, str) else Converted(out)
