"""Where the surgery acts on one model: its decoder layers, their FFNs, its visual special tokens; explained refusals.

`resolve_arch(model)` finds all of it by structure (`moekit.arch.detect`), for every family alike; the family
table adds only what structure cannot give (visual-token sites, projector paths, stock MoE twins). An
`ArchOverride` names the paths by hand; an upcycled model answers from its `MoeRecord`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from moekit.arch import detect
from moekit.arch.families import IMAGE_TOKEN_KEYS, VIDEO_TOKEN_KEYS
from moekit.arch.lookup import family_for
from moekit.config.record import ArchRecord, FfnRecord, MoeRecord
from moekit.plugins.family import AutoKind, VisualSite

FfnKind = Literal["gated", "fused", "plain"]


@dataclass(frozen=True)
class FfnLayout:
    """One FFN's projections. `gated`: act(gate) * up -> down; `fused`: one gate_up matrix whose gate half is
    first (`gate_first`) or second; `plain`: act(up) -> down. `transposed`: weights stored [in, out] (GPT-2's
    `Conv1D`). The activation is the FFN's child `act`, or `ACT2FN[act_fn]` when its forward calls a function."""

    kind: FfnKind
    up: str
    down: str
    gate: str | None = None
    act: str = "act_fn"
    act_fn: str | None = None
    gate_first: bool = True
    transposed: bool = False

    @property
    def gated(self) -> bool:
        return self.kind != "plain"

    def projections(self) -> tuple[str, ...]:
        return tuple(p for p in (self.gate, self.up, self.down) if p)

    def activation(self, ffn: nn.Module | None = None) -> nn.Module:
        """The FFN's activation as a module (a fresh one from transformers when it is a config name)."""
        if self.act_fn is not None:
            return ACT2FN[self.act_fn]
        if ffn is None:
            raise ValueError("this FFN's activation is a module of the FFN; pass the FFN")
        return getattr(ffn, self.act)

    def fuse(
        self,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor | None],
        down: torch.Tensor,
        down_bias,
        up_out: torch.Tensor | None = None,
    ):
        """moekit's fused convention from the projections as stored (`weights`/`biases` of gate then up, or of
        the one up matrix): `up` [2I, H] gate rows first (gated, fused) or [I, H], `down` [H, I], biases. Joined
        projections are written into `up_out` when given (of the fused shape and the weights' dtype)."""
        if self.transposed:
            weights, down = [w.t() for w in weights], down.t()
        up = weights[0] if len(weights) == 1 else torch.cat(weights, 0, out=up_out)
        bias = None if biases[0] is None else (biases[0] if len(biases) == 1 else torch.cat(biases, 0))
        if self.kind == "fused" and not self.gate_first:
            up = torch.cat(up.chunk(2, 0)[::-1], 0)
            bias = None if bias is None else torch.cat(bias.chunk(2, 0)[::-1], 0)
        out = {"up": up.detach(), "down": down.detach()}
        if bias is not None:
            out["up_bias"] = bias.detach()
        if down_bias is not None:
            out["down_bias"] = down_bias.detach()
        return out

    def to_record(self) -> FfnRecord:
        return FfnRecord(
            kind=self.kind,
            gate=self.gate,
            up=self.up,
            down=self.down,
            act=self.act,
            act_fn=self.act_fn,
            gate_first=self.gate_first,
            transposed=self.transposed,
        )


class ArchError(ValueError):
    """The model cannot be upcycled as it is; the message says why in one sentence and what the user can do."""


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
    model_class: str | None = None  # the dense transformers class the model was (for moekit's class)
    settled: bool = True  # False when names, not a probe, chose the gate order (meta-device models)
    inline: bool = False  # the FFN's projections are the decoder layer's own children (OPT's fc1 / fc2)
    extra: dict = field(default_factory=dict, compare=False)

    def layer(self, model: nn.Module, index: int) -> nn.Module:
        return model.get_submodule(self.layers)[index]

    def ffn_module(self, model: nn.Module, index: int) -> nn.Module:
        """The module whose children are layer `index`'s dense FFN projections (the layer itself when inline)."""
        layer = self.layer(model, index)
        return layer if self.inline else layer.get_submodule(self.mlp)

    def ffn_prefix(self, index: int) -> str:
        """Module path of layer `index`'s dense FFN, e.g. `model.language_model.layers.4.mlp` (the layer's path
        when the FFN is inline)."""
        return f"{self.layers}.{index}" if self.inline else f"{self.layers}.{index}.{self.mlp}"

    def ffn_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        """The dense FFN's parameters in one decoder layer (its projections' when the FFN is inline)."""
        if self.inline:
            return [p for name in self.ffn.projections() for p in getattr(layer, name).parameters()]
        return list(layer.get_submodule(self.mlp).parameters())

    def block_of(self, layer: nn.Module) -> nn.Module | None:
        """The module at the FFN's place in one decoder layer: its MoE block once upcycled (None for inline FFNs
        still dense)."""
        try:
            return layer.get_submodule(self.mlp)
        except AttributeError:
            return None

    def moe_prefix(self, index: int) -> str:
        """Module path of layer `index`'s MoE block once upcycled."""
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
            model_class=record.model_class,
            inline=arch.inline,
        )

    def settled_on(self, ffn: nn.Module, config: Any) -> ArchAdapter:
        """This adapter with the gate order and activation settled by a probe of `ffn`, a real (not meta) copy of
        the first layer's FFN: what detection on the meta device left to the projections' names."""
        if self.settled:
            return self
        match = detect.match_ffn(ffn, self.hidden_size)
        if match is None:
            raise ArchError(_not_an_ffn(f"{self.layers}.0.{self.mlp}", ffn, self.hidden_size))
        probe = _ProbeModel(config)
        layout, _, computed = _detected_layout(probe, ffn, match, f"{self.layers}.0.{self.mlp}")
        return replace(self, ffn=layout, settled=computed)

    def to_record(self) -> ArchRecord:
        return ArchRecord(
            layers=self.layers,
            mlp=self.mlp,
            inline=self.inline,
            ffn=self.ffn.to_record(),
            image_token_ids=list(self.image_token_ids),
            video_token_ids=list(self.video_token_ids),
        )


def _token_ids(config, keys: tuple[str, ...]) -> tuple[int, ...]:
    ids = []
    for source in (config, detect.text_config(config)):
        for key in keys:
            value = getattr(source, key, None)
            if isinstance(value, int) and value not in ids:
                ids.append(value)
    return tuple(ids)


def auto_kind(model: nn.Module) -> AutoKind:
    """The Auto class a model belongs to, from its own class in transformers' mappings (the config's shape
    only when the class is in neither)."""
    name = type(model).__name__
    if name in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values():
        return "image-text-to-text"
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "causal-lm"
    config = model.config
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "image-text-to-text"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    return "image-text-to-text" if hasattr(config, "vision_config") else "causal-lm"


HOW_TO_OVERRIDE = (
    "name the paths by hand: UpcycleSpec(arch={'layers': 'model.layers', 'mlp': 'mlp'}) or in YAML "
    "`arch: {layers: model.layers, mlp: mlp}` (add gate/up/down/act for unusual FFN names)"
)


def _refuse_layers(model: nn.Module, reason: str) -> ArchError:
    return ArchError(
        f"{type(model).__name__} ({model.config.model_type}) cannot be upcycled: {reason}.\n"
        f"  decoder-layer lists found: {'; '.join(_candidates(model)) or 'none'}\n  {HOW_TO_OVERRIDE}"
    )


def _candidates(model: nn.Module) -> list[str]:
    """ModuleLists whose items hold an `mlp`-like child: what an override could point at."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and isinstance(module[0], nn.Module):
            children = dict(module[0].named_children())
            if len(children) >= 2:
                found.append(f"{name} ({len(module)} x {type(module[0]).__name__})")
    return found[:8]


def _describe(module: nn.Module) -> str:
    parts = []
    for name, child in module.named_children():
        proj = detect.projection(name, child)
        shape = f" {proj.in_features}->{proj.out_features}" if proj is not None else ""
        parts.append(f"{name}: {type(child).__name__}{shape}")
    return ", ".join(parts) or "(no children)"


def _layers(model: nn.Module, override, family) -> tuple[str, nn.ModuleList]:
    path = override.layers if override is not None else getattr(family, "layers", None)
    if path is None:
        if _encoder_only(model):
            raise _refuse_layers(model, ENCODER_ONLY)
        try:
            return detect.find_layers(model)
        except detect.DetectError as exc:
            why = _not_a_dense_decoder(model)
            if why is not None:
                raise _refuse_layers(model, why) from None
            inline = []
            hidden = detect.hidden_size(model.config)
            for name, module in model.named_modules():
                is_list = isinstance(module, nn.ModuleList) and len(module) and hidden is not None
                if is_list and detect.inline_ffn(module[0], hidden):
                    inline.append((name, module))
            if inline:
                name, module = inline[0]
                projs = ", ".join(detect.inline_ffn(module[0], hidden))
                raise _refuse_layers(
                    model,
                    f"no FFN module: the FFN is inline in the layer ({projs} of {type(module[0]).__name__} at "
                    f"{name}), and moekit replaces FFN modules",
                ) from None
            raise _refuse_layers(model, str(exc)) from None
    try:
        layers = model.get_submodule(path)
    except AttributeError:
        raise _refuse_layers(model, f"it has no module {path!r}") from None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ArchError(f"{path!r} in {type(model).__name__} is {type(layers).__name__}, not a non-empty ModuleList")
    return path, layers


ENCODER_ONLY = "encoder-only: its layers are an encoder (BERT-style); moekit upcycles decoders"


def _encoder_only(model: nn.Module) -> bool:
    """A BERT-style model (its only layer lists sit in an `encoder`), even when used as a causal LM."""
    lists = [p for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    encoder = [p for p in lists if ".encoder." in f".{p}." and not _in_vision(p)]
    decoder = [p for p in lists if "decoder" in p or "language_model" in p or "text_model" in p]
    return bool(encoder) and not decoder and not any(p.endswith(("model.layers", "transformer.h")) for p in lists)


def _in_vision(path: str) -> bool:
    return any(w in path for w in ("vision", "visual", "image", "audio"))


def _not_a_dense_decoder(model: nn.Module) -> str | None:
    """Why a model with no findable decoder FFN is not a dense decoder at all (already MoE, encoder-only,
    state-space), or None."""
    moe = detect.moe_module(model)
    if moe is not None:
        return f"already MoE: {moe} routes tokens to experts; moekit upcycles dense models"
    if _encoder_only(model):
        return ENCODER_ONLY
    kinds = {type(m).__name__.lower() for m in model.modules()}
    if any(w in k for k in kinds for w in detect.SSM_WORDS):
        return "no FFN: its layers are state-space / recurrent mixers without a separate feed-forward network"
    return None


def _override_layout(ffn: nn.Module, override, where: str) -> tuple[FfnLayout, int, int]:
    kind = "plain" if override.gate is None and override.kind != "fused" else (override.kind or "gated")
    layout = FfnLayout(
        kind, up=override.up, down=override.down or "down_proj", gate=override.gate, act=override.act or "act_fn"
    )
    found = {}
    for name in layout.projections():
        proj = detect.projection(name, getattr(ffn, name, None) or nn.Identity())
        if proj is None:
            raise ArchError(f"{where}.{name} is not an nn.Linear (or Conv1D) in {type(ffn).__name__}: {_describe(ffn)}")
        found[name] = proj
    down = found[layout.down]
    transposed = down.transposed
    return FfnLayout(**{**layout.__dict__, "transposed": transposed}), down.out_features, down.in_features


def resolve_arch(model: nn.Module, override=None) -> ArchAdapter:
    """The adapter for `model`: decoder layers and FFN layout by structure (or from an `ArchOverride`).

    Raises ArchError with the reason in one sentence, what was found, and how to pass the paths by hand.
    """
    config = model.config
    record = MoeRecord.of(config)
    if record is not None and override is None:
        return ArchAdapter.from_record(record)
    if record is not None:
        raise ArchError("this model is already an MoE model made by moekit; upcycle its dense base instead")
    cached = model.__dict__.get("_moekit_arch")
    if override is None and cached is not None:
        return cached  # detection probes the FFN: do it once per model (it may be sharded later)
    moe = detect.moe_module(model)
    if moe is not None and override is None:
        raise ArchError(
            f"{type(model).__name__} ({config.model_type}) cannot be upcycled: already MoE: {moe} routes tokens to "
            "experts; moekit upcycles dense models (upcycle the family's dense relative instead)"
        )
    family = family_for(config.model_type)
    layers_path, layers = _layers(model, override, family)
    first = layers[0]
    where = f"{layers_path}.0"
    hidden = detect.hidden_size(config)
    if override is not None:
        if not hasattr(first, override.mlp):
            raise ArchError(
                f"{where} ({type(first).__name__}) has no attribute {override.mlp!r}; its children: {_describe(first)}"
            )
        mlp = override.mlp
        ffn = getattr(first, mlp)
        settled = True
        if override.up:
            layout, hidden, intermediate = _override_layout(ffn, override, f"{where}.{mlp}")
            match = None
        else:
            match = detect.match_ffn(ffn, hidden) if hidden else None
            if match is None:
                raise ArchError(_not_an_ffn(f"{where}.{mlp}", ffn, hidden))
    else:
        found = detect.find_ffn(first, hidden)
        if found is None:
            inline_match = detect.match_ffn(first, hidden) if hidden else None
            if inline_match is None or inline_match[0] != "plain":
                reason = (
                    f"no FFN module: the gated FFN is inline in the layer ({type(first).__name__})"
                    if inline_match is not None
                    else f"no child of {where} ({type(first).__name__}) is an FFN of width {hidden}: {_describe(first)}"
                )
                raise _refuse_layers(model, reason)
            return _inline_adapter(model, layers_path, layers, inline_match, family)
        mlp, ffn = found.attr, first.get_submodule(found.attr)
        if any(w in type(ffn).__name__.lower() for w in detect.SSM_WORDS):
            raise _refuse_layers(
                model,
                f"no FFN: {where}.{mlp} ({type(ffn).__name__}) is a state-space / recurrent mixer, not a feed-forward "
                "network",
            )
        match = (found.kind, list(found.ups), found.down, found.intermediate)
    problem = detect.signature_problem(ffn)
    if problem is not None:
        raise ArchError(
            f"{where}.{mlp} ({type(ffn).__name__}) cannot become an MoE block: {problem}; moekit's MoE block is "
            "called with the hidden states alone"
        )
    if match is not None:
        layout, intermediate, settled = _detected_layout(model, ffn, match, f"{where}.{mlp}")
        hidden = match[2].out_features
    biased = any(getattr(getattr(ffn, p), "bias", None) is not None for p in layout.projections())
    adapter = ArchAdapter(
        model_type=config.model_type,
        layers=layers_path,
        mlp=mlp,
        ffn=layout,
        auto=auto_kind(model),
        num_layers=len(layers),
        hidden_size=hidden,
        intermediate_size=intermediate,
        image_token_ids=_ids(override, "image_token_ids") or _token_ids(config, IMAGE_TOKEN_KEYS),
        video_token_ids=_ids(override, "video_token_ids") or _token_ids(config, VIDEO_TOKEN_KEYS),
        biased=biased,
        known=family is not None,
        visual=family.visual if family is not None else None,
        model_class=type(model).__name__,
        settled=settled,
    )
    if override is None and settled:
        model.__dict__["_moekit_arch"] = adapter
    return adapter


def _inline_adapter(model: nn.Module, layers_path: str, layers: nn.ModuleList, match: tuple, family) -> ArchAdapter:
    """An FFN written into the layer (up -> activation -> down with the layer's own modules): the MoE block goes
    beside them as `moe`, and they are replaced by its two halves (moekit.moe.inline)."""
    _, ups, down, intermediate = match
    first = layers[0]
    act = detect.activation_attr(first)
    names = detect.config_activations(model.config)
    if act is None and not names:
        raise ArchError(
            f"{layers_path}.0 ({type(first).__name__}): its inline FFN's activation is neither a module of the layer "
            "nor named by the config (hidden_act / activation_function)"
        )
    layout = FfnLayout(
        "plain",
        up=ups[0].name,
        down=down.name,
        act=act or "act_fn",
        act_fn=None if act else names[0],
        transposed=down.transposed,
    )
    config = model.config
    adapter = ArchAdapter(
        model_type=config.model_type,
        layers=layers_path,
        mlp="moe",
        ffn=layout,
        auto=auto_kind(model),
        num_layers=len(layers),
        hidden_size=down.out_features,
        intermediate_size=intermediate,
        image_token_ids=_token_ids(config, IMAGE_TOKEN_KEYS),
        video_token_ids=_token_ids(config, VIDEO_TOKEN_KEYS),
        biased=any(getattr(first, p).bias is not None for p in layout.projections()),
        known=family is not None,
        visual=family.visual if family is not None else None,
        model_class=type(model).__name__,
        inline=True,
    )
    model.__dict__["_moekit_arch"] = adapter
    return adapter


class _ProbeModel:
    """What `_detected_layout` reads of a model: its config."""

    def __init__(self, config: Any):
        self.config = config


def _ids(override, key: str) -> tuple[int, ...]:
    return tuple(getattr(override, key)) if override is not None and getattr(override, key) else ()


def _not_an_ffn(where: str, ffn: nn.Module, hidden: int | None) -> str:
    return (
        f"{where} ({type(ffn).__name__}) is not an FFN moekit can split into experts: its projections do not chain "
        f"{hidden} -> I -> {hidden} as gate/up/down, fused gate_up/down or up/down.\n  it has: {_describe(ffn)}\n"
        f"  {HOW_TO_OVERRIDE}"
    )


def _detected_layout(model: nn.Module, ffn: nn.Module, match: tuple, where: str) -> tuple[FfnLayout, int, bool]:
    """The layout a probe (or, on the meta device, the names) settles, its width I, and whether a probe did."""
    kind, ups, down, intermediate = match
    found = detect.FfnMatch("", kind, tuple(ups), down, intermediate, detect.activation_attr(ffn))
    settled = detect.settle(ffn, found, model.config)
    if settled is None:
        extra = [
            f"{n}: {type(c).__name__}"
            for n, c in ffn.named_children()
            if n not in {p.name for p in (*ups, down)} and n != found.act_attr
        ]
        beyond = f"beyond its projections it has {', '.join(extra)}" if extra else "its forward does more with them"
        raise ArchError(
            f"{where} ({type(ffn).__name__}) computes more than act(gate) * up -> down ({beyond}): no gate order "
            "or activation reproduces its output on a probe input, so MoE experts made from its projections would "
            "change the model. moekit refuses to upcycle it."
        )
    if kind == "gated":
        gate, up = (ups[0], ups[1]) if settled.gate_first else (ups[1], ups[0])
        layout = FfnLayout("gated", gate=gate.name, up=up.name, down=down.name)
    else:
        layout = FfnLayout(kind, up=ups[0].name, down=down.name, gate_first=settled.gate_first)
    layout = FfnLayout(
        **{
            **layout.__dict__,
            "act": settled.act_attr or "act_fn",
            "act_fn": settled.act_name,
            "transposed": down.transposed,
        }
    )
    return layout, intermediate, settled.computed


def ffn_tensors(ffn: nn.Module, layout: FfnLayout) -> dict[str, torch.Tensor]:
    """A dense FFN's weights in the fused experts convention: `up` ([2I, H] gated / [I, H] plain), `down`
    [H, I], and `up_bias` / `down_bias` when present."""
    ups = [getattr(ffn, p) for p in ((layout.gate, layout.up) if layout.kind == "gated" else (layout.up,))]
    down = getattr(ffn, layout.down)
    return layout.fuse([u.weight for u in ups], [u.bias for u in ups], down.weight, down.bias)


def ffn_state_keys(layout: FfnLayout, prefix: str) -> dict[str, list[str]]:
    """State-dict keys that hold each fused tensor of the FFN at `prefix` (gate before up when split)."""
    ups = [f"{prefix}.{p}" for p in ((layout.gate, layout.up) if layout.kind == "gated" else (layout.up,))]
    return {
        "up": [f"{p}.weight" for p in ups],
        "down": [f"{prefix}.{layout.down}.weight"],
        "up_bias": [f"{p}.bias" for p in ups],
        "down_bias": [f"{prefix}.{layout.down}.bias"],
    }


def fuse_state(
    layout: FfnLayout, parts: dict[str, list[torch.Tensor]], up_out: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """`ffn_state_keys`' tensors (as read from a state dict or checkpoint) in the fused convention (`up_out`: see
    `FfnLayout.fuse`)."""
    up_bias, down_bias = parts.get("up_bias") or [None], (parts.get("down_bias") or [None])[0]
    return layout.fuse(parts["up"], up_bias, parts["down"][0], down_bias, up_out)


def fused_shapes(layout: FfnLayout, shapes: dict[str, list[tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    """The fused tensors' shapes from the stored shapes of `ffn_state_keys`' tensors (headers only)."""
    out = {}
    for name, parts in shapes.items():
        if layout.transposed and name in ("up", "down"):
            parts = [tuple(reversed(s)) for s in parts]
        out[name] = (sum(s[0] for s in parts), *parts[0][1:])
    return out


def describe_module(module: nn.Module) -> str:
    """`name: Class in->out, ...` of a module's children, for error messages."""
    return _describe(module)


def describe_config(config: Any) -> str:
    return f"{config.model_type} (hidden {detect.hidden_size(config)}, {detect.num_layers(config)} layers)"
