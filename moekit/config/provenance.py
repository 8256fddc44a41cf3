"""`Provenance`: how a folder moekit wrote was made, kept as `moekit.json` beside what it describes.

Every folder moekit writes (a stage output, an upcycled or exported checkpoint, a tiny bundle, a synthetic
dataset) carries one, written by `write_provenance` and read by `read_provenance`: the moekit version, the
command that made it, and what that command knows (the stage and its recipe, the upcycle spec and its sources,
the position encoders saved with a model, the parameters of a generated bundle). A recipe that made the folder
is kept as `recipe.yaml` beside it. Folders from moekit 0.1 still read: their `moekit.yaml` (upcycle outputs)
and flat `moekit.json` (stage outputs) map onto the same record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from moekit._version import __version__
from moekit.config.base import StrictModel, parse_config

FILE = "moekit.json"
RECIPE_FILE = "recipe.yaml"
LEGACY_FILE = "moekit.yaml"  # moekit 0.1's record of `moekit upcycle`
PROVENANCE_FILES = (FILE, RECIPE_FILE, LEGACY_FILE)  # a source's provenance, never copied into a new output
ENCODERS_FILE = "position_encoders.safetensors"  # weights of the position encoders `position_encoders` lists
RECORD_VERSION = 2

Format = Literal["full", "ffn_only", "lora_adapter"]


class EncoderRef(StrictModel):
    """A position encoder saved with a model: its component name and parameters."""

    name: str
    params: dict[str, Any] = {}


class Provenance(StrictModel):
    """The record in `moekit.json`. `format` says what the folder holds: a whole model (`full`), only the decoder
    FFN tensors of a dense model (`ffn_only`, stage 1-2 specialists) or a peft adapter (`lora_adapter`)."""

    version: int = RECORD_VERSION
    moekit_version: str = __version__
    made_by: str = Field(description="the command that wrote the folder, e.g. 'moekit run'")
    format: Format = "full"
    # a training stage's output
    stage: str | None = None
    recipe: str | None = None
    started_from: Any = None
    steps: int | None = None
    tokens: int | None = None
    resumed: list[dict[str, Any]] = Field(
        default_factory=list, description="checkpoints the stage resumed from: step, checkpoint, accepted changes"
    )
    # an ffn_only output: the decoder's layer count and the tensor names it holds
    layers: int | None = None
    keys: list[str] | None = None
    # an upcycled checkpoint
    spec: dict[str, Any] | None = None
    sources: dict[str, Any] | None = None
    moe_layers: list[int] | None = None
    # what travels with a model
    position_encoders: list[EncoderRef] = []
    synergy_tokens: list[str] = Field(
        default_factory=list, description="tokens a synergy head placed in the prompts the model was trained on"
    )
    # anything else the command that made the folder was given (bundle sizes, a dataset's spec and files)
    params: dict[str, Any] = {}

    def to_json(self) -> dict[str, Any]:
        """The JSON form, without the fields this folder has nothing for."""
        data = self.model_dump(mode="json", exclude_none=True)
        return {k: v for k, v in data.items() if v != [] and v != {}}


def write_provenance(folder: str | Path, record: Provenance, recipe: dict[str, Any] | None = None) -> Path:
    """Write `record` as `folder/moekit.json` (and `recipe` as `recipe.yaml`); `folder` is usually a temporary
    directory that `moekit.io.atomic_dir` renames when the whole output is written."""
    folder = Path(folder)
    (folder / FILE).write_text(json.dumps(record.to_json(), indent=2) + "\n")
    if recipe is not None:
        (folder / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder / FILE


def read_provenance(folder: str | Path) -> Provenance | None:
    """The record of a folder moekit wrote, or None when it has none (a checkpoint from elsewhere)."""
    folder = Path(folder)
    file = folder / FILE
    if file.is_file():
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and "version" not in data:  # moekit 0.1: a stage output or carried encoders
            data.setdefault("made_by", "moekit run" if "stage" in data else "moekit upcycle")
            data["version"] = 1
        return _parse(data, str(file))
    legacy = folder / LEGACY_FILE
    if legacy.is_file():
        data = yaml.safe_load(legacy.read_text()) or {}
        if isinstance(data, dict):
            data = {"made_by": "moekit upcycle", "version": 1, **data}
        return _parse(data, str(legacy))
    return None


def _parse(data: Any, source: str) -> Provenance:
    return parse_config(Provenance, data, source=source)
