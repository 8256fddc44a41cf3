"""The `data:` section of a recipe stage (and of `moekit routes`, `moekit teach`).

Contract between the data layer and the trainer: `moekit.data` turns a `DataConfig` into an iterable of
collated batches, each a dict with
- model inputs: `input_ids`, `attention_mask`, `labels` (-100 everywhere but answer tokens) and the family's
  visual inputs (e.g. `pixel_values`, `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`,
  `mm_token_type_ids` for Qwen-VL);
- extras the trainer pops before the forward: `sample_ids` (list[str]), `sample_modalities`
  (list[str | None], "3d" marks multi-view scenes fed as video, for routing statistics), and `teacher`
  (dict: `video` / `scene` inputs or cached features for distillation, per sample, None when absent).
  Also `geometry` (per sample: depth / intrinsics / poses of a student 3D scene, for position encoders, None
  otherwise) and `datasets` (per sample: the DatasetSpec name). `moekit.data.EXTRA_KEYS` lists them all and
  `moekit.data.split_batch(batch)` separates them from the model inputs; see moekit/data/media.py for the
  layout of `teacher` and `geometry` entries.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moekit.config import StrictModel

Modality = Literal["text", "image", "video", "3d"]


class DatasetSpec(StrictModel):
    """One dataset file (LLaVA-style JSON or JSONL) and its share of the mixture."""

    name: str
    path: str = Field(description="JSON list or JSONL of samples")
    media_root: str | None = Field(None, description="folder media paths are relative to (default: the file's folder)")
    weight: float = Field(1.0, gt=0.0, description="sampling weight in a weighted mixture")
    max_samples: int | None = Field(None, ge=1)
    modality: Modality | None = Field(None, description="override the modality inferred from each sample")


class FramesSpec(StrictModel):
    """How videos and multi-view scenes become frames (PolyV: at most 32 frames, 640x480)."""

    max_frames: int = Field(32, ge=1)
    sampling: Literal["uniform", "keyframe"] = "uniform"
    max_width: int = Field(640, ge=28)
    max_height: int = Field(480, ge=28)


class DataConfig(StrictModel):
    datasets: list[DatasetSpec] = Field(min_length=1)
    mixing: Literal["weighted", "interleave", "concat"] = "weighted"
    bad_samples: Literal["skip", "fail"] = Field("fail", description="what a missing file or bad schema does")
    frames: FramesSpec = Field(default_factory=FramesSpec)
    max_length: int = Field(2048, ge=16, description="token budget per sample (longer samples are truncated)")
    teacher_cache: str | None = Field(
        None, description="folder written by `moekit teach`, read instead of running teachers"
    )
    seed: int = 0
    samples_per_epoch: int | None = Field(
        None, ge=1, description="draws per epoch for weighted / interleave mixing (default: total dataset size)"
    )
    student_frames: bool = Field(
        False, description="also give teachers each sample's own frames (teacher slots with input: student)"
    )
    synergy_tokens: int = Field(
        0, ge=0, description="<synergy> tokens put after the student's image in paired samples (coarse distillation)"
    )
