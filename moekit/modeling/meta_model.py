"""Build a model from a config alone on the meta device: shapes and parameter counts, no weights, no memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from moekit.config.record import MoeRecord


def read_config(path: str | Path) -> PreTrainedConfig:
    """A transformers config from a checkpoint directory or a config.json file (local only)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json in this directory")
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if "model_type" not in data:
        raise ValueError(f"{path}: no 'model_type' key; is this a transformers config.json?")
    return AutoConfig.for_model(**data)


def model_class(config: PreTrainedConfig) -> type:
    """The transformers class a config's checkpoint is: moekit's class for an MoE config, else the class its
    `architectures` names (when transformers has it), else the family's class in transformers' mappings."""
    from moekit.modeling.classes import dense_class, moekit_classes

    record = MoeRecord.of(config)
    if record is not None:
        return moekit_classes(record.base_model_type, record.model_class)[1]
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and isinstance(config, cls.config_class):
            return cls
    return dense_class(config.model_type, None)


def meta_model(config: PreTrainedConfig) -> nn.Module:
    """Instantiate the model for `config` on the meta device."""
    with torch.device("meta"):
        return model_class(config)._from_config(config)
