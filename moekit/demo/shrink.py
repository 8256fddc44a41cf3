"""Tiny random models of any family transformers can build from its config alone (the coverage sweep of
docs/upcycling.md): the family's default config, shrunk in every sub-config to a few layers of width 64.

Generic rules cover nearly every family: sizes (`hidden_size`, `intermediate_size`, layer and head counts,
`head_dim`, vocabulary), per-layer lists (`layer_types`, ...) cut to the layer count, token ids moved inside the
vocabulary, RoPE sections rescaled to the head size. A few families need one more key (`FIXES`).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import transformers
from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

TEXT = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2}
VOCAB = 512
SPECIAL_BASE = 400  # token ids the config names beyond the vocabulary move to 400, 401, ...
FFN_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "mlp_dim", "ffn_hidden_size", "decoder_ffn_dim")
LAYER_KEYS = ("num_hidden_layers", "depth")
HEAD_KEYS = ("num_attention_heads", "num_heads")
# One-off keys a family needs beyond the generic rules (found by the sweep).
_VOCAB_MAP = {"<image>": 450, "<|extra_200|>": 451, "<|image start|>": 452, "<|image end|>": 453}
FIXES: dict[str, dict[str, Any]] = {
    "chameleon": {"vocabulary_map": _VOCAB_MAP},
    "emu3": {"vocabulary_map": _VOCAB_MAP},
}


def _is_vision(path: str) -> bool:
    return any(w in path for w in ("vision", "visual", "image", "audio", "vq", "speech", "perceiver", "encoder"))


def _set(config: Any, key: str, value: Any) -> None:
    with contextlib.suppress(AttributeError, TypeError, ValueError):  # read-only or derived keys stay
        setattr(config, key, value)


def _shrink(config: Any, path: str, ids: dict[int, int]) -> None:
    sizes = VISION if _is_vision(path) else TEXT
    old_heads = next((getattr(config, k) for k in HEAD_KEYS if isinstance(getattr(config, k, None), int)), None)
    old_kv = getattr(config, "num_key_value_heads", None)
    # Canonical names reach each family's own through its config's attribute_map (n_embd, d_model, ...).
    if isinstance(getattr(config, "hidden_size", None), int):
        _set(config, "hidden_size", sizes["hidden_size"])
    for key in FFN_KEYS:
        if isinstance(getattr(config, key, None), int):
            _set(config, key, sizes["intermediate_size"])
    for key in LAYER_KEYS:
        if isinstance(getattr(config, key, None), int) and getattr(config, key) > 0:
            _set(config, key, sizes["num_hidden_layers"])
    for key in HEAD_KEYS:
        if isinstance(getattr(config, key, None), int):
            _set(config, key, sizes["num_attention_heads"])
    # Encoder-decoder families name their halves' sizes separately (BART, Whisper, ProphetNet, ...).
    for key, value in list(vars(config).items()):
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if key.endswith("_attention_heads") and key.startswith(("encoder", "decoder")):
            _set(config, key, sizes["num_attention_heads"])
        elif key.endswith("_ffn_dim") and key.startswith(("encoder", "decoder")):
            _set(config, key, sizes["intermediate_size"])
        elif key in ("encoder_layers", "decoder_layers", "num_encoder_layers", "num_decoder_layers"):
            _set(config, key, sizes["num_hidden_layers"])
    heads = sizes["num_attention_heads"]
    head_dim = sizes["hidden_size"] // heads
    if isinstance(old_kv, int):
        _set(config, "num_key_value_heads", heads if old_heads is None or old_kv >= old_heads else heads // 2)
    elif "num_key_value_heads" in vars(config):
        _set(config, "num_key_value_heads", heads)
    if "head_dim" in vars(config) or isinstance(getattr(config, "head_dim", None), int):
        _set(config, "head_dim", head_dim)
    if isinstance(getattr(config, "rotary_dim", None), int):
        _set(config, "rotary_dim", head_dim)
    # Multi-head latent attention (DeepSeek-style): small ranks and rope / nope / value head sizes.
    mla = {"qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": head_dim, "kv_lora_rank": 16}
    if isinstance(getattr(config, "qk_rope_head_dim", None), int):
        for key, value in mla.items():
            _set(config, key, value)
        _set(config, "qk_head_dim", 16)
        _set(config, "head_dim", 8)  # RoPE acts on the rope part of each head
        if isinstance(getattr(config, "q_lora_rank", None), int):
            _set(config, "q_lora_rank", 16)
    layers = sizes["num_hidden_layers"]
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and key.endswith(("layer_types", "_layers_block_type", "block_types")):
            _set(config, key, (value * layers)[:layers] if value else value)
        elif key in ("mlp_only_layers", "full_attn_idxs", "fullatt_block_indexes", "deepstack_visual_indexes"):
            _set(config, key, [i for i in value if i < layers] if isinstance(value, list) else value)
    if isinstance(getattr(config, "vocab_size", None), int):
        _set(config, "vocab_size", VOCAB)
    if isinstance(getattr(config, "max_position_embeddings", None), int):
        _set(config, "max_position_embeddings", min(config.max_position_embeddings, 512))
    for key, value in list(vars(config).items()):
        if key.endswith(("token_id", "token_index")) and isinstance(value, int) and value >= VOCAB:
            _set(config, key, ids.setdefault(value, SPECIAL_BASE + len(ids)))
        elif key.endswith("token_id") and isinstance(value, list):
            _set(config, key, [ids.setdefault(v, SPECIAL_BASE + len(ids)) if v >= VOCAB else v for v in value])
    rope = getattr(config, "rope_parameters", None)
    multimodal_rope = not _is_vision(path) and any(
        w in type(config).__name__ for w in ("VL", "Vl", "Glm4v", "Glm46V", "GlmOcr", "PaddleOCR")
    )
    if isinstance(rope, dict) and ("mrope_section" in rope or multimodal_rope):
        half = (getattr(config, "head_dim", None) or head_dim) // 2
        _set(config, "rope_parameters", {**rope, "mrope_section": [half // 2, half // 4, half - half // 2 - half // 4]})
    for key, value in list(vars(config).items()):
        if isinstance(value, PreTrainedConfig):
            _shrink(value, f"{path}.{key}", ids)


def tiny_config_any(model_type: str) -> PreTrainedConfig:
    """The default config of `model_type`, shrunk everywhere (see the module docstring)."""
    config = copy.deepcopy(CONFIG_MAPPING[model_type]())
    _shrink(config, model_type, {})
    for key, value in FIXES.get(model_type, {}).items():
        _set(config, key, value)
    return config


def model_class_any(model_type: str) -> type:
    """The family's own class in transformers' image-text-to-text mapping, else its causal-LM mapping."""
    for mapping in (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        if model_type in mapping:
            return getattr(transformers, mapping[model_type])
    raise KeyError(f"{model_type!r} is in neither transformers mapping")


def tiny_model_any(model_type: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random fp32 model of `model_type`, in eval mode."""
    torch.manual_seed(seed)
    return model_class_any(model_type)._from_config(tiny_config_any(model_type), dtype=torch.float32).eval()


def text_inputs_any(length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """A one-sample text batch whose ids avoid every id the shrunk configs use for special tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (1, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def dense_decoder_types() -> list[str]:
    """Every model type in transformers' image-text-to-text and causal-LM mappings."""
    return sorted(set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) | set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
