"""Datasets of conversation samples: schema checked up front, media decoded lazily, bad samples reported by id.

`bad_samples: fail` raises `BadSample` naming the file, line and id (all schema problems at once, when the
dataset is opened; a missing or unreadable medium when the sample is first loaded). `bad_samples: skip` logs a
warning with the same details, drops the sample and, at load time, serves the next good sample of the same
dataset instead, so batches keep their size and an epoch never dies halfway.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from moekit.data.config import DataConfig, DatasetSpec
from moekit.data.frames import MissingExtraError
from moekit.data.media import load_media
from moekit.data.preprocess import Preprocessor
from moekit.data.schema import BadSample, Record, Sample, parse_sample, read_records
from moekit.data.teacher_features import TeacherFeatureReader

log = logging.getLogger("moekit.data")
MAX_LISTED = 20


@dataclass
class Entry:
    sample: Sample
    record: Record


class ConversationDataset(Dataset):
    """One `DatasetSpec`: its valid samples, each encoded on access."""

    def __init__(
        self,
        spec: DatasetSpec,
        config: DataConfig,
        preprocessor: Preprocessor | None,
        features: TeacherFeatureReader | None = None,
        base_dir: str | Path | None = None,
    ):
        self.spec, self.config, self.preprocessor, self.features = spec, config, preprocessor, features
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        self.path = Path(spec.path) if Path(spec.path).is_absolute() else base / spec.path
        root = spec.media_root
        self.root = self.path.parent if root is None else (Path(root) if Path(root).is_absolute() else base / root)
        self.entries: list[Entry] = []
        self.skipped: list[str] = []
        problems = []
        for record in read_records(self.path, spec.max_samples):
            try:
                self.entries.append(Entry(parse_sample(record), record))
            except BadSample as exc:
                problems.append(str(exc))
        if problems:
            self._bad(problems, f"{len(problems)} bad sample(s) in {self.path}")

    def _bad(self, problems: list[str], title: str) -> None:
        listed = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"] * (len(problems) > MAX_LISTED))
        if self.config.bad_samples == "fail":
            raise BadSample(title + ":\n  " + "\n  ".join(listed) + "\n(set data.bad_samples: skip to drop them)")
        for problem in problems:
            log.warning("skipping bad sample: %s", problem)
        self.skipped.extend(problems)

    def __len__(self) -> int:
        return len(self.entries)

    def modality(self, index: int) -> str:
        return self.spec.modality or self.entries[index].sample.modality

    def load(self, index: int) -> dict[str, Any]:
        """The encoded sample; `BadSample` (naming file, line, id) when its media or length make it unusable."""
        entry = self.entries[index]
        try:
            media = load_media(entry.sample, self.root, self.config.frames, self.features, self.config.student_frames)
            item = self.preprocessor.encode(entry.sample, media, self.config.max_length, self.config.synergy_tokens)
        except MissingExtraError:
            raise
        except (OSError, ValueError) as exc:
            raise BadSample(f"{entry.record.where}: {exc}") from None
        item["sample_modalities"] = self.modality(index)
        return item

    def missing_media(self) -> list[str]:
        """Samples whose media paths do not exist (a cheap check by stat, nothing decoded)."""
        from moekit.data.media import resolve

        problems = []
        for entry in self.entries:
            s = entry.sample
            paths = [*s.image_paths, *([s.clip[1]] if s.clip else [])]
            if s.paired is not None:
                paths += [p for p in (s.paired.video, s.paired.scene) if p is not None]
            for value in paths:
                if not resolve(self.root, value).exists():
                    problems.append(f"{entry.record.where}: {resolve(self.root, value)} not found")
        return problems


class MixtureDataset(Dataset):
    """Several `ConversationDataset`s behind one flat index (dataset offsets in order)."""

    def __init__(self, parts: list[ConversationDataset]):
        self.parts = parts
        self.offsets = [sum(len(p) for p in parts[:i]) for i in range(len(parts))]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def locate(self, index: int) -> tuple[int, int]:
        for d in range(len(self.parts) - 1, -1, -1):
            if index >= self.offsets[d]:
                return d, index - self.offsets[d]
        raise IndexError(index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        d, i = self.locate(index)
        part = self.parts[d]
        for step in range(len(part)):
            try:
                item = part.load((i + step) % len(part))
            except BadSample as exc:
                if part.config.bad_samples == "fail":
                    raise
                log.warning("skipping bad sample: %s", exc)
                part.skipped.append(str(exc))
                continue
            item["dataset"] = part.spec.name
            return item
        raise BadSample(f"dataset {part.spec.name!r} ({part.path}): no usable sample left")

    def verify(self) -> list[str]:
        """Media paths that do not exist, over every dataset (stat only); run it before training to fail early."""
        return [problem for part in self.parts for problem in part.missing_media()]
