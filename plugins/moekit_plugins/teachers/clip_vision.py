"""CLIP / SigLIP image encoder as a semantic teacher (transformers' `CLIPVisionModel` / `SiglipVisionModel`).

Vid-LLM's semantic teacher is a CLIP encoder (LLaVA-3D's); its features are the targets of the cross-task adapter's
language stream (`vidllm_cta`'s `semantic` path). Each frame of a sample (an image is one frame; frames are spread
evenly down to `num_frames` when set) is preprocessed by transformers' own image processor read from the checkpoint
folder (`preprocessor_config.json`; without one, the processor class's defaults at the config's image size), then
encoded. `output: patches` gives each frame's patch tokens (CLIP's class token dropped), N = frames x patches in
frame then row-major order; `pooled` gives each frame's pooled embedding (CLIP: the normalised class token;
SigLIP: its attention-pooling head), N = frames. Weights load from local safetensors only, never remote code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pydantic
import torch

from moekit.attach.teachers.interface import TeacherBatch, TeacherOutput
from moekit_plugins.teachers.common import TeacherParams, at_most, pool

# model_type in config.json -> (vision model class, PIL image processor class), both from transformers.
KINDS = {
    "siglip": ("SiglipVisionModel", "SiglipImageProcessorPil"),
    "siglip_vision_model": ("SiglipVisionModel", "SiglipImageProcessorPil"),
    "clip": ("CLIPVisionModel", "CLIPImageProcessorPil"),
    "clip_vision_model": ("CLIPVisionModel", "CLIPImageProcessorPil"),
}


class ClipVisionParams(TeacherParams):
    """`checkpoint`: a local folder saved by `save_pretrained` (config.json + safetensors) of a CLIP or SigLIP
    model, or of its vision tower alone."""

    output: Literal["patches", "pooled"] = "patches"
    num_frames: int | None = pydantic.Field(default=None, ge=1)
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


def _model_type(folder: Path) -> str:
    file = folder / "config.json"
    if not (folder.is_dir() and file.is_file()):
        raise FileNotFoundError(f"{folder}: a CLIP / SigLIP checkpoint is a folder with config.json and safetensors")
    model_type = json.loads(file.read_text()).get("model_type")
    if model_type not in KINDS:
        raise ValueError(
            f"{file}: model_type {model_type!r} is not a CLIP or SigLIP model; clip_vision reads {', '.join(KINDS)}"
        )
    return model_type


def _load(params: ClipVisionParams):
    import transformers

    folder = params.checkpoint
    model_name, processor_name = KINDS[_model_type(folder)]
    model, info = getattr(transformers, model_name).from_pretrained(
        folder,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=False,
        output_loading_info=True,
        dtype=params.torch_dtype(),
        attn_implementation=params.attn_implementation,
    )
    # A whole CLIP / SigLIP checkpoint also holds the text tower (unexpected here); the vision tower may lack nothing.
    missing = sorted(info["missing_keys"])
    mismatched = sorted(str(k) for k in info["mismatched_keys"])
    if missing or mismatched:
        problems = [
            f"{label}: {', '.join(keys)}" for label, keys in (("missing", missing), ("shape", mismatched)) if keys
        ]
        raise ValueError(f"{folder}: not a matching {model_name} checkpoint; " + "; ".join(problems))
    processor_cls = getattr(transformers, processor_name)
    if (folder / "preprocessor_config.json").is_file():
        processor = processor_cls.from_pretrained(folder, local_files_only=True)
    else:
        size = model.config.image_size
        square = {"height": size, "width": size}
        extra = (
            {"size": square} if "Siglip" in processor_name else {"size": {"shortest_edge": size}, "crop_size": square}
        )
        processor = processor_cls(**extra)
    return model, processor


class ClipVisionTeacher:
    name = "clip_vision"

    def __init__(self, params: ClipVisionParams):
        self.params = params
        self.device = params.torch_device()
        model, self.processor = _load(params)
        self.model = model.to(self.device).eval().requires_grad_(False)
        config = self.model.config
        self.cls_token = config.model_type.startswith("clip")
        self.num_frames: int | None = params.num_frames
        self.dim: int = config.hidden_size
        self.side = config.image_size // config.patch_size
        if params.output == "pooled" and getattr(config, "vision_use_head", True) is False:
            raise ValueError(f"{params.checkpoint}: this SigLIP has no pooling head (vision_use_head: false)")

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """`[N, 3, H, W]` frames in [0, 1] -> the image processor's `pixel_values` `[N, 3, S, S]`."""
        images = list(frames.detach().float().cpu())
        return self.processor(images=images, do_rescale=False, return_tensors="pt")["pixel_values"]

    def features(self, batch: TeacherBatch) -> TeacherOutput:
        clip = batch.clip()
        indices = at_most(clip.shape[1], self.params.num_frames)
        frames = clip[:, indices]
        count, per = frames.shape[:2]
        pixels = self.preprocess(frames.reshape(count * per, *frames.shape[2:]))
        with torch.no_grad():
            out = self.model(pixel_values=pixels.to(self.device, self.params.torch_dtype()))
        if self.params.output == "pooled":
            tokens, grid = out.pooler_output[:, None], (per, 1, 1)
        else:
            tokens = out.last_hidden_state[:, 1:] if self.cls_token else out.last_hidden_state
            grid = (per, self.side, self.side)
        tokens = tokens.reshape(count, -1, tokens.shape[-1])
        features = pool(tokens, self.params.pooling, self.params.pool_tokens)
        return TeacherOutput(features, self.name, grid, tuple(indices), self.params.pooling_name())
