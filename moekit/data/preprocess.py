"""`Preprocessor`: one sample (schema + decoded media) -> the tensors of one training example.

Built from a model folder (config.json + tokenizer files + preprocessor_config.json): the tokenizer and its chat
template format the conversation, the family's `Vision` turns media into tokens and pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moekit.config.record import dense_model_type
from moekit.data.chat import IGNORE, ChatFormatter, Piece, assemble
from moekit.data.media import Media, student_geometry
from moekit.data.schema import IMAGE_TAG, VIDEO_TAG, Sample, with_placeholders
from moekit.data.vision import Vision, build_vision


class Preprocessor:
    """Tokenizer + chat formatting + visual preprocessing of one model.

    `synergy_tokens` are the prompt tokens a synergy head reads (`moekit.attach.synergy.placeholder_tokens`): the
    tokens put after the student's image in paired samples when a dataset asks for `synergy_tokens`.
    """

    def __init__(
        self,
        tokenizer: Any,
        vision: Vision | None,
        family: str,
        config: Any = None,
        synergy_tokens: Sequence[str] = (),
    ):
        self.tokenizer = tokenizer
        self.vision = vision
        self.family = family
        self.config = config
        self.synergy_tokens = list(synergy_tokens)
        self.formatter = ChatFormatter(tokenizer)

    @classmethod
    def from_dir(
        cls, path: str | Path, tokenizer_path: str | Path | None = None, synergy_tokens: Sequence[str] = ()
    ) -> Preprocessor:
        """Load from a model folder (tokenizer from `tokenizer_path` when the folder has none)."""
        from transformers import AutoTokenizer

        from moekit.modeling.meta_model import read_config

        path = Path(path)
        config = read_config(path)
        family = dense_model_type(config)
        source = Path(tokenizer_path) if tokenizer_path is not None else path
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{source}: no usable tokenizer here ({exc}); pass the folder that has one") from None
        return cls(tokenizer, build_vision(path, family, config), family, config, synergy_tokens)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    def _token_id(self, token: str) -> int | None:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        return None if token_id is None or token_id == self.tokenizer.unk_token_id else int(token_id)

    def synergy_ids(self, count: int) -> list[int]:
        """Ids of the `count` synergy tokens: `synergy_tokens` in order (one token given is repeated)."""
        tokens = self.synergy_tokens
        if len(tokens) == 1:
            tokens = tokens * count
        if len(tokens) != count:
            raise ValueError(
                f"data.synergy_tokens is {count} but the stage's synergy heads read {len(self.synergy_tokens)} "
                f"token(s) ({self.synergy_tokens or 'none'}); make them agree"
            )
        ids = [self._token_id(t) for t in tokens]
        unknown = [t for t, i in zip(tokens, ids) if i is None]
        if unknown:
            raise ValueError(
                f"the tokenizer lacks the synergy token(s) {unknown}; a synergy head's prepare() adds them, or add "
                "them as special tokens first"
            )
        return ids

    def encode(self, sample: Sample, media: Media, max_length: int, synergy_tokens: int = 0) -> dict[str, Any]:
        """Model inputs (1-D token tensors, pixel tensors) plus the sample's extras; ValueError when unusable."""
        paired = synergy_tokens if sample.paired is not None else 0
        segments, tensors, geometry = self._media(media, paired)
        roles = [t.role for t in sample.conversations]
        pieces: list[Piece] = self.formatter.pieces(roles, sample.human_texts())
        ids, labels = assemble(self.formatter, pieces, segments)
        ids, labels = truncate_text(ids, labels, max_length, self.vision)
        out = self._inputs(ids, labels, tensors)
        out["sample_ids"] = sample.id
        out["sample_modalities"] = sample.modality
        out["teacher"] = media.teacher
        out["geometry"] = geometry
        return out

    def encode_prompt(
        self, roles: Sequence[str], texts: Sequence[str], media: Media, synergy_tokens: int = 0
    ) -> dict[str, Any]:
        """The inputs that ask the model for the next answer of a conversation ending on a human turn (`roles`
        in "system" / "human" / "gpt", `texts` with `<image>` / `<video>` placeholders, missing ones put first):
        rendered with the chat template's generation prompt. `synergy_tokens`: put the model's synergy tokens
        after the last image, as coarse-distillation training does. Extras: `geometry` of a scene."""
        texts = with_placeholders(list(roles), list(texts), len(media.images), media.clip)
        segments, tensors, geometry = self._media(media, synergy_tokens)
        ids, labels = assemble(self.formatter, self.formatter.prompt_pieces(roles, texts), segments)
        out = self._inputs(ids, labels, tensors)
        out.pop("labels")
        out["geometry"] = geometry
        return out

    def _media(self, media: Media, synergy_tokens: int) -> tuple[dict, dict, dict | None]:
        """(token ids per placeholder kind, pixel tensors, scene geometry) of a sample's decoded media."""
        segments: dict[str, list[list[int]]] = {IMAGE_TAG: [], VIDEO_TAG: []}
        tensors: dict[str, list[torch.Tensor]] = {}
        geometry = None
        if (media.images or media.clip) and self.vision is None:
            raise ValueError(f"the model ({self.family}) is text-only but the sample has media")
        for k, image in enumerate(media.images):
            segment = self.vision.image(image)
            ids = segment.ids
            if synergy_tokens and k == len(media.images) - 1:
                ids = ids + self.synergy_ids(synergy_tokens)
            segments[IMAGE_TAG].append(ids)
            _add(tensors, segment.tensors)
        if media.clip is not None:
            if not self.vision.supports_video:
                raise ValueError(f"the model ({self.family}) takes no video input")
            segment = self.vision.video(media.clip)
            segments[VIDEO_TAG].append(segment.ids)
            _add(tensors, segment.tensors)
            if media.scene is not None:
                geometry = student_geometry(
                    media.scene, segment.size, segment.tensors["video_grid_thw"], self.vision.pixels.temporal_patch_size
                )
        return segments, tensors, geometry

    def _inputs(self, ids: list[int], labels: list[int], tensors: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
        input_ids = torch.tensor(ids, dtype=torch.long)
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if self.vision is not None:
            out.update(self.vision.token_inputs(input_ids))
        out.update({k: torch.cat(v) for k, v in tensors.items()})
        return out


def _add(into: dict[str, list[torch.Tensor]], tensors: dict[str, torch.Tensor]) -> None:
    for key, value in tensors.items():
        into.setdefault(key, []).append(value)


def truncate_text(ids: list[int], labels: list[int], max_length: int, vision: Vision | None) -> tuple[list, list]:
    """Cut text past `max_length`; never cut inside the media (their token count must match the pixels)."""
    if len(ids) > max_length:
        media_ids = set()
        if vision is not None:
            media_ids = {getattr(vision, "image_id", -1), getattr(vision, "video_id", -1)}
            media_ids |= {getattr(vision, "start_id", -1), getattr(vision, "end_id", -1)}
        if any(t in media_ids for t in ids[max_length:]):
            raise ValueError(f"needs {len(ids)} tokens and its media do not fit in max_length={max_length}")
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        raise ValueError(f"no answer tokens left within max_length={max_length}")
    return ids, labels
