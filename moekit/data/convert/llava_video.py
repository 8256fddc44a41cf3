"""`llava-video-178k`: LLaVA-Video-178K (`lmms-lab/LLaVA-Video-178K` on the hub) -> video samples.

The released layout (the dataset card's `configs:` and file listing; LLaVA-NeXT's `llava/train/train.py` joins
each record's "video" to the video folder): one folder per duration and source, each holding a caption file, an
open-ended and a multiple-choice QA file, and tarballs that extract next to them:

    LLaVA-Video-178K/
      0_30_s_academic_v0_1/
        0_30_s_academic_v0_1_cap_processed.json        caption        (kind "cap")
        0_30_s_academic_oe_v0_1_qa_processed.json      open-ended QA  (kind "oe")
        0_30_s_academic_mc_v0_1_qa_processed.json      multi-choice   (kind "mc")
        0_30_s_academic_v0_1_videos_1.tar.gz ...       -> academic_source/Charades/RW587.mp4, ...
      0_30_s_youtube_v0_1/ ...  30_60_s_*/  1_2_m_*/  2_3_m_*/   (also *_activitynetqa, *_nextqa, *_perceptiontest)
      llava_hound/sharegptvideo_qa_255k_processed.json          (videos: frame folders from ShareGPTVideo)

    {"id": "RW587", "data_source": "0_30_s_academic_v0_1", "video": "academic_source/Charades/RW587.mp4",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the person doing?"}, {"from": "gpt", ...}]}

LLaVA marks the video with `<image>`; moekit's video slot is `<video>`, so human turns are rewritten. A record's
video is looked up under `video_root` (when given), then its own folder, then SRC. Files are decoded one at a
time, one record at a time. Sample ids are `<file stem>/<record id>` (`#n` added to an id a file repeats).
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import Field, field_validator

from moekit.config import StrictModel
from moekit.data.convert.llava_pretrain import check_record, count_key, iter_json_list, record_where, unique_id
from moekit.data.convert.sink import Context, Converted, LayoutError, Skipped
from moekit.data.schema import IMAGE_TAG, VIDEO_TAG, Sample

Kind = Literal["cap", "oe", "mc"]
KINDS: tuple[Kind, ...] = ("cap", "oe", "mc")
SUFFIX = "_processed.json"
WHAT = "folders like 0_30_s_academic_v0_1/ holding *_cap_processed.json, *_oe_*_qa_processed.json, *_mc_*_qa_processed.json"


def _split(value: Any) -> Any:
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


class Options(StrictModel):
    sources: list[str] | None = Field(
        None, description="folders to read: names or patterns, comma-separated (e.g. '0_30_s_*,*_youtube_v0_1')"
    )
    kinds: list[Kind] = Field(list(KINDS), min_length=1, description="cap, oe and/or mc, comma-separated")
    video_root: str | None = Field(None, description="folder the records' video paths are relative to")
    check_videos: bool = Field(True, description="skip records whose video does not exist (a stat each)")

    @field_validator("sources", "kinds", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split(value)


def file_kind(path: Path) -> Kind:
    """cap / mc from the file name; every other QA file (oe, llava_hound's plain qa) is open-ended."""
    tokens = path.name.removesuffix(SUFFIX).split("_")
    return "cap" if "cap" in tokens else "mc" if "mc" in tokens else "oe"


def buckets(src: Path) -> list[Path]:
    """The source folders: SRC itself when it holds annotation files, else its subfolders that do."""
    if not src.is_dir():
        raise LayoutError(src, f"no such folder; expected the dataset folder with {WHAT}")
    if any(src.glob(f"*{SUFFIX}")):
        return [src]
    found = sorted(d for d in src.iterdir() if d.is_dir() and any(d.glob(f"*{SUFFIX}")))
    if not found:
        raise LayoutError(src, f"no annotation files here; expected {WHAT}")
    return found


def selected_files(src: Path, opts: Options) -> list[tuple[Path, Path]]:
    """(source folder, annotation file) pairs the options select: folders by name, then cap, oe, mc."""
    folders = buckets(src)
    if opts.sources is not None:
        unknown = [p for p in opts.sources if not any(fnmatch.fnmatchcase(d.name, p) for d in folders)]
        if unknown:
            names = ", ".join(d.name for d in folders)
            raise LayoutError(src, f"option sources: {', '.join(unknown)} match no folder; found {names}")
        folders = [d for d in folders if any(fnmatch.fnmatchcase(d.name, p) for p in opts.sources)]
    order = {kind: i for i, kind in enumerate(KINDS)}
    files = [
        (d, f)
        for d in folders
        for f in sorted(d.glob(f"*{SUFFIX}"), key=lambda f: (order[file_kind(f)], f.name))
        if file_kind(f) in opts.kinds
    ]
    if not files:
        raise LayoutError(src, f"no annotation file of kind {', '.join(opts.kinds)} in the selected folders")
    return files


def check_source(src: Path, opts: Options) -> None:
    if opts.video_root is not None and not Path(opts.video_root).is_dir():
        raise LayoutError(opts.video_root, "no such folder (option video_root)")
    for _, file in selected_files(src, opts):
        for index, rec in iter_json_list(file):
            check_record(file, index, rec)
            if not isinstance(rec.get("video"), str):
                raise LayoutError(file, "expected field 'video' (the video's path, a string)", record_where(index, rec))
            break


def count(src: Path, opts: Options) -> int:
    return sum(count_key(file) for _, file in selected_files(src, opts))


def find_video(value: str, folder: Path, src: Path, opts: Options) -> Path | None:
    roots = [Path(opts.video_root)] if opts.video_root is not None else [folder, src]
    for root in roots:
        if (root / value).exists():
            return root / value
    return None if opts.check_videos else roots[0] / value


def convert(rec: dict[str, Any], sample_id: str, kind: Kind, video: Path, ctx: Context) -> Sample | str:
    turns = [
        {"from": t["from"], "value": t["value"].replace(IMAGE_TAG, VIDEO_TAG) if t["from"] == "human" else t["value"]}
        for t in rec["conversations"]
    ]
    meta = {"kind": kind, **({"data_source": rec["data_source"]} if "data_source" in rec else {})}
    try:
        return Sample.model_validate({"id": sample_id, "video": ctx.rel(video), "conversations": turns, "meta": meta})
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "sample"
        return f"bad sample ({loc}: {str(err['msg']).removeprefix('Value error, ')})"


def records(src: Path, ctx: Context, opts: Options) -> Iterator[Converted | Skipped]:
    for folder, file in selected_files(src, opts):
        kind, stem, seen = file_kind(file), file.name.removesuffix(SUFFIX), Counter()
        for index, rec in iter_json_list(file):
            rid = rec.get("id", index) if isinstance(rec, dict) else index
            sample_id = unique_id(f"{stem}/{rid}", seen)
            if ctx.is_done(sample_id):
                continue
            try:
                check_record(file, index, rec)
                if not isinstance(rec.get("video"), str):
                    raise LayoutError(file, "no 'video' field")
            except LayoutError as exc:
                yield Skipped(sample_id, f"malformed record ({str(exc).rsplit(': ', 1)[-1]})")
                continue
            video = find_video(rec["video"], folder, src, opts)
            if video is None:
                yield Skipped(sample_id, "video not found")
                continue
            out = convert(rec, sample_id, kind, video, ctx)
            yield Skipped(sample_id, out) if isinstance(out, str) else Converted(out)
