"""`build_loader(config, model_dir)`: the one call the trainer makes to turn a `DataConfig` into batches."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch.utils.data import DataLoader

from moekit.data.collate import Collator
from moekit.data.config import DataConfig
from moekit.data.dataset import ConversationDataset, MixtureDataset
from moekit.data.mixture import MixtureSampler
from moekit.data.preprocess import Preprocessor
from moekit.data.teacher_features import TeacherFeatureReader, open_teacher_cache

Split = Literal["train", "eval"]


def build_dataset(
    config: DataConfig,
    preprocessor: Preprocessor | str | Path,
    *,
    base_dir: str | Path | None = None,
    features: TeacherFeatureReader | None = None,
) -> MixtureDataset:
    """All datasets of `config`, schema-checked now (bad samples fail or are skipped per `bad_samples`).

    `preprocessor` is a `Preprocessor` or a model folder to build one from; relative dataset paths resolve
    against `base_dir` (default: the working directory). `features` overrides `config.teacher_cache`.
    """
    if not isinstance(preprocessor, Preprocessor):
        preprocessor = Preprocessor.from_dir(preprocessor)
    if features is None and config.teacher_cache is not None:
        cache = Path(config.teacher_cache)
        features = open_teacher_cache(cache if cache.is_absolute() or base_dir is None else Path(base_dir) / cache)
    return MixtureDataset(
        [ConversationDataset(spec, config, preprocessor, features, base_dir) for spec in config.datasets]
    )


def build_loader(
    config: DataConfig,
    preprocessor: Preprocessor | str | Path,
    *,
    split: Split = "train",
    batch_size: int = 1,
    num_workers: int = 0,
    base_dir: str | Path | None = None,
    features: TeacherFeatureReader | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A torch `DataLoader` of collated batches.

    `split="train"` visits the mixture per `config.mixing`, shuffled with `config.seed` (call
    `loader.sampler.set_epoch(e)` each epoch, as accelerate does); `split="eval"` visits every sample once in
    file order. Works with `accelerator.prepare(loader)` for distributed sharding.
    """
    dataset = build_dataset(config, preprocessor, base_dir=base_dir, features=features)
    sampler = MixtureSampler(
        [len(p) for p in dataset.parts],
        [p.spec.weight for p in dataset.parts],
        config.mixing,
        seed=config.seed,
        num_samples=config.samples_per_epoch,
        shuffle=split == "train",
    )
    pad_id = dataset.parts[0].preprocessor.pad_id
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=Collator(pad_id),
        num_workers=num_workers,
        drop_last=drop_last,
    )
