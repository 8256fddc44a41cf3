"""Data: conversation datasets with images, videos and multi-view 3D scenes, mixtures, synthetic data.

The trainer's entry points: `build_loader(config, model_dir, split=..., batch_size=...)` and
`split_batch(batch) -> (model inputs, extras)`; see `moekit/data/config.py` for the batch contract.
"""

from moekit.data.collate import EXTRA_KEYS, Collator, split_batch
from moekit.data.config import DataConfig, DatasetSpec, FramesSpec
from moekit.data.loader import build_dataset, build_loader
from moekit.data.preprocess import Preprocessor
from moekit.data.schema import BadSample, Sample
from moekit.data.stream import iter_batches
from moekit.data.teacher_features import TeacherFeatureReader, open_teacher_cache

__all__ = [
    "EXTRA_KEYS",
    "BadSample",
    "Collator",
    "DataConfig",
    "DatasetSpec",
    "FramesSpec",
    "Preprocessor",
    "Sample",
    "TeacherFeatureReader",
    "build_dataset",
    "build_loader",
    "iter_batches",
    "open_teacher_cache",
    "split_batch",
]
