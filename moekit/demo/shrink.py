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
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
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
    if isinstance(getattr(config, "qk_rope_head_dim", None), int):
        rope_dim = 8 if config.qk_rope_head_dim > 0 else 0  # a NoPE family (GLM-5's DSA layers) stays NoPE
        mla = {"qk_rope_head_dim": rope_dim, "qk_nope_head_dim": 8, "v_head_dim": head_dim, "kv_lora_rank": 16}
        for key, value in mla.items():
            _set(config, key, value)
        _set(config, "qk_head_dim", 8 + rope_dim)
        _set(config, "head_dim", rope_dim or 8)  # RoPE acts on the rope part of each head
        if isinstance(getattr(config, "q_lora_rank", None), int):
            _set(config, "q_lora_rank", 16)
    layers = sizes["num_hidden_layers"]
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and key.endswith(("layer_types", "_layers_block_type", "block_types")):
            # the first layers; for attention kinds with no full attention among them, the last is the original's
            # last (a hybrid needs at least one full-attention layer). FFN kinds stay a prefix (dense stays dense)
            cut = (value * layers)[:layers]
            if key == "layer_types" and "full_attention" in value and "full_attention" not in cut:
                cut = value[: layers - 1] + value[-1:]
            _set(config, key, cut)
        elif key in ("mlp_only_layers", "full_attn_idxs", "fullatt_block_indexes", "deepstack_visual_indexes"):
            _set(config, key, [i for i in value if i < layers] if isinstance(value, list) else value)
        elif key in ("vision_feature_layer", "vision_feature_layers") and isinstance(value, list):
            _set(config, key, [-1])  # the shrunk vision tower has one layer
        elif key == "out_hidden_size" and isinstance(value, int) and _is_vision(path):
            _set(config, key, TEXT["hidden_size"])  # a vision tower's output feeds the language model
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


def _rederive(data: dict[str, Any], head_dim: int) -> None:
    """Keys a config derives from others at init, dropped (or given their source) so that they are derived again
    for the shrunk sizes: Gemma 4's per-layer overrides (from `layer_types` and `global_head_dim`), GPT-Neo's
    `attention_layers` (from `attention_types`)."""
    if "per_layer_config" in data:
        data.pop("per_layer_config")
        data["global_head_dim"] = 2 * head_dim
    if "attention_types" in data:
        data.pop("attention_layers", None)  # GPT-Neo expands attention_types into it
    for value in data.values():
        if isinstance(value, dict):
            _rederive(value, head_dim)


def tiny_config_any(model_type: str) -> PreTrainedConfig:
    """The default config of `model_type`, shrunk everywhere (see the module docstring), and read back from its
    dict: what a saved checkpoint's config.json gives, so that the tiny model is the one its config describes."""
    config = copy.deepcopy(CONFIG_MAPPING[model_type]())
    _shrink(config, model_type, {})
    for key, value in FIXES.get(model_type, {}).items():
        _set(config, key, value)
    data = config.to_dict()
    _rederive(data, TEXT["hidden_size"] // TEXT["num_attention_heads"])
    try:
        return type(config).from_dict(data)
    except Exception:  # noqa: BLE001 (any validation error): a few MoE families fail it; the in-memory config still
        return config  # builds a model that tells what it is (already MoE); its checkpoint would not reload


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
