"""Find a model's decoder layers, their FFNs and its visual special tokens; explain refusals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from moekit.arch.families import IMAGE_TOKEN_KEYS, VIDEO_TOKEN_KEYS
from moekit.arch.lookup import family_for, known_families
from moekit.config.record import ArchRecord, FfnRecord, MoeRecord
from moekit.plugins.family import AutoKind, VisualSite

FfnKind = Literal["gated", "fused", "plain"]


@dataclass(frozen=True)
class FfnLayout:
    """Names of one FFN's projections. `gated`: act(gate) * up -> down; `fused`: one gate_up matrix
    (gate rows first); `plain`: act(up) -> down (fc1/fc2)."""

    kind: FfnKind
    up: str
    down: str
    gate: str | None = None
    act: str = "act_fn"

    @property
    def gated(self) -> bool:
        return self.kind != "plain"

    def projections(self) -> tuple[str, ...]:
        return tuple(p for p in (self.gate, self.up, self.down) if p)


# Tried in order on the first decoder layer's FFN.
KNOWN_LAYOUTS = (
    FfnLayout("gated", gate="gate_proj", up="up_proj", down="down_proj"),
    FfnLayout("fused", up="gate_up_proj", down="down_proj"),
    FfnLayout("gated", gate="w1", up="w3", down="w2"),
    FfnLayout("plain", up="fc1", down="fc2"),
    FfnLayout("plain", up="linear_fc1", down="linear_fc2"),
    FfnLayout("plain", up="c_fc", down="c_proj"),
)
ACT_NAMES = ("act_fn", "activation_fn", "act", "activation")


class ArchError(ValueError):
    """The model's layout could not be resolved; the message says what was searched and how to override."""


@dataclass(frozen=True)
class ArchAdapter:
    """Where the surgery acts on one model."""

    model_type: str
    layers: str
    mlp: str
    ffn: FfnLayout
    auto: AutoKind
    num_layers: int
    hidden_size: int
    intermediate_size: int
    image_token_ids: tuple[int, ...] = ()
    video_token_ids: tuple[int, ...] = ()
    biased: bool = False
    known: bool = True
    visual: VisualSite | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def layer(self, model: nn.Module, index: int) -> nn.Module:
        return model.get_submodule(self.layers)[index]

    def ffn_module(self, model: nn.Module, index: int) -> nn.Module:
        return getattr(self.layer(model, index), self.mlp)

    def ffn_prefix(self, index: int) -> str:
        """Module path of layer `index`'s FFN, e.g. `model.language_model.layers.4.mlp`."""
        return f"{self.layers}.{index}.{self.mlp}"

    @classmethod
    def from_record(cls, record: MoeRecord) -> ArchAdapter:
        """The adapter recorded in a moekit model's `config.moekit`."""
        arch = record.arch
        family = family_for(record.base_model_type)
        return cls(
            model_type=record.base_model_type,
            layers=arch.layers,
            mlp=arch.mlp,
            ffn=FfnLayout(**arch.ffn.model_dump()),
            auto=record.auto,
            num_layers=record.num_layers,
            hidden_size=record.hidden_size,
            intermediate_size=record.intermediate_size,
            image_token_ids=tuple(arch.image_token_ids),
            video_token_ids=tuple(arch.video_token_ids),
            biased=record.biased,
            known=family is not None,
            visual=family.visual if family is not None else None,
        )

    def to_record(self) -> ArchRecord:
        return ArchRecord(
            layers=self.layers,
            mlp=self.mlp,
            ffn=FfnRecord(kind=self.ffn.kind, gate=self.ffn.gate, up=self.ffn.up, down=self.ffn.down, act=self.ffn.act),
            image_token_ids=list(self.image_token_ids),
            video_token_ids=list(self.video_token_ids),
        )


def _token_ids(config, keys: tuple[str, ...]) -> tuple[int, ...]:
    ids = []
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return tuple(ids)


def detect_layout(ffn: nn.Module, where: str) -> FfnLayout:
    """The FfnLayout whose projections `ffn` has, with its activation attribute."""
    for layout in KNOWN_LAYOUTS:
        if all(isinstance(getattr(ffn, p, None), nn.Linear) for p in layout.projections()):
            act = next((a for a in ACT_NAMES if isinstance(getattr(ffn, a, None), nn.Module)), None)
            if act is None:
                raise ArchError(
                    f"{where} ({type(ffn).__name__}) has {layout.projections()} but no activation module; looked for {ACT_NAMES}"
                )
            return FfnLayout(layout.kind, up=layout.up, down=layout.down, gate=layout.gate, act=act)
    children = [f"{n}: {type(m).__name__}" for n, m in ffn.named_children()] or ["(no children)"]
    tried = [" + ".join(layout.projections()) for layout in KNOWN_LAYOUTS]
    raise ArchError(
        f"{where} ({type(ffn).__name__}) is not an FFN moekit can split into experts.\n"
        f"  it has: {', '.join(children)}\n  known layouts: {'; '.join(tried)}\n"
        "  pass the projection names by hand: arch: {layers: ..., mlp: ..., gate: ..., up: ..., down: ..., act: ...}"
    )


def _candidates(model: nn.Module) -> list[str]:
    """ModuleLists whose items hold an `mlp`-like child: what an override could point at."""
    found = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module)
            and any(hasattr(module[0], a) for a in ("mlp", "feed_forward", "ffn"))
        ):
            found.append(f"{name} ({len(module)} x {type(module[0]).__name__})")
    return found


def resolve_arch(model: nn.Module, override=None) -> ArchAdapter:
    """Resolve the adapter for `model`, from the family table or from an `ArchOverride`.

    Raises ArchError naming what was searched, what was found and how to pass the paths by hand.
    """
    config = model.config
    record = MoeRecord.of(config)
    if record is not None and override is None:
        return ArchAdapter.from_record(record)
    model_type = config.model_type
    family = family_for(model_type)
    if override is not None:
        layers_path, mlp = override.layers, override.mlp
    elif family is not None:
        layers_path, mlp = family.layers, family.mlp
    else:
        raise ArchError(
            f"model type {model_type!r} ({type(model).__name__}) is not a family moekit knows.\n"
            f"  known families: {', '.join(known_families())}\n"
            f"  decoder-layer lists found in this model: {'; '.join(_candidates(model)) or 'none'}\n"
            "  pass the paths by hand, e.g. UpcycleSpec(arch={'layers': 'model.layers', 'mlp': 'mlp'}) or in YAML\n"
            "  `arch: {layers: model.layers, mlp: mlp}` (add gate/up/down/act for unusual FFN names)"
        )
    try:
        layers = model.get_submodule(layers_path)
    except AttributeError:
        raise ArchError(
            f"{type(model).__name__} has no module {layers_path!r}; decoder-layer lists found: "
            f"{'; '.join(_candidates(model)) or 'none'}"
        ) from None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ArchError(
            f"{layers_path!r} in {type(model).__name__} is {type(layers).__name__}, not a non-empty ModuleList"
        )
    first = layers[0]
    if not hasattr(first, mlp):
        children = ", ".join(n for n, _ in first.named_children())
        raise ArchError(f"{layers_path}.0 ({type(first).__name__}) has no attribute {mlp!r}; its children: {children}")
    ffn = getattr(first, mlp)
    if override is not None and override.up:
        kind = "plain" if override.gate is None and override.kind != "fused" else (override.kind or "gated")
        layout = FfnLayout(
            kind, up=override.up, down=override.down or "down_proj", gate=override.gate, act=override.act or "act_fn"
        )
        for p in layout.projections():
            if not isinstance(getattr(ffn, p, None), nn.Linear):
                raise ArchError(f"{layers_path}.0.{mlp}.{p} is not an nn.Linear in {type(ffn).__name__}")
    else:
        layout = detect_layout(ffn, f"{layers_path}.0.{mlp}")
    up = getattr(ffn, layout.up)
    down = getattr(ffn, layout.down)
    hidden, intermediate = down.out_features, down.in_features
    image_ids = (
        tuple(override.image_token_ids)
        if override is not None and override.image_token_ids
        else _token_ids(config, IMAGE_TOKEN_KEYS)
    )
    video_ids = (
        tuple(override.video_token_ids)
        if override is not None and override.video_token_ids
        else _token_ids(config, VIDEO_TOKEN_KEYS)
    )
    auto = (
        family.auto
        if family is not None
        else ("image-text-to-text" if hasattr(config, "vision_config") else "causal-lm")
    )
    return ArchAdapter(
        model_type=model_type,
        layers=layers_path,
        mlp=mlp,
        ffn=layout,
        auto=auto,
        num_layers=len(layers),
        hidden_size=hidden,
        intermediate_size=intermediate,
        image_token_ids=image_ids,
        video_token_ids=video_ids,
        biased=up.bias is not None or down.bias is not None,
        known=family is not None,
        visual=family.visual if family is not None else None,
    )


def ffn_tensors(ffn: nn.Module, layout: FfnLayout) -> dict[str, torch.Tensor]:
    """A dense FFN's weights in the fused experts convention: `up` ([2I, H] gated / [I, H] plain), `down`
    [H, I], and `up_bias` / `down_bias` when present."""
    down = getattr(ffn, layout.down)
    if layout.kind == "gated":
        gate, up = getattr(ffn, layout.gate), getattr(ffn, layout.up)
        weight = torch.cat([gate.weight, up.weight], dim=0)
        bias = None if gate.bias is None else torch.cat([gate.bias, up.bias], dim=0)
    else:
        up = getattr(ffn, layout.up)
        weight, bias = up.weight, up.bias
    out = {"up": weight.detach(), "down": down.weight.detach()}
    if bias is not None:
        out["up_bias"] = bias.detach()
    if down.bias is not None:
        out["down_bias"] = down.bias.detach()
    return out


def ffn_state_keys(layout: FfnLayout, prefix: str) -> dict[str, list[str]]:
    """State-dict keys that hold each fused tensor of the FFN at `prefix` (gate before up when split)."""
    ups = [f"{prefix}.{p}" for p in ((layout.gate, layout.up) if layout.kind == "gated" else (layout.up,))]
    return {
        "up": [f"{p}.weight" for p in ups],
        "down": [f"{prefix}.{layout.down}.weight"],
        "up_bias": [f"{p}.bias" for p in ups],
        "down_bias": [f"{prefix}.{layout.down}.bias"],
    }
