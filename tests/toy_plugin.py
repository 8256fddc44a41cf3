"""A small plug-in for trainer tests: a synergy head that adds two tokens, and a teacher.

`ToyHead.prepare` resizes the embeddings by two rows (like PolyV's `<synergy>` tokens) and builds an alignment
MLP; its loss regresses the mean last hidden state of each sample onto the teacher's `video` features.
"""

from __future__ import annotations

import pydantic
import torch
from torch import nn

from moekit import Component, hookimpl


class HeadParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    width: int = 8


class ToyHead(nn.Module):
    def __init__(self, params: HeadParams):
        super().__init__()
        self.width = params.width

    def prepare(self, model, tokenizer) -> None:
        rows = model.get_input_embeddings().num_embeddings
        model.resize_token_embeddings(rows + 2)
        self.align = nn.Linear(model.config.get_text_config().hidden_size, self.width)

    def forward(self, hidden_states, input_ids, teacher):
        video = teacher.get("video")
        target = torch.zeros(hidden_states.shape[0], self.width) if video is None else video.features
        return {"temporal": (self.align(hidden_states.mean(1)) - target.to(hidden_states.dtype)).square().mean()}


class TeacherParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    scale: float = 1.0


class TeacherOutput:
    def __init__(self, features):
        self.features = features


TEACHER_CALLS: list[tuple[int, ...]] = []  # input shapes the teacher saw, for the tests


class ToyTeacher:
    """Features = scale * inputs."""

    def __init__(self, params: TeacherParams):
        self.scale = params.scale

    def features(self, inputs):
        TEACHER_CALLS.append(tuple(inputs.shape))
        return TeacherOutput(inputs * self.scale)


@hookimpl
def moekit_synergy_heads():
    return [Component("toy_head", "synergy_head", HeadParams, ToyHead)]


@hookimpl
def moekit_teachers():
    return [Component("toy_teacher", "teacher", TeacherParams, ToyTeacher)]


class SourceParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    batches: int = pydantic.Field(3, ge=1)
    token: int = 5


SOURCE_REQUESTS: list[tuple[int, int, int]] = []  # (epoch, start, batch size) of each request, for the tests


class ConstantBatches:
    """`batches` micro-batches per epoch of `request.batch_size` copies of one short text sample."""

    def __init__(self, params: SourceParams, request):
        self.params, self.request = params, request
        SOURCE_REQUESTS.append((request.epoch, request.start, request.batch_size))

    def __len__(self) -> int:
        return self.params.batches

    def __iter__(self):
        ids = torch.full((self.request.batch_size, 6), self.params.token)
        ids[:, ::2] = 7
        for _ in range(self.request.start, self.params.batches):
            yield {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": ids.clone(),
                "sample_ids": [f"c{i}" for i in range(ids.shape[0])],
                "sample_modalities": ["text"] * ids.shape[0],
                "teacher": None,
            }


@hookimpl
def moekit_batch_sources():
    return [Component("constant", "batch_source", SourceParams, ConstantBatches)]
