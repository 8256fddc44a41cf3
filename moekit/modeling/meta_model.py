"""Build a model from a config alone on the meta device: shapes and parameter counts, no weights, no memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedConfig


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


def meta_model(config: PreTrainedConfig) -> nn.Module:
    """Instantiate the model for `config` on the meta device."""
    auto = (
        AutoModelForImageTextToText if "vision_config" in getattr(config, "sub_configs", {}) else AutoModelForCausalLM
    )
    with torch.device("meta"):
        return auto.from_config(config)
