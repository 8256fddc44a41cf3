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
