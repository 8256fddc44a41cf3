"""Every hook moekit calls, in one typed module. Plug-ins implement them with `from moekit import hookimpl`.

Hooks are called by keyword and return lists of `Component`s (or `Family` entries for architecture adapters);
moekit merges the answers of all installed plug-ins. See docs/plugins.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy
import pydantic

PROJECT = "moekit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Kind = Literal["teacher", "position_encoder", "synergy_head", "expert_init", "router_init"]
KINDS: tuple[Kind, ...] = ("teacher", "position_encoder", "synergy_head", "expert_init", "router_init")


@dataclass(frozen=True)
class Component:
    """One named thing a plug-in provides.

    `params` is the pydantic model (with `extra="forbid"`) that validates the component's parameters where a
    recipe uses it; `build(params, **context)` makes the object.
    """

    name: str
    kind: Kind
    params: type[pydantic.BaseModel]
    build: Callable[..., Any]
    description: str = ""
    plugin: str = field(default="", compare=False)  # filled in by the registry


@hookspec
def moekit_teachers() -> list[Component]:
    """Distillation teachers: `build(params)` returns an object with `features(batch) -> TeacherOutput`
    (features `[B, N, D]` plus metadata). Weights load from local paths only."""


@hookspec
def moekit_position_encoders() -> list[Component]:
    """Position encoders that add to (or index) a VLM's visual tokens, e.g. PolyV's 3D sinusoidal encoding."""


@hookspec
def moekit_synergy_heads() -> list[Component]:
    """Heads that read the MoE-LLM's hidden states and return named distillation loss terms."""


@hookspec
def moekit_arch_adapters() -> dict[str, Any]:
    """Extra model families: `{model_type: moekit.arch.Family(...)}`, merged into the built-in table."""


@hookspec
def moekit_expert_initializers() -> list[Component]:
    """Expert initialisers: `build(params)` returns `fn(tensors, generator) -> tensors` applied to each
    expert's fused FFN tensors (`up`, `down`, optional biases) after they are copied from their source."""


@hookspec
def moekit_router_initializers() -> list[Component]:
    """Router initialisers: `build(params)` returns `fn(weight [M, H], layer, generator) -> None` filling
    the router weight in place."""


HOOK_KINDS: dict[str, Kind] = {
    "moekit_teachers": "teacher",
    "moekit_position_encoders": "position_encoder",
    "moekit_synergy_heads": "synergy_head",
    "moekit_expert_initializers": "expert_init",
    "moekit_router_initializers": "router_init",
}
