"""Ask a model: chat template, media through the training preprocessing, KV-cached (batched) generation.

A `Request` is a conversation that ends on a human turn plus its decoded media. The prompt is the conversation
rendered with the tokenizer's chat template (moekit's plain one when it has none) up to the assistant's turn;
images, videos and 3D scenes become tokens and pixels exactly as in training (`Preprocessor`), and a scene's
geometry is handed to the position encoders the checkpoint was saved with. Synergy tokens (coarse distillation)
go after the last image only when asked (`synergy=True`): PolyV's last stage trains without them.

Greedy by default and deterministic. Batches are left-padded; transformers' `generate` keeps the KV cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import send_to_device

from moekit.attach.position import feeding
from moekit.data.collate import Collator, split_batch
from moekit.data.config import FramesSpec
from moekit.data.frames import load_image, read_video
from moekit.data.media import Media
from moekit.data.scene import read_scene
from moekit.evaluate.model_dir import ModelDir, open_model_dir

ROLES = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt", "system": "system"}


@dataclass
class Request:
    """One question: `roles` ("system" / "human" / "gpt") and `texts` of a conversation ending on a human turn,
    with `<image>` / `<video>` placeholders where the media go (put first when missing), and its media."""

    roles: list[str]
    texts: list[str]
    media: Media = field(default_factory=lambda: Media([], None, None, None))

    def __post_init__(self) -> None:
        if len(self.roles) != len(self.texts) or not self.roles:
            raise ValueError("a request needs as many roles as texts, at least one")
        if self.roles[-1] != "human":
            raise ValueError(f"a request must end with a user turn, not {self.roles[-1]!r}")


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy when `temperature` is 0 (the default), else sampled with `seed`."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    min_new_tokens: int = 0  # no end token before this many (benchmarks of a fixed length)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")


def make_request(
    messages: str | Sequence[Mapping[str, str]],
    *,
    images: Sequence[str | Path] = (),
    video: str | Path | None = None,
    scene: str | Path | None = None,
    system: str | None = None,
    frames: FramesSpec | None = None,
) -> Request:
    """A `Request` from a prompt or chat messages (`[{"role": "user", "content": ...}]`) and media files: image
    files, a video file or frame folder, or a ScanNet-style scene folder (see moekit.data.scene)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    roles, texts = [], []
    for k, message in enumerate(messages):
        role = ROLES.get(message.get("role", ""))
        if role is None or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{k}]: needs 'role' in {sorted(set(ROLES))} and a text 'content'")
        roles.append(role)
        texts.append(message["content"])
    if system is not None:
        if roles[0] == "system":
            raise ValueError("give the system prompt once: as system=... or as a first 'system' message")
        roles, texts = ["system", *roles], [system, *texts]
    if video is not None and scene is not None:
        raise ValueError("give a video or a scene, not both (one <video> slot per prompt)")
    frames = frames or FramesSpec()
    clip, geometry = None, None
    if video is not None:
        clip = read_video(Path(video), frames)
    elif scene is not None:
        geometry = read_scene(Path(scene), frames)
        clip = geometry.frames
    media = Media([load_image(Path(p)) for p in images], clip, geometry, None)
    return Request(roles, texts, media)


def generate(
    model: ModelDir | str | Path,
    messages: str | Sequence[Mapping[str, str]],
    *,
    images: Sequence[str | Path] = (),
    video: str | Path | None = None,
    scene: str | Path | None = None,
    system: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    synergy: bool = False,
) -> str:
    """The model's answer to one prompt (a string or chat messages) with optional images / video / scene.

    `model`: a model folder (dense or moekit MoE; its position encoders attached) or an opened `ModelDir`.
    """
    opened = model if isinstance(model, ModelDir) else open_model_dir(model)
    request = make_request(messages, images=images, video=video, scene=scene, system=system)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return generate_batch(opened, [request], sampling, synergy=synergy)[0]


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def generate_batch(
    opened: ModelDir,
    requests: Sequence[Request],
    sampling: Sampling | None = None,
    *,
    batch_size: int = 8,
    synergy: bool = False,
) -> list[str]:
    """Answers to `requests`, `batch_size` at a time (left-padded, KV cache), in order."""
    sampling = sampling or Sampling()
    out: list[str] = []
    for chunk in batches(list(requests), batch_size):
        out += [text for text, _ in _generate(opened, chunk, sampling, synergy)]
    return out


def generate_ids(opened: ModelDir, request: Request, sampling: Sampling | None = None) -> list[int]:
    """The new token ids of one request (end-of-turn token excluded), for token-for-token comparisons."""
    return _generate(opened, [request], sampling or Sampling(), False)[0][1]


def _stop_ids(opened: ModelDir) -> list[int]:
    ids: set[int] = set()
    config = getattr(opened.model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), opened.preprocessor.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError(f"{opened.path}: neither its generation config nor its tokenizer names an end token")
    return sorted(ids)


def _generate(
    opened: ModelDir, requests: Sequence[Request], sampling: Sampling, synergy: bool
) -> list[tuple[str, list[int]]]:
    preprocessor, model = opened.preprocessor, opened.model
    synergy_count = len(preprocessor.synergy_tokens) if synergy else 0
    if synergy and not synergy_count:
        raise ValueError(f"{opened.path}: synergy=True but the model was saved without synergy tokens")
    items = [preprocessor.encode_prompt(r.roles, r.texts, r.media, synergy_count) for r in requests]
    inputs, extras = split_batch(Collator(preprocessor.pad_id, side="left")(items))
    inputs = send_to_device(inputs, next(model.parameters()).device)
    stop = _stop_ids(opened)
    options: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "eos_token_id": stop}
    if sampling.min_new_tokens:
        options["min_new_tokens"] = sampling.min_new_tokens
    options["pad_token_id"] = preprocessor.pad_id
    if sampling.temperature > 0:
        options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    rng = torch.random.fork_rng(devices=[]) if sampling.temperature > 0 else nullcontext()
    with rng, feeding(opened.encoders, model, inputs["input_ids"], extras.get("geometry")):
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed)
        output = model.generate(**inputs, **options)
    new = output[:, inputs["input_ids"].shape[1] :].tolist()
    results = []
    for ids in new:
        cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
        ids = ids[:cut]
        text = preprocessor.tokenizer.decode(ids, skip_special_tokens=True)
        results.append((text.strip(), ids))
    return results
