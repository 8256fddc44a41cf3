"""Synergy heads around a model: built from the plug-in registry and prepared on the model they train with.

A head is an `nn.Module` with `prepare(model, tokenizer)` (it may add special tokens and resize embeddings) and
`forward(*, hidden_states, input_ids, teacher) -> {term: loss}`. A head that reads tokens placed in the prompt
lists them in `placeholder_tokens` (after `prepare`); the data layer puts those tokens after the student's image
in paired samples (`data.synergy_tokens` of them), so the core never names a head's tokens itself.

A head with `feeds_model = True` changes the model's own forward (it hooks a layer in `prepare`), so it is part of
the trained model: `load_heads` attaches such heads again, with their trained weights, when a saved stage output
is opened (the stage's `recipe.yaml` names them; `synergy_heads.safetensors` holds `<head>.<parameter>`). Heads
that only add side losses are left out there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file
from torch import nn

from moekit.config.provenance import RECIPE_FILE
from moekit.plugins.refs import SynergyHeadRef


def build_heads(refs: Sequence[SynergyHeadRef], model: nn.Module, tokenizer: Any, where: str) -> dict[str, nn.Module]:
    """Every head `refs` names, built and prepared on `model` (errors name `where[i]`), in float32."""
    heads = {}
    for index, ref in enumerate(refs):
        loc = f"{where}[{index}]"
        head = ref.build(where=loc)
        if not isinstance(head, nn.Module):
            raise TypeError(f"{loc}: synergy head {ref.name!r} built a {type(head).__name__}, not a torch module")
        head.prepare(model, tokenizer)
        heads[ref.name] = head.float()
    return heads


def placeholder_tokens(heads: Mapping[str, nn.Module]) -> list[str]:
    """The prompt tokens the heads read, in head order (empty when none reads any)."""
    tokens: list[str] = []
    for head in heads.values():
        tokens += list(getattr(head, "placeholder_tokens", ()) or ())
    return tokens


HEADS_FILE = "synergy_heads.safetensors"


def _saved(model_dir: Path) -> tuple[list[tuple[dict, nn.Module, str]], Path]:
    """(ref, built head, location) of every `feeds_model` head the output's recipe.yaml names, and its weights
    file; ([], file) for a folder without any (no recipe.yaml, or only side-loss heads)."""
    from moekit.plugins.registry import registry

    recipe_file = model_dir / RECIPE_FILE
    file = model_dir / HEADS_FILE
    if not recipe_file.is_file():
        return [], file
    stages = (yaml.safe_load(recipe_file.read_text()) or {}).get("stages") or [{}]
    found = []
    for index, ref in enumerate((stages[0].get("losses") or {}).get("synergy") or []):
        where = f"{recipe_file}: stages[0].losses.synergy[{index}]"
        head = registry().build("synergy_head", ref["name"], ref.get("params") or {}, where=where)
        if getattr(head, "feeds_model", False):
            found.append((ref, head, where))
    if found and not file.is_file():
        names = ", ".join(ref["name"] for ref, _, _ in found)
        raise FileNotFoundError(
            f"{recipe_file} names synergy heads that change the model ({names}) but {file} is missing"
        )
    return found, file


def _own_state(state: dict, name: str) -> dict:
    return {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}


def load_heads(model_dir: str | Path, model: nn.Module) -> dict[str, nn.Module]:
    """The `feeds_model` heads a stage output was trained with, attached to `model` with their saved weights
    (in eval mode); `{}` for a folder without any (no recipe.yaml, or only side-loss heads)."""
    found, file = _saved(Path(model_dir))
    if not found:
        return {}
    state = load_file(str(file))
    heads: dict[str, nn.Module] = {}
    for ref, head, _ in found:
        head.prepare(model, None)
        head.float().load_state_dict(_own_state(state, ref["name"]))  # strict: names what is missing or unexpected
        heads[ref["name"]] = head.eval()
    return heads


def inherit_heads(model_dir: str | Path, heads: Mapping[str, nn.Module], where: str) -> None:
    """Start a stage's heads from the weights of the `feeds_model` heads its starting model was trained with.

    Such a head is part of the model's forward, so a stage that starts from the output and does not list it would
    silently train (and save) a different model: that is refused, naming the head and how to keep it.
    """
    found, file = _saved(Path(model_dir))
    if not found:
        return
    state = load_file(str(file))
    for ref, _, _ in found:
        name = ref["name"]
        if name not in heads:
            raise ValueError(
                f"{where}: the model this stage starts from ({model_dir}) was trained with synergy head {name!r}, "
                "which changes its forward; list it here to keep it (its saved weights are loaded; `terms` at 0 "
                "keep it without training its losses)"
            )
        try:
            heads[name].load_state_dict(_own_state(state, name))
        except RuntimeError as exc:
            raise ValueError(
                f"{where}: {name}: the weights saved in {file} do not fit the head this stage builds: {exc}"
            ) from None
