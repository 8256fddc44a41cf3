"""moekit's Qwen2.5-VL MoE (PolyV) on vLLM: vLLM's own Qwen2.5-VL with moekit's MoE language model inside.

The processor, vision tower, M-RoPE positions and weight-name mapping are `Qwen2_5_VLForConditionalGeneration`'s,
unchanged; only its language model is `moekit_vllm.language_model.MoekitQwen2ForCausalLM`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models import qwen2_5_vl

from moekit_vllm import LANGUAGE_MODEL


@contextlib.contextmanager
def _moe_language_model() -> Iterator[None]:
    """While vLLM's Qwen2.5-VL builds itself, its inner language model is moekit's MoE one.

    vLLM's `__init__` names its language model's architecture inline (`Qwen2ForCausalLM`); swapping that one call
    keeps the rest of its constructor (vision tower, tower/LM marking, pruning) exactly vLLM's, release to release.
    """
    original = qwen2_5_vl.init_vllm_registered_model

    def build(vllm_config: VllmConfig, **kwargs) -> nn.Module:
        if kwargs.get("architectures") == ["Qwen2ForCausalLM"]:
            kwargs["architectures"] = [LANGUAGE_MODEL]
        return original(vllm_config, **kwargs)

    qwen2_5_vl.init_vllm_registered_model = build
    try:
        yield
    finally:
        qwen2_5_vl.init_vllm_registered_model = original


class MoekitQwen2_5_VLForConditionalGeneration(qwen2_5_vl.Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL (processor, vision tower, M-RoPE, weight names) with moekit's MoE language model."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        with _moe_language_model():
            super().__init__(vllm_config=vllm_config, prefix=prefix)
