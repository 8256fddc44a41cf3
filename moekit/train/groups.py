"""Trainable groups (`projector`, `ffn`, `router`, ...) resolved to the parameters of one model.

Paths come from the architecture adapter (`moekit.arch.resolve_arch`: decoder layers and FFNs) and the family
table (`vision`, `projector`); MoE blocks are found by type (`MoeBlock.gate` is the router, `.experts` and
`.shared_expert` the experts). Parameters are named as in the `TrainModule` that holds the model
(`model.<name in model.named_parameters()>`, `synergy_heads.<head>.<param>`,
`position_encoders.<encoder>.<param>`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from moekit.arch import family_for, resolve_arch
from moekit.config.record import dense_model_type
from moekit.moe import MoeBlock
from moekit.recipe.schema import GROUP_NAMES, Group

# Used when a family is not in the table: names VLMs commonly give their projector.
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "merger", "connector")


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _params(module: nn.Module | None) -> list[nn.Parameter]:
    return [] if module is None else list(module.parameters())


def _at(model: nn.Module, path: str) -> list[nn.Parameter]:
    """Parameters of the module (or the single parameter) at `path`; none when the path does not exist."""
    try:
        return _params(model.get_submodule(path))
    except AttributeError:
        pass
    try:
        return [model.get_parameter(path)]
    except AttributeError:
        return []


def _projector(model: nn.Module) -> list[nn.Parameter]:
    family = family_for(dense_model_type(model))
    if family is not None:
        return [p for path in family.projector for p in _at(model, path)]
    found = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTOR_NAMES]
    return [p for m in found for p in m.parameters()]


def _vision(model: nn.Module) -> list[nn.Parameter]:
    family = family_for(dense_model_type(model))
    path = family.vision if family is not None else None
    if path is None:
        found = [
            n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in ("visual", "vision_tower", "vision_model")
        ]
        path = found[0] if found else None
    projector = {id(p) for p in _projector(model)}
    return [p for p in (_at(model, path) if path else []) if id(p) not in projector]


def _decoder_parts(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    adapter = resolve_arch(model)
    layers = model.get_submodule(adapter.layers)
    parts: dict[str, list[nn.Parameter]] = {"decoder": _params(layers), "ffn": [], "router": [], "experts": []}
    for layer in layers:
        ffn = adapter.block_of(layer)
        if isinstance(ffn, MoeBlock):
            parts["router"] += _params(ffn.gate)
            parts["experts"] += _params(ffn.experts)
            if ffn.shared_expert is not None:
                parts["router"] += _params(ffn.shared_expert.gate)
                parts["experts"] += _params(ffn.shared_expert.expert)
        else:
            parts["ffn"] += adapter.ffn_parameters(layer)
    return parts


def group_parameters(train_module: nn.Module) -> dict[str, set[int]]:
    """`id(parameter)` sets of every named group for a `TrainModule` (attributes `model`, `synergy_heads`,
    `position_encoders`)."""
    model = hf_model(train_module.model)
    groups: dict[str, list[nn.Parameter]] = {
        "projector": _projector(model),
        "vision_tower": _vision(model),
        "embeddings": _params(model.get_input_embeddings()),
        "new_token_embeddings": list(getattr(model.get_input_embeddings(), "new_rows_parameters", lambda: [])()),
        "lm_head": _params(model.get_output_embeddings()),
        **_decoder_parts(model),
        "synergy_heads": _params(train_module.synergy_heads),
        "position_encoders": _params(train_module.position_encoders),
        "all": list(train_module.parameters()),
    }
    lora = {id(p) for n, p in train_module.named_parameters() if "lora_" in n}
    out = {name: {id(p) for p in params} - lora for name, params in groups.items()}
    # Embedding rows added in this stage are their own parameter (see embeddings.py), not part of `embeddings`.
    out["embeddings"] -= out["new_token_embeddings"]
    out["lora"] = lora
    out["all"] |= lora
    return out


def select(train_module: nn.Module, groups: Iterable[Group], where: str) -> list[str]:
    """Names of the parameters the groups select, in module order; a group that selects nothing is an error."""
    table = group_parameters(train_module)
    names = {id(p): n for n, p in train_module.named_parameters()}
    chosen: set[int] = set()
    for group in groups:
        if group.pattern is not None:
            regex = re.compile(group.pattern)
            hits = {id(p) for n, p in train_module.named_parameters() if regex.search(n.removeprefix("model."))}
        else:
            hits = table[group.name]
        if not hits:
            present = [g for g in GROUP_NAMES if table.get(g)]
            kind = dense_model_type(hf_model(train_module.model))
            raise ValueError(
                f"{where}: group {group} selects no parameter of this {kind} model; groups with parameters here: "
                f"{', '.join(present)}"
                + (f" (parameter names look like {sorted(names.values())[:3]})" if group.pattern is not None else "")
            )
        chosen |= hits
    return [n for n, p in train_module.named_parameters() if id(p) in chosen]


def set_trainable(train_module: nn.Module, names: Iterable[str]) -> int:
    """Give exactly the parameters `names` gradients; return how many elements train."""
    wanted = set(names)
    count = 0
    for name, param in train_module.named_parameters():
        param.requires_grad_(name in wanted)
        count += param.numel() if name in wanted else 0
    return count
