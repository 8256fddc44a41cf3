"""Reading benchmark files as released: parquet, JSON / JSONL tables, images embedded in parquet or on disk,
videos in folders or inside the released zip archives. Errors name the file, the row and what is missing."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from moekit.data.config import FramesSpec
from moekit.data.frames import read_video, read_video_stream


def read_table(path: Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a parquet, JSON list or JSONL file as dicts; every `required` column must be there."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading parquet needs pyarrow: pip install 'moekit[eval]'") from None
        table = pq.read_table(path)
        columns = table.column_names
        rows = table.to_pylist()
    else:
        text = path.read_text()
        try:
            if path.suffix == ".jsonl":
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a list of records, got {type(rows).__name__}")
        columns = sorted({k for row in rows if isinstance(row, dict) for k in row})
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has {sorted(columns)}")
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {number} is not a record")
        absent = [c for c in required if c not in row]
        if absent:
            raise ValueError(f"{path}: row {number} (id {row_id(row)!r}) lacks {absent}")
    return rows


def row_id(row: dict[str, Any]) -> Any:
    for key in ("question_id", "index", "idx", "id"):
        if key in row:
            return row[key]
    return None


def cell_image(cell: Any, where: str, root: Path | None = None) -> Image.Image:
    """An image cell as released: the HF `Image` struct (`{bytes, path}`), raw bytes, or a path under `root`."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            cell = cell["bytes"]
        elif cell.get("path"):
            cell = cell["path"]
        else:
            raise ValueError(f"{where}: the image cell has neither bytes nor a path")
    if isinstance(cell, (bytes, bytearray)):
        try:
            return Image.open(io.BytesIO(cell)).convert("RGB")
        except OSError as exc:
            raise ValueError(f"{where}: the image bytes do not decode ({exc})") from None
    if isinstance(cell, str):
        path = Path(cell) if root is None or Path(cell).is_absolute() else root / cell
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image {path} not found")
        with Image.open(path) as image:
            return image.convert("RGB")
    raise ValueError(f"{where}: unreadable image cell of type {type(cell).__name__}")


def _zip_video(archive: Path, member: str, frames: FramesSpec):
    with zipfile.ZipFile(archive) as zf:
        return read_video_stream(lambda: zf.open(member), f"{archive}:{member}", frames)


class ZipIndex:
    """Which released zip under `root` holds which member (read once per benchmark, not per question)."""

    def __init__(self, root: Path, patterns: Sequence[str]):
        self.members: dict[str, Path] = {}
        for pattern in patterns:
            for archive in sorted(root.glob(pattern)):
                with zipfile.ZipFile(archive) as zf:
                    for name in zf.namelist():
                        self.members.setdefault(name, archive)

    def video(self, root: Path, member: str, where: str, frames: FramesSpec, patterns: Sequence[str]):
        extracted = root / member
        if extracted.exists():
            return lambda: read_video(extracted, frames)
        archive = self.members.get(member)
        if archive is None:
            raise FileNotFoundError(
                f"{where}: video {member} is neither under {root} nor inside {', '.join(patterns)} there"
            )
        return lambda: _zip_video(archive, member, frames)
