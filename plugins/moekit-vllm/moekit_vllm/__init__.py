"""vLLM plug-in: serve moekit's Qwen2 / Qwen2.5 and Qwen2.5-VL MoE checkpoints with vLLM's fused-MoE kernels.

`register` runs once in every vLLM process (the `vllm.general_plugins` entry point). It makes the checkpoints'
config types (`moekit_qwen2`, `moekit_qwen2_5_vl`) known to transformers and points vLLM's model registry at the
classes by name, so nothing heavy is imported until vLLM builds the model.
"""

from __future__ import annotations

LANGUAGE_MODEL = "MoekitQwen2ForCausalLM"  # moekit's Qwen2 MoE LM; also the LM inside the Qwen2.5-VL model
# `architectures[0]` of moekit's config.json -> the class that serves it
ARCHITECTURES = {
    LANGUAGE_MODEL: "moekit_vllm.language_model:MoekitQwen2ForCausalLM",
    "MoekitQwen2_5_VLForConditionalGeneration": "moekit_vllm.qwen2_5_vl:MoekitQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """Register moekit's config types with transformers and its models with vLLM (idempotent)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from moekit_vllm.config import CONFIGS

    for model_type, config_class in CONFIGS.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
    for name, target in ARCHITECTURES.items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)
