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
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

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

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: the modules are transformers' own, only the class is defined here.

        transformers takes any class defined outside it for custom code and then skips initialising a module whose
        own parameters are all loaded, so non-persistent buffers computed in `_init_weights` (Falcon-H1's
        `mup_vector`) stayed uninitialised after loading.
        """
        return cls.is_remote_code()

    def set_experts_implementation(self, experts_implementation: str | dict) -> None:
        """Choose how the routed experts run: `eager`, `grouped_mm`, `batched_mm` (transformers' kernels) or `auto`."""
        name = experts_implementation if isinstance(experts_implementation, str) else experts_implementation.get("")
        self._moekit_context.settings.set(name)

    def save_pretrained(self, save_directory: str | Path, *args: Any, state_dict: dict | None = None, **kwargs: Any):
        """Save like transformers, atomically, with the moekit record and the dense-refusal guard."""
        record = MoeRecord.of(self.config)
        self.config.moekit = record.to_json()  # stamped with this moekit's version
        state = dict(self.state_dict() if state_dict is None else state_dict)
        # in the dtype of the first parameter as written (a sharded model may hold it in another)
        first = next(n for n, _ in self.named_parameters())
        reference = state.get(first, next(self.parameters()))
        state[guard_key(record)] = torch.zeros(0, dtype=reference.dtype)
        if not kwargs.get("is_main_process", True):
            return super().save_pretrained(save_directory, *args, state_dict=state, **kwargs)
        with atomic_dir(save_directory) as tmp:
            # Like transformers' save into an existing folder: tokenizer/processor files beside the weights stay.
            copy_side_files(Path(save_directory), tmp, ("config.json", "generation_config.json"))
            return super().save_pretrained(tmp, *args, state_dict=state, **kwargs)

    def moe_blocks(self) -> list[MoeBlock]:
        return [m for m in self.modules() if isinstance(m, MoeBlock)]


AUTO_CLASSES = {"image-text-to-text": AutoModelForImageTextToText, "causal-lm": AutoModelForCausalLM}
MAPPINGS = {"image-text-to-text": MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, "causal-lm": MODEL_FOR_CAUSAL_LM_MAPPING}


@cache
def config_class(base_model_type: str) -> type:
    """moekit's config class for a dense family (model type `moekit_<family>`), registered with AutoConfig."""
    if base_model_type not in CONFIG_MAPPING:
        raise ValueError(f"transformers {transformers.__version__} has no model type {base_model_type!r}")
    base_config = CONFIG_MAPPING[base_model_type]
    model_type = moe_model_type(base_model_type)
    config_cls = type(
        f"Moekit{base_config.__name__}", (base_config,), {"model_type": model_type, "__module__": __name__}
    )
    AutoConfig.register(model_type, config_cls, exist_ok=True)
    return config_cls


def dense_class(base_model_type: str, model_class: str | None) -> type:
    """The dense transformers class to derive from: the one the model was made from, else the family's class in
    transformers' image-text-to-text mapping, else its causal-LM mapping."""
    if model_class is not None:
        dense = getattr(transformers, model_class, None)
        if isinstance(dense, type) and issubclass(dense, transformers.PreTrainedModel):
            return dense
        raise ValueError(f"transformers {transformers.__version__} has no model class {model_class!r}")
    base_config = CONFIG_MAPPING[base_model_type]
    for mapping in MAPPINGS.values():
        dense = mapping.get(base_config, None)
        if dense is not None:
            return dense
    raise ValueError(
        f"{base_model_type!r} has neither an image-text-to-text nor a causal-LM class in transformers; moekit wraps "
        "those"
    )


def moekit_classes(base_model_type: str, model_class: str | None = None) -> tuple[type, type]:
    """The (config class, model class) pair for a dense family, created and registered on first use.

    The model class derives from `model_class` (the dense class a model was made from; default: the family's
    class in transformers' mappings) and is registered with every Auto class whose mapping holds that class.
    """
    return _classes(base_model_type, dense_class(base_model_type, model_class).__name__)


@cache
def _classes(base_model_type: str, model_class: str) -> tuple[type, type]:
    config_cls = config_class(base_model_type)
    base_model = dense_class(base_model_type, model_class)
    # The name keys transformers' checkpoint conversions: unique per family even where families share a class
    # (shieldgemma2 and gemma3 both use Gemma3ForConditionalGeneration, with different saved key names).
    own = getattr(base_model.config_class, "model_type", base_model_type) == base_model_type
    name = f"Moekit{base_model.__name__}" if own else f"Moekit{base_model.__name__}_{base_model_type}"
    model_cls = type(
        name,
        (MoekitModelMixin, base_model),
        {"config_class": config_cls, "__module__": __name__},
    )
    # Saved keys follow the dense family's own naming (legacy renames included), so conversion and
    # streaming output agree with what the dense class writes.
    # Registered under the kind of key transformers found them by. A class-name hit does not mark the model type
    # as seen, so a family mapped by model type and re-registered by class name got its renames twice (once more
    # for the inner model) and saved under doubled prefixes; by model type (the base one, which an in-memory
    # upcycled model keeps, and moekit's) the root claims them. Registering marks the key as the user's, which
    # is what lets transformers apply it to a class defined outside the library.
    by_class = get_checkpoint_conversion_mapping(base_model.__name__)
    by_type = None if by_class is not None else get_checkpoint_conversion_mapping(base_model_type)
    if by_class is not None:
        register_checkpoint_conversion_mapping(model_cls.__name__, by_class, overwrite=True)
    elif by_type is not None:
        for key in (base_model_type, config_cls.model_type):
            register_checkpoint_conversion_mapping(key, by_type, overwrite=True)
    base_config = CONFIG_MAPPING[base_model_type]
    for kind, mapping in MAPPINGS.items():
        if mapping.get(base_config, None) is base_model:
            AUTO_CLASSES[kind].register(config_cls, model_cls, exist_ok=True)
    return config_cls, model_cls


def register_family(base_model_type: str) -> type:
    """Register moekit's classes of a family with every Auto class transformers has for it; the config class."""
    base_config = CONFIG_MAPPING[base_model_type]
    for mapping in MAPPINGS.values():
        dense = mapping.get(base_config, None)
        if dense is not None:
            moekit_classes(base_model_type, dense.__name__)
    return config_class(base_model_type)
