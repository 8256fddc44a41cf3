"""Visual inputs of one model family: token ids to put in the text for each image / video, and the pixel tensors.

Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) use moekit's own patchify (`moekit.data.qwen_vision`), since
their stock processors cannot be built without torchvision. Other families go through the model's own HF
processor loaded offline from the model folder (images only): the processor expands one image placeholder into
the family's visual tokens, so moekit never has to know a family's token count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from moekit.data.qwen_vision import QwenPixelConfig, image_patches, video_patches, video_size

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TOKEN_TYPE_FAMILIES = ("gemma3", "paligemma")  # take `token_type_ids` (1 on image tokens)


@dataclass
class Segment:
    """Token ids standing for one medium in the text, and its model inputs (concatenated along dim 0 in a batch)."""

    ids: list[int]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    size: tuple[int, int] | None = None  # (width, height) the frames were resized to, for geometry


class Vision(Protocol):
    family: str
    supports_video: bool

    def image(self, image: Image.Image) -> Segment: ...

    def video(self, frames: list[Image.Image]) -> Segment: ...

    def token_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]: ...


class QwenVision:
    """Qwen-VL: `<|vision_start|>` + one pad token per merged patch + `<|vision_end|>` for each medium."""

    supports_video = True

    def __init__(self, family: str, config: Any, pixels: QwenPixelConfig):
        self.family = family
        self.pixels = pixels
        self.image_id = int(config.image_token_id)
        self.video_id = int(config.video_token_id)
        self.start_id = int(config.vision_start_token_id)
        self.end_id = int(config.vision_end_token_id)

    def wrap_tokens(self, token: int, count: int, chunks: int = 1) -> list[int]:
        """`count` media tokens in `chunks` runs, each between the vision start and end tokens."""
        per = count // chunks
        return [self.start_id, *[token] * per, self.end_id] * chunks

    def image(self, image: Image.Image) -> Segment:
        rows, grid = image_patches(image, self.pixels)
        merged = grid[0] * grid[1] * grid[2] // self.pixels.merge_size**2
        tensors = {"pixel_values": rows, "image_grid_thw": torch.tensor([grid])}
        return Segment(self.wrap_tokens(self.image_id, merged), tensors)

    def video(self, frames: list[Image.Image]) -> Segment:
        rows, grid = video_patches(frames, self.pixels)
        merged = grid[0] * grid[1] * grid[2] // self.pixels.merge_size**2
        tensors = {"pixel_values_videos": rows, "video_grid_thw": torch.tensor([grid])}
        if self.family == "qwen2_5_vl":
            tensors["second_per_grid_ts"] = torch.tensor([self.pixels.temporal_patch_size / self.pixels.fps])
        # Qwen3-VL wraps every temporal patch in its own start/end pair (moekit leaves out the timestamp text).
        chunks = grid[0] if self.family == "qwen3_vl" else 1
        height, width = video_size(frames[0].height, frames[0].width, self.pixels)
        return Segment(self.wrap_tokens(self.video_id, merged, chunks), tensors, size=(width, height))

    def token_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        kinds = (ids == self.image_id).long() + 2 * (ids == self.video_id).long()
        return {"mm_token_type_ids": kinds}


class ProcessorVision:
    """Any family whose HF processor builds offline: one image placeholder, expanded by the processor."""

    supports_video = False

    def __init__(self, family: str, config: Any, processor: Any):
        self.family = family
        self.processor = processor
        self.image_id = _image_token_id(config)
        self.image_token = processor.tokenizer.convert_ids_to_tokens(self.image_id)

    def image(self, image: Image.Image) -> Segment:
        out = self.processor(text=[self.image_token], images=[image], return_tensors="pt", add_special_tokens=False)
        ids = out["input_ids"][0].tolist()
        skip = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
        return Segment(ids, {k: v for k, v in out.items() if k not in skip and isinstance(v, torch.Tensor)})

    def video(self, frames: list[Image.Image]) -> Segment:
        raise ValueError(f"moekit feeds videos only to Qwen-VL families, not to {self.family!r}")

    def token_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.family in TOKEN_TYPE_FAMILIES:
            return {"token_type_ids": (ids == self.image_id).long()}
        return {}


class UnavailableVision:
    """A VLM whose processor cannot be built offline: text-only prompts work, media raise the reason."""

    supports_video = False

    def __init__(self, family: str, reason: str):
        self.family = family
        self.reason = reason

    def image(self, image: Image.Image) -> Segment:
        raise ValueError(self.reason)

    def video(self, frames: list[Image.Image]) -> Segment:
        raise ValueError(self.reason)

    def token_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"token_type_ids": torch.zeros_like(ids)} if self.family in TOKEN_TYPE_FAMILIES else {}


def _image_token_id(config: Any) -> int:
    for key in ("image_token_id", "image_token_index"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    raise ValueError(f"{config.model_type}: its config names no image token id")


def build_vision(path: str | Path, family: str, config: Any) -> Vision | None:
    """The visual preprocessing for a model folder; None for a text-only model; `UnavailableVision` (text
    works, media raise why) for a VLM whose processor cannot be built offline."""
    if family in QWEN_FAMILIES:
        pixels = QwenPixelConfig.from_dir(path, getattr(config, "vision_config", None))
        if family == "qwen3_vl" and not (Path(path) / "preprocessor_config.json").is_file():
            pixels = QwenPixelConfig(**{**pixels.__dict__, "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3})
        return QwenVision(family, config, pixels)
    if getattr(config, "vision_config", None) is None:
        return None
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds here; the message is what matters
        return UnavailableVision(
            family,
            f"{path}: cannot build the {family} processor offline ({type(exc).__name__}: {exc}); moekit has its own "
            f"preprocessing only for {', '.join(QWEN_FAMILIES)}",
        )
    return ProcessorVision(family, config, processor)
