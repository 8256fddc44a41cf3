"""Special tokens added to a tokenizer and to a model's embeddings, their new rows initialised from the old."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def add_special_tokens(model: nn.Module, tokenizer, tokens: list[str], noise: float = 0.02, seed: int = 0) -> list[int]:
    """Add `tokens` to `tokenizer` and make room for them in `model`'s embeddings; return their ids.

    Rows of tokens new to the tokenizer start at the mean of the existing vocabulary's rows plus Gaussian noise
    of `noise` times their std (distinct, yet in-distribution); input and untied output embeddings alike.
    Tokens the tokenizer already had keep their (possibly trained) rows, so calling this again is harmless.
    A vocabulary padded beyond the tokenizer (Qwen: 151665 ids, 152064 rows) is reused, never shrunk.
    """
    vocab = tokenizer.get_vocab()
    known = len(tokenizer)
    fresh = [t for t in tokens if t not in vocab]
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    unk = getattr(tokenizer, "unk_token_id", None)
    if any(i is None or (unk is not None and i == unk) for i in ids):
        raise ValueError(f"the tokenizer did not take the tokens {tokens}")
    rows = model.get_input_embeddings().num_embeddings
    if max(ids) >= rows:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    fresh_ids = [i for t, i in zip(tokens, ids) if t in fresh]
    if fresh_ids:
        generator = torch.Generator().manual_seed(seed)
        layers = [model.get_input_embeddings()]
        output = model.get_output_embeddings()
        if output is not None and output.weight is not layers[0].weight:
            layers.append(output)
        for layer in layers:
            reference = layer.weight[: min(known, rows)].float()
            mean, std = reference.mean(0), reference.std()
            draw = torch.randn(len(fresh_ids), reference.shape[1], generator=generator) * (noise * std)
            layer.weight[fresh_ids] = (mean + draw.to(mean.device)).to(layer.weight.dtype)
    return ids
