"""moekit's model and config classes: one pair per dense family, registered with transformers' Auto classes.

`MoekitQwen2_5_VLForConditionalGeneration` is the stock dense class with the FFNs of the recorded layers
replaced by MoE blocks. Its config has model type `moekit_<base>` so that transformers without moekit refuses
the checkpoint instead of loading it as the dense model.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from moekit.arch import FAMILIES, family_for
from moekit.config.record import PREFIX, MoeRecord
from moekit.io.atomic import atomic_dir
from moekit.io.files import copy_side_files
from moekit.modeling.structure import guard_key, guard_pattern, init_block, install_blocks, new_context
from moekit.moe import MoeBlock
from moekit.moe.context import attach_context


def moe_model_type(base_model_type: str) -> str:
    return PREFIX + base_model_type


class MoekitModelMixin:
    """What a moekit class adds to the stock dense class it derives from."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        record = MoeRecord.of(config)
        # The stock dense classes cannot take transformers' experts_implementation switch, so moekit keeps its
        # own (see set_experts_implementation); the default `auto` picks the fastest per device (eager on CPU).
        context = new_context(record)
        attach_context(self, context)
        std = getattr(config.get_text_config(), "initializer_range", 0.02) or 0.02
        for block in install_blocks(self, record, context).values():
            init_block(block, std)
        self._keys_to_ignore_on_load_unexpected = set(self._keys_to_ignore_on_load_unexpected or ()) | {
            guard_pattern(record)
        }

    def set_experts_implementation(self, experts_implementation: str | dict) -> None:
        """Choose how the routed experts run: `eager`, `grouped_mm`, `batched_mm` (transformers' kernels) or `auto`."""
        name = experts_implementation if isinstance(experts_implementation, str) else experts_implementation.get("")
        self._moekit_context.settings.set(name)

    def save_pretrained(self, save_directory: str | Path, *args: Any, state_dict: dict | None = None, **kwargs: Any):
        """Save like transformers, atomically, with the moekit record and the dense-refusal guard."""
        record = MoeRecord.of(self.config)
        self.config.moekit = record.to_json()  # stamped with this moekit's version
        state = dict(self.state_dict() if state_dict is None else state_dict)
        reference = next(p for p in self.parameters())
        state[guard_key(record)] = torch.zeros(0, dtype=reference.dtype)
        if not kwargs.get("is_main_process", True):
            return super().save_pretrained(save_directory, *args, state_dict=state, **kwargs)
        with atomic_dir(save_directory) as tmp:
            # Like transformers' save into an existing folder: tokenizer/processor files beside the weights stay.
            copy_side_files(Path(save_directory), tmp, ("config.json", "generation_config.json"))
            return super().save_pretrained(tmp, *args, state_dict=state, **kwargs)

    def moe_blocks(self) -> list[MoeBlock]:
        return [m for m in self.modules() if isinstance(m, MoeBlock)]


def _auto_kind(base_model_type: str, base_config_cls) -> str:
    family = family_for(base_model_type)
    if family is not None:
        return family.auto
    return "image-text-to-text" if "vision_config" in getattr(base_config_cls, "sub_configs", {}) else "causal-lm"


@cache
def moekit_classes(base_model_type: str) -> tuple[type, type]:
    """The (config class, model class) pair for a dense family, created and registered on first use."""
    if base_model_type not in CONFIG_MAPPING:
        raise ValueError(f"transformers {__import__('transformers').__version__} has no model type {base_model_type!r}")
    base_config = CONFIG_MAPPING[base_model_type]
    kind = _auto_kind(base_model_type, base_config)
    mapping, auto = (
        (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, AutoModelForImageTextToText)
        if kind == "image-text-to-text"
        else (MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM)
    )
    base_model = mapping.get(base_config, None)
    if base_model is None:
        raise ValueError(f"{base_model_type!r} has no {auto.__name__} class in transformers; moekit cannot wrap it")
    model_type = moe_model_type(base_model_type)
    config_cls = type(
        f"Moekit{base_config.__name__}", (base_config,), {"model_type": model_type, "__module__": __name__}
    )
    model_cls = type(
        f"Moekit{base_model.__name__}",
        (MoekitModelMixin, base_model),
        {"config_class": config_cls, "__module__": __name__},
    )
    # Saved keys follow the dense family's own naming (legacy renames included), so conversion and
    # streaming output agree with what the dense class writes.
    conversions = get_checkpoint_conversion_mapping(base_model.__name__) or get_checkpoint_conversion_mapping(
        base_model_type
    )
    if conversions is not None:
        register_checkpoint_conversion_mapping(model_cls.__name__, conversions, overwrite=True)
    AutoConfig.register(model_type, config_cls, exist_ok=True)
    auto.register(config_cls, model_cls, exist_ok=True)
    return config_cls, model_cls


def register_known_families() -> None:
    """Register every family in the table so `Auto*.from_pretrained` works right after `import moekit`."""
    for base_model_type in FAMILIES:
        if base_model_type in CONFIG_MAPPING:
            moekit_classes(base_model_type)
