"""Where a stage's batches come from: a batch source called with a `BatchRequest` once per epoch.

A batch source is any function `source(request) -> Iterable[batch]` that yields this process's micro-batches
of one epoch, starting after `request.start` micro-batches (so a resumed run continues where it stopped).
Each batch is a dict of model inputs plus `labels` (-100 except answer tokens) and the extras the trainer pops:
`sample_ids`, `sample_modalities`, `teacher` (see `moekit.data.config`). If the returned object has `len()`,
it is the number of micro-batches in the whole epoch for this process (needed for `epochs:`).

`data_source: data` (the default) is moekit's data layer, reading the stage's `data:` section. Any other name is
a plug-in component of kind `batch_source` (hook `moekit_batch_sources`), built with the stage's `data_params`;
moekit's built-in plug-ins add `tiny` (random batches for the tiny models). `run_plan(plan, batch_source=fn)`
feeds every stage from your own function instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from moekit.plugins import registry as plugin_registry
from moekit.recipe.schema import Stage


@dataclass
class BatchRequest:
    """What a batch source needs to know to produce this process's micro-batches for one epoch."""

    stage: Stage
    model: nn.Module  # the transformers model being trained (family, special token ids)
    tokenizer: Any | None
    batch_size: int  # micro-batch per process
    rank: int
    world_size: int
    epoch: int
    start: int = 0  # micro-batches of this epoch already consumed by this process
    seed: int = 0
    model_dir: Path | None = None  # the folder the model was loaded from (tokenizer / preprocessor files)
    synergy_tokens: list[str] = field(default_factory=list)  # placeholders the stage's synergy heads read
    extra: dict[str, Any] = field(default_factory=dict)


BatchSource = Callable[[BatchRequest], Iterable[dict[str, Any]]]


def data_layer_source(request: BatchRequest) -> Iterable[dict[str, Any]]:
    """The stage's `data:` section through the data layer: `moekit.data.iter_batches(request)`."""
    from moekit.data import iter_batches

    return iter_batches(request)


def get_batch_source(stage: Stage, where: str = "stage") -> BatchSource:
    """The batch source a stage names: the data layer, or a `batch_source` plug-in built with `data_params`."""
    if stage.data_source == "data":
        return data_layer_source
    reg = plugin_registry.registry()
    try:
        component = reg.get("batch_source", stage.data_source)
    except ValueError as exc:
        raise ValueError(f"{where}.data_source: {exc}") from None
    params = reg.params_for("batch_source", stage.data_source, stage.data_params)
    return lambda request: component.build(params, request=request)
