"""The one writer every converter feeds: streaming JSONL, resume, progress, a summary, atomic completion.

OUT after a complete conversion:

    OUT/data.jsonl       moekit dataset file (one `data.schema.Sample` per line; media paths relative to OUT)
    OUT/skipped.jsonl    one line per source record not converted: {"record": ..., "reason": ...}
    OUT/convert.json     the summary (format, source, options, counts, skip reasons); written last
    OUT/media/...        files a converter writes itself (scene folders, extracted clips), each atomically

While it runs (or after a kill) only hidden `.data.jsonl.partial` / `.skipped.jsonl.partial` / `.convert.partial.json`
exist, so a partial output never looks complete; the next run with the same format, source and options resumes
from them (records already written or skipped are not converted again), anything else is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.data.schema import Sample
from moekit.io.atomic import atomic_write_text
from moekit.io.overlap import check_apart

DATA, SKIPPED, SUMMARY = "data.jsonl", "skipped.jsonl", "convert.json"
MEDIA = "media"
_SYNC_EVERY = 256  # lines between fsyncs of the partial files


@dataclass(frozen=True)
class Converted:
    """One sample for the dataset file; `key` (default: the sample's id) identifies its source record on resume."""

    sample: Sample
    key: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A source record that was not converted, and why (one short reason, grouped in the summary)."""

    record: str
    reason: str


class LayoutError(ValueError):
    """The source is not in the layout the format expects; the message names the file, record and field."""

    def __init__(self, file: str | Path, expected: str, record: str | None = None):
        where = f"{file}" if record is None else f"{file} (record {record})"
        super().__init__(f"{where}: {expected}")


@dataclass
class Context:
    """What a converter gets besides its source: where OUT is and which records are already done."""

    out: Path
    done: set[str] = field(default_factory=set)

    @property
    def media(self) -> Path:
        return self.out / MEDIA

    def is_done(self, key: str) -> bool:
        """True when a resumed run already wrote or skipped this record: skip the expensive part."""
        return key in self.done

    def rel(self, path: str | Path) -> str:
        """A media path as the dataset file stores it: relative to OUT (the default `media_root`)."""
        return os.path.relpath(Path(path).resolve(), self.out.resolve())

    @contextmanager
    def media_dir(self, relative: str | Path) -> Iterator[Path]:
        """A folder under OUT/media written atomically: yields a temporary folder, renamed when the block ends."""
        target = self.media / relative
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, target)


@dataclass
class Summary:
    fmt: str
    out: Path
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    resumed_from: int = 0
    modalities: Counter = field(default_factory=Counter)

    def as_dict(self, src: Path, options: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": self.fmt,
            "source": str(src),
            "options": options,
            "file": DATA,
            "written": self.written,
            "skipped": sum(self.skipped.values()),
            "skip_reasons": dict(self.skipped.most_common()),
            "modalities": dict(self.modalities),
            "complete": True,
        }

    def lines(self) -> list[str]:
        earlier = f" ({self.resumed_from} from an earlier run)" if self.resumed_from else ""
        out = [f"wrote {self.written} samples to {self.out / DATA}{earlier}"]
        media = self.out / MEDIA
        if media.is_dir():
            kinds = {
                d.name: sum(1 for e in d.iterdir() if not e.name.startswith(".")) for d in media.iterdir() if d.is_dir()
            }
            out.append("media: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f" under {media}")
        if self.modalities:
            out.append("  " + ", ".join(f"{k}: {v}" for k, v in sorted(self.modalities.items())))
        total = sum(self.skipped.values())
        if total:
            out.append(f"skipped {total} (listed in {self.out / SKIPPED}):")
            out += [f"  {count:>7}  {reason}" for reason, count in self.skipped.most_common()]
        return out


def _read_partial(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a partial JSONL (a torn last line from a kill is cut off)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(end)
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def sample_line(sample: Sample) -> str:
    record = sample.model_dump(by_alias=True, exclude_none=True)
    if not record.get("meta"):
        record.pop("meta", None)
    return json.dumps(record, ensure_ascii=False)


def write_converted(
    records: Callable[[Context], Iterable[Converted | Skipped]],
    out: Path,
    *,
    fmt: str,
    src: Path,
    options: dict[str, Any],
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    total: int | None = None,
) -> Summary:
    """Run a converter's records into OUT (layout in the module docstring) and return the summary.

    `records(ctx)` yields the items. Refused before anything is written: OUT overlapping the
    source, a complete OUT without `overwrite`, a foreign non-empty OUT, a partial run of other settings.
    """
    check_apart(out, {"the source": src})  # OUT never is, holds or lies inside the source
    meta = {"format": fmt, "source": str(src.resolve()), "options": options}
    partial_meta = out / ".convert.partial.json"
    if (out / SUMMARY).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a complete conversion ({out / SUMMARY}); pass --overwrite")
    if overwrite:
        for name in (DATA, SKIPPED, SUMMARY, f".{DATA}.partial", f".{SKIPPED}.partial", partial_meta.name):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / MEDIA, ignore_errors=True)
    if partial_meta.exists():
        before = json.loads(partial_meta.read_text())
        if not resume:
            raise FileExistsError(f"{out} holds a partial conversion; resume it or pass --overwrite")
        changed = [k for k in meta if before.get(k) != meta[k]]
        if changed:
            raise ValueError(
                f"{out} holds a partial conversion with other {', '.join(changed)} "
                f"({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); use another -o or pass --overwrite"
            )
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no moekit conversion; choose an empty output folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(partial_meta, json.dumps(meta, indent=1))

    data_path, skipped_path = out / f".{DATA}.partial", out / f".{SKIPPED}.partial"
    summary = Summary(fmt=fmt, out=out)
    ctx = Context(out=out)
    for line in _read_partial(data_path):
        ctx.done.add(line.get("meta", {}).get("source_key") or line["id"])
        summary.written += 1
        summary.modalities[Sample.model_validate(line).modality] += 1
    summary.resumed_from = summary.written
    for line in _read_partial(skipped_path):
        ctx.done.add(line["record"])
        summary.skipped[line["reason"]] += 1

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(f"{fmt}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"), disable=not progress,
    )  # fmt: skip
    task = bar.add_task(fmt, total=total, completed=len(ctx.done), note="")
    items = records(ctx)
    pending = 0
    with open(data_path, "a") as data_fh, open(skipped_path, "a") as skip_fh, bar:
        for item in items:
            if isinstance(item, Skipped):
                if item.record in ctx.done:
                    continue
                skip_fh.write(json.dumps({"record": item.record, "reason": item.reason}) + "\n")
                summary.skipped[item.reason] += 1
                ctx.done.add(item.record)
            else:
                key = item.key or item.sample.id
                if key in ctx.done:
                    continue
                sample = item.sample
                if item.key is not None and item.key != sample.id:
                    sample = sample.model_copy(update={"meta": {**sample.meta, "source_key": item.key}})
                data_fh.write(sample_line(sample) + "\n")
                summary.written += 1
                summary.modalities[sample.modality] += 1
                ctx.done.add(key)
            pending += 1
            if pending >= _SYNC_EVERY:
                for fh in (data_fh, skip_fh):
                    fh.flush()
                    os.fsync(fh.fileno())
                pending = 0
            bar.update(task, advance=1, note=f"written {summary.written}, skipped {sum(summary.skipped.values())}")
        for fh in (data_fh, skip_fh):
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(skipped_path, out / SKIPPED)
    os.replace(data_path, out / DATA)
    atomic_write_text(out / SUMMARY, json.dumps(summary.as_dict(src, options), indent=1) + "\n")
    partial_meta.unlink()
    return summary
