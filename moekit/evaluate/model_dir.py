"""Open a model folder for inference: the model (dense or moekit MoE, in eval mode), its preprocessor, and the
position encoders saved with it, attached. Evaluation, routing analysis, reports and router calibration all
open folders this way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from moekit.attach.position import load_encoders
from moekit.attach.synergy import load_heads
from moekit.config.provenance import read_provenance
from moekit.data.preprocess import Preprocessor
from moekit.modeling.load import load, load_any


@dataclass
class ModelDir:
    """An opened model folder."""

    path: Path
    model: nn.Module
    preprocessor: Preprocessor
    encoders: dict[str, nn.Module] = field(default_factory=dict)
    heads: dict[str, nn.Module] = field(default_factory=dict)  # synergy heads that change the forward (CTA)

    @property
    def is_moe(self) -> bool:
        return getattr(self.model.config, "moekit", None) is not None


def open_model_dir(
    path: str | Path, tokenizer: str | Path | None = None, *, moe: bool = False, **load_kwargs: Any
) -> ModelDir:
    """Open `path` (local files, safetensors only). `tokenizer`: a folder to take the tokenizer from when `path`
    has none; `moe=True` refuses a dense model with the reason. The synergy tokens a model was trained with (its
    `moekit.json`) reach the preprocessor, and its saved position encoders and the synergy heads that change its
    forward (`moekit.attach.synergy.load_heads`) are attached to the model."""
    path = Path(path)
    record = read_provenance(path)
    preprocessor = Preprocessor.from_dir(path, tokenizer, synergy_tokens=record.synergy_tokens if record else ())
    model = (load(path, **load_kwargs) if moe else load_any(path, **load_kwargs)).eval()
    return ModelDir(path, model, preprocessor, load_encoders(path, model), load_heads(path, model))
