"""Does a checkpoint's config.json describe its weights? Shapes the config implies (a meta-device model) against
the shard headers, the index against the shards. Used before conversion writes anything and by `moekit inspect`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from torch import nn
from transformers import PreTrainedConfig

from moekit.io.names import KeyNames
from moekit.io.reader import CheckpointError, CheckpointReader

SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "num_hidden_layers",
)


def shape_mismatches(model: nn.Module, reader: CheckpointReader) -> list[tuple[str, tuple, tuple]]:
    """(checkpoint key, shape the config implies, shape in the shard header) for every tensor that differs."""
    names = KeyNames(model)
    found = [
        (names.find(name, reader), param) for name, param in model.named_parameters() if len(names.parts(name)) == 1
    ]
    # transformers' weight conversions fuse several parameters into one saved tensor (a vision tower's q/k/v as
    # `qkv`) or split one into several (q/k/v convolutions); those have no single shape to compare, 1:1 keys are
    uses = Counter(key for key, _ in found if key is not None)
    return [
        (key, tuple(param.shape), reader.shape(key))
        for key, param in found
        if key is not None and uses[key] == 1 and tuple(param.shape) != reader.shape(key)
    ]


def _sizes(config: PreTrainedConfig) -> str:
    """`key=value` of the config's size keys (the language model's), to compare with the shapes shown."""
    text = config.get_text_config()
    return ", ".join(f"{k}={getattr(text, k)}" for k in SIZE_KEYS if isinstance(getattr(text, k, None), int))


def check_config_matches(model: nn.Module, reader: CheckpointReader, config: PreTrainedConfig, where: Path) -> None:
    """Raise CheckpointError when the shapes `config` implies (built into the meta-device `model`) differ from the
    shard headers of `reader`: naming tensors, both shapes and the config keys that look wrong."""
    mismatches = shape_mismatches(model, reader)
    if not mismatches:
        return
    raise CheckpointError(mismatch_message(mismatches, reader, config, where))


def mismatch_message(
    mismatches: list[tuple[str, tuple, tuple]], reader: CheckpointReader, config: PreTrainedConfig, where: Path
) -> str:
    shown = "; ".join(
        f"{key} is {list(got)} in {reader.key_file[key].name}, the config implies {list(want)}"
        for key, want, got in mismatches[:3]
    )
    hint = f"; its sizes: {_sizes(config)}"
    more = f" (and {len(mismatches) - 3} more)" if len(mismatches) > 3 else ""
    return f"{where / 'config.json'} disagrees with its weights in {len(mismatches)} tensor(s): {shown}{more}{hint}"


def checkpoint_problems(path: Path, model: nn.Module, config: PreTrainedConfig) -> tuple[list[str], str]:
    """What is wrong with the weights of checkpoint folder `path` for `model` (built from its config), and a
    one-line summary of what was read; reads headers only."""
    try:
        reader = CheckpointReader(path, allow_pickle=False)
    except CheckpointError as exc:
        return [str(exc)], "weights unreadable"
    problems = []
    mismatches = shape_mismatches(model, reader)
    if mismatches:
        problems.append(mismatch_message(mismatches, reader, config, path))
    names = KeyNames(model)
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False) or config.tie_word_embeddings)
    missing = [
        n
        for n, _ in model.named_parameters()
        if names.find(n, reader) is None and not (tied and n.endswith("lm_head.weight"))
    ]
    if missing:
        problems.append(f"{len(missing)} tensor(s) the model needs are in no shard, e.g. {missing[:3]}")
    unindexed = reader.unindexed()
    if unindexed:
        problems.append(f"{reader.index} does not list {len(unindexed)} tensor(s) of the shards, e.g. {unindexed[:3]}")
    summary = f"{len(reader.keys())} tensors in {len(reader.files)} file(s)"
    return problems, summary
