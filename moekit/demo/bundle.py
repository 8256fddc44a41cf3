"""A tiny offline VLM bundle: random Qwen2.5-VL weights + a word-level tokenizer with a chat template + pixel config.

The folder loads back with `from_pretrained` (model, `AutoTokenizer`) and with `moekit.data.Preprocessor.from_dir`,
so the whole PolyV pipeline can run on CPU with no download. The vocabulary is the synthetic data's words
(`moekit.demo.synth.vocabulary()`) plus the model's special tokens; the chat template is ChatML like Qwen's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from moekit.config.provenance import Provenance, write_provenance
from moekit.data.qwen_vision import QwenPixelConfig
from moekit.demo.tiny import tiny_config
from moekit.io.atomic import atomic_dir

SPECIALS = [
    "<|endoftext|>",  # pad
    "<|im_start|>",
    "<|im_end|>",  # eos
    "[UNK]",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<synergy>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Small pixel budgets keep sequences short: an image of up to 112x112 is at most 16 visual tokens.
TINY_PIXELS = QwenPixelConfig(
    min_pixels=56 * 56, max_pixels=112 * 112, video_min_pixels=56 * 56, video_max_pixels=84 * 112
)
PROCESSING_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


def build_tokenizer(words: Iterable[str], extra_specials: Iterable[str] = ()):
    """A `PreTrainedTokenizerFast` over `words` (whitespace / punctuation split) with ChatML special tokens
    (plus `extra_specials`, e.g. another family's `<image>` token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIALS, *extra_specials]
    vocab = {token: i for i, token in enumerate(specials)}
    for word in sorted(set(words) - set(specials)):
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=[t for t in specials if t not in ("[UNK]", "<|endoftext|>", "<|im_end|>")],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_vlm_config(vocab_size: int, ids: dict[str, int], hidden_size: int = 64, layers: int = 4):
    """A small Qwen2.5-VL config (moekit.demo.tiny's, wider) whose special ids match the tokenizer."""

    config = tiny_config("qwen2_5_vl")
    heads = 4
    half = hidden_size // heads // 2
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden_size, 2 * hidden_size, layers
    text.num_attention_heads, text.num_key_value_heads, text.vocab_size = heads, 2, vocab_size
    text.layer_types = ["full_attention"] * layers
    text.rope_parameters = {
        "rope_type": "default",
        "mrope_section": [half // 2, half // 4, half - half // 2 - half // 4],
        "rope_theta": 1e4,
    }
    text.bos_token_id, text.eos_token_id, text.pad_token_id = (
        ids["<|im_start|>"],
        ids["<|im_end|>"],
        ids["<|endoftext|>"],
    )
    config.vision_config.out_hidden_size = hidden_size
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    return config


def write_tiny_vlm(
    out: str | Path,
    words: Iterable[str] | None = None,
    *,
    hidden_size: int = 64,
    layers: int = 4,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the tiny bundle to `out` (atomically); `words` default to the synthetic data's vocabulary."""
    from transformers import AutoModelForImageTextToText

    from moekit.demo.synth.vocab import vocabulary

    if hidden_size % 16:
        raise ValueError(f"hidden_size={hidden_size}: use a multiple of 16 (4 heads, 3-axis rotary sections)")
    tokenizer = build_tokenizer(vocabulary() if words is None else words)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    config = tiny_vlm_config(len(tokenizer), ids, hidden_size, layers)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(TINY_PIXELS.to_json(), indent=2))
        params = {"hidden_size": hidden_size, "layers": layers, "seed": seed}
        write_provenance(tmp, Provenance(made_by="moekit tiny-vlm", params=params))
    return Path(out)


def copy_processing_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer, chat template and preprocessor files from `src` to `dst` (e.g. into an MoE checkpoint)."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in PROCESSING_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
