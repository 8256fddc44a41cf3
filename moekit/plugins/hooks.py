"""Every hook moekit calls, in one typed module. Plug-ins implement them with `from moekit import hookimpl`.

Each hook takes no arguments (so every call is trivially by keyword) and answers with what the plug-in provides:
a list of `Component`s, or `{model_type: Family}` for architecture adapters. moekit merges the answers of all
installed plug-ins (see `moekit.plugins.registry`) and never imports a plug-in itself. See docs/plugins.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pluggy
import pydantic

if TYPE_CHECKING:
    from moekit.plugins.family import Family

PROJECT = "moekit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Kind = Literal["teacher", "position_encoder", "synergy_head", "expert_init", "router_init", "batch_source"]
KINDS: tuple[Kind, ...] = Kind.__args__  # type: ignore[attr-defined]
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


@dataclass(frozen=True)
class Component:
    """One named thing a plug-in provides.

    `params` is the pydantic model (it must forbid extra keys: derive from `moekit.config.StrictModel`) that
    validates the component's parameters where a recipe or spec uses it; `build(params, **context)` makes the
    object from the validated parameters (the context each kind passes is in its hook's docstring).
    `tiny(out, seed)`, when given, writes a small random checkpoint in the component's real on-disk format and
    returns its path (teachers: for smoke tests and the CPU pipeline, `prepare: - {kind: tiny_teacher}`).
    """

    name: str
    kind: Kind
    params: type[pydantic.BaseModel]
    build: Callable[..., Any]
    description: str = ""
    plugin: str = field(default="", compare=False)  # filled in by the registry
    tiny: Callable[..., Any] | None = field(default=None, compare=False)


@hookspec
def moekit_teachers() -> list[Component]:
    """Distillation teachers (kind "teacher"): `build(params)` returns an object with `features(batch)` giving
    teacher features `[B, N, D]` (plus metadata) for a batch of videos or multi-view frames. Weights load from
    local paths only."""


@hookspec
def moekit_position_encoders() -> list[Component]:
    """Position encoders (kind "position_encoder"). Those that act on a VLM's visual tokens take
    `build(params, model=model)` and hook into the tokens the model produces in LLM space (found through
    `moekit.arch.visual_site`); per-batch inputs (depth, poses) go in with `encoder.inputs(...)` and
    `encoder.remove()` unhooks. Index builders (e.g. NEO-ov native RoPE) take `build(params)`."""


@hookspec
def moekit_synergy_heads() -> list[Component]:
    """Synergy heads (kind "synergy_head"): `build(params)` returns an `nn.Module` with
    `prepare(model, tokenizer)` (adds special tokens, sizes its layers to the model) and
    `forward(*, hidden_states, input_ids, teacher) -> dict[str, Tensor]` of named scalar loss terms."""


@hookspec
def moekit_arch_adapters() -> dict[str, Family]:
    """Extra model families: `{model_type: moekit.arch.Family(...)}`, consulted for model types the built-in
    table does not hold (a plug-in may not redefine a built-in family)."""


@hookspec
def moekit_expert_initializers() -> list[Component]:
    """Expert initialisers (kind "expert_init"), named by `experts[i].init` in an UpcycleSpec: `build(params)`
    returns `fn(tensors, *, layer, expert, index, gated, generator) -> tensors`, applied to each expert's
    fused FFN tensors (`up` [2I, H] gated or [I, H], `down` [H, I], optional `up_bias`/`down_bias`) after they
    are copied from their source. It must keep every shape; accept `**_` to stay compatible."""


@hookspec
def moekit_router_initializers() -> list[Component]:
    """Router initialisers (kind "router_init"), named by `router.init` in an UpcycleSpec: `build(params)`
    returns `fn(weight, *, layer, experts, block, generator) -> None` that fills the router weight [M, H] in
    place; `block` is the layer's MoeBlock with its experts already filled. Accept `**_` to stay compatible."""


@hookspec
def moekit_batch_sources() -> list[Component]:
    """Batch sources (kind "batch_source"), named by a recipe stage's `data_source` with its `data_params`:
    `build(params, request=request)` returns an iterable of this process's micro-batches for one epoch (see
    `moekit.train.sources.BatchRequest`; a `len()` counts them, needed for `epochs:`). The default source,
    `data`, is moekit's data layer and needs no plug-in."""


HOOK_KINDS: dict[str, Kind] = {
    "moekit_teachers": "teacher",
    "moekit_position_encoders": "position_encoder",
    "moekit_synergy_heads": "synergy_head",
    "moekit_expert_initializers": "expert_init",
    "moekit_router_initializers": "router_init",
    "moekit_batch_sources": "batch_source",
}
ARCH_HOOK = "moekit_arch_adapters"


def hook_names() -> list[str]:
    """Names of every hookspec in this module."""
    return sorted(name for name, fn in globals().items() if hasattr(fn, f"{PROJECT}_spec"))
