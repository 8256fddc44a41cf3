"""Find a dense decoder's layers and FFNs by structure, and each FFN's layout by what it computes.

- The decoder-layer list is the `ModuleList` of the language model: inside what `model.get_decoder()` returns
  when transformers knows it, whose items hold an FFN of the text hidden size H (the width the LM head reads),
  preferring a list with `num_hidden_layers` items. Vision and audio towers are never picked.
- A layer's FFN is a child module whose own projections (`nn.Linear` or transformers' `Conv1D`) chain H -> I
  -> H: one up and one down (plain), two ups of width I (gated: act(gate) * up) or one of width 2I (fused
  gate_up). Its activation is a child module or, when the forward calls it as a function, the config's
  `hidden_act`.
- Which of two ups is the gate, which half of a fused matrix is the gate, and which activation applies are
  settled by computing each candidate on a probe input and comparing it with the FFN's own output; on the meta
  device (no weights) the projections' names decide.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2CLS, ACT2FN
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)
# Names that say "gate" in the FFNs of the families seen so far (the other up projection multiplies it).
GATE_NAMES = ("gate_proj", "gate", "w1", "wi_0", "fc1_g", "ff_gate", "w_gate", "gate_up_proj")
ACT_ATTRS = ("act_fn", "activation_fn", "act", "activation", "act_layer", "afn")
CONFIG_ACT_KEYS = ("hidden_act", "hidden_activation", "activation_function", "ffn_hidden_act", "afn", "mlp_act")
TOWER_WORDS = ("vision", "visual", "image_encoder", "audio", "vqmodel", "vq_model", "speech", "perceiver")
PROBE_TOKENS = 7


class DetectError(ValueError):
    """Structure detection found no decoder layers or no splittable FFN; the message says what it saw."""


def _activation_classes() -> tuple[type, ...]:
    classes = {v[0] if isinstance(v, tuple) else v for v in ACT2CLS.values()}
    torch_acts = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.LeakyReLU, nn.ReLU6, nn.Hardswish)
    return tuple(c for c in (*classes, *torch_acts) if isinstance(c, type))


ACT_CLASSES = _activation_classes()


@dataclass(frozen=True)
class Projection:
    """A linear map of an FFN: its attribute, in/out widths, and whether its weight is stored [in, out]."""

    name: str
    in_features: int
    out_features: int
    transposed: bool
    bias: bool


def projection(name: str, module: nn.Module) -> Projection | None:
    if isinstance(module, nn.Linear):
        return Projection(name, module.in_features, module.out_features, False, module.bias is not None)
    if isinstance(module, Conv1D):
        return Projection(name, module.nx, module.nf, True, module.bias is not None)
    return None


def projections(ffn: nn.Module) -> list[Projection]:
    return [p for name, child in ffn.named_children() if (p := projection(name, child)) is not None]


def text_config(config: Any) -> Any:
    """The language model's config (the config itself for text-only models)."""
    getter = getattr(config, "get_text_config", None)
    if getter is None:
        return config
    try:
        return getter(decoder=True)
    except (TypeError, ValueError):
        return getter()


def hidden_size(config: Any) -> int | None:
    value = getattr(text_config(config), "hidden_size", None)
    return int(value) if isinstance(value, int) else None


def num_layers(config: Any) -> int | None:
    value = getattr(text_config(config), "num_hidden_layers", None)
    return int(value) if isinstance(value, int) else None


@dataclass(frozen=True)
class FfnMatch:
    """An FFN found by structure: the layer attribute holding it and its projections by role."""

    attr: str
    kind: str  # "gated", "fused" or "plain"
    ups: tuple[Projection, ...]  # gated: two candidates for gate/up, in attribute order; else one
    down: Projection
    intermediate: int
    act_attr: str | None  # a child activation module, if the FFN has one


def match_ffn(module: nn.Module, hidden: int) -> tuple[str, list[Projection], Projection, int] | None:
    """(kind, ups, down, I) when `module`'s own projections chain `hidden` -> I -> `hidden`, else None."""
    found = projections(module)
    downs = [p for p in found if p.out_features == hidden and p.in_features != hidden]
    if len(downs) != 1:
        return None
    down = downs[0]
    width = down.in_features
    ups = [p for p in found if p.in_features == hidden and p is not down]
    plain = [p for p in ups if p.out_features == width]
    fused = [p for p in ups if p.out_features == 2 * width]
    if len(ups) == 2 and len(plain) == 2:
        return "gated", plain, down, width
    if len(ups) == 1 and len(plain) == 1:
        return "plain", plain, down, width
    if len(ups) == 1 and len(fused) == 1:
        return "fused", fused, down, width
    return None


ACT_WORDS = ("gelu", "silu", "relu", "swish", "mish", "tanh", "sigmoid", "act")


def activation_attr(ffn: nn.Module) -> str | None:
    """A child of `ffn` that is its activation: a known activation class, else a parameter-free child whose class
    says so (BLOOM's `BloomGelu`)."""
    for name in ACT_ATTRS:
        if isinstance(getattr(ffn, name, None), ACT_CLASSES):
            return name
    found = next((name for name, child in ffn.named_children() if isinstance(child, ACT_CLASSES)), None)
    if found is not None:
        return found
    for name, child in ffn.named_children():
        plain = not any(True for _ in child.parameters())
        if plain and any(w in type(child).__name__.lower() for w in ACT_WORDS):
            return name
    return None


def config_activations(config: Any) -> list[str]:
    """Activation names a config gives for its FFN (`hidden_act` and friends), known to transformers."""
    out = []
    for source in (text_config(config), config):
        for key in CONFIG_ACT_KEYS:
            value = getattr(source, key, None)
            if isinstance(value, str) and value in ACT2CLS and value not in out:
                out.append(value)
    return out


FFN_NAMES = ("mlp", "ffn", "feed_forward", "feedforward", "mlp_block", "fc")


def find_ffn(layer: nn.Module, hidden: int, depth: int = 3) -> FfnMatch | None:
    """The module inside `layer` that is its FFN, by what its projections compute: a child, or deeper (T5's
    `layer.2.DenseReluDense`; `attr` is then a dotted path). Shallower modules come first, and among them those
    whose name says FFN (a recurrent block may have projections of the same shapes)."""
    found = []
    for path, module in layer.named_modules():
        level = path.count(".") + 1
        if not path or level > depth or isinstance(module, nn.ModuleList):
            continue
        matched = match_ffn(module, hidden)
        if matched is not None:
            named = any(w in path.lower() for w in FFN_NAMES) or "dense" in type(module).__name__.lower()
            found.append(((level, not named), path, module, matched))
    if not found:
        return None
    _, attr, module, (kind, ups, down, width) = min(found, key=lambda item: item[0])
    return FfnMatch(attr, kind, tuple(ups), down, width, activation_attr(module))


def inline_ffn(layer: nn.Module, hidden: int) -> list[str]:
    """Projection names of an FFN written straight into the layer (OPT's fc1/fc2), if any."""
    matched = match_ffn(layer, hidden)
    return [] if matched is None else [p.name for p in (*matched[1], matched[2])]


MOE_WORDS = ("moe", "sparse", "experts", "expert")
SSM_WORDS = ("mamba", "rwkv", "xlstm", "mixer")


def moe_module(model: nn.Module) -> str | None:
    """Path and class of a module that is already a mixture of experts (routed experts inside), if any."""
    for path, module in model.named_modules():
        name = type(module).__name__.lower()
        experts = getattr(module, "experts", None)
        names = name + " " + type(experts).__name__.lower()
        if (isinstance(experts, nn.Module) and any(w in names for w in MOE_WORDS)) or "sparsemoe" in name:
            return f"{path} ({type(module).__name__})"
    return None


def module_paths(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def decoder_root(model: nn.Module) -> str | None:
    """Module path of the language decoder transformers reports (`get_decoder()`), if any."""
    getter = getattr(model, "get_decoder", None)
    if not callable(getter):
        return None
    try:
        decoder = getter()
    except Exception:  # some families raise for their own reasons here; structure search still works
        return None
    return module_paths(model).get(id(decoder)) if isinstance(decoder, nn.Module) else None


def _in_tower(path: str) -> bool:
    return any(word in part for part in path.split(".") for word in TOWER_WORDS)


def layer_lists(model: nn.Module, hidden: int) -> list[tuple[str, nn.ModuleList]]:
    """Every non-empty `ModuleList` whose first item holds an FFN (or an inline FFN) of width `hidden`."""
    out = []
    for path, module in model.named_modules():
        if not (isinstance(module, nn.ModuleList) and len(module) and isinstance(module[0], nn.Module)):
            continue
        if find_ffn(module[0], hidden) is not None or inline_ffn(module[0], hidden):
            out.append((path, module))
    return out


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer list of the language model; DetectError says what was found when none fits."""
    hidden, count = hidden_size(model.config), num_layers(model.config)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    widths = [w for w in (hidden, getattr(head, "in_features", None)) if isinstance(w, int)]
    if not widths:
        raise DetectError(f"{type(model).__name__}: its config gives no hidden_size for the language model")
    root = decoder_root(model)
    best: list[tuple[tuple, str, nn.ModuleList]] = []
    for width in dict.fromkeys(widths):
        for path, layers in layer_lists(model, width):
            inside = root is not None and (root == "" or path == root or path.startswith(root + "."))
            rank = (inside, not _in_tower(path), len(layers) == count, -path.count("."))
            best.append((rank, path, layers))
    if not best:
        raise DetectError(
            f"{type(model).__name__} has no list of decoder layers with an FFN of width {widths[0]} "
            f"(the language model's hidden size)"
        )
    best.sort(key=lambda item: item[0], reverse=True)
    _, path, layers = best[0]
    if _in_tower(path) and not (root is not None and path.startswith(root)):
        raise DetectError(f"{type(model).__name__}: the only decoder-like layer list is {path!r}, a vision/audio tower")
    return path, layers


def _required_args(ffn: nn.Module) -> tuple[list[str], list[str]] | None:
    try:
        params = list(inspect.signature(ffn.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in positional[1:] if p.default is p.empty]
    required += [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    return [p.name for p in positional], required


def takes_residual(ffn: nn.Module) -> bool:
    """Whether the FFN is called as `ffn(hidden_states, residual)` and adds the residual itself (BLOOM, MPT)."""
    found = _required_args(ffn)
    return found is not None and found[1] == ["residual"]


def signature_problem(ffn: nn.Module) -> str | None:
    """Why `ffn(hidden_states)` (or `ffn(hidden_states, residual)`, which moekit's block also takes) would not
    call this FFN, or None."""
    found = _required_args(ffn)
    if found is None or takes_residual(ffn):
        return None
    positional, required = found
    if required:
        names = ", ".join(positional)
        return f"its forward takes ({names}), not just the hidden states (it needs {', '.join(required)})"
    return None


def _weights(module: nn.Module, proj: Projection) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias) of a projection, whatever its storage."""
    layer = getattr(module, proj.name)
    weight = layer.weight.t() if proj.transposed else layer.weight
    return weight, layer.bias


def fused_up(ffn: nn.Module, kind: str, ups: tuple[Projection, ...], gate_first: bool) -> tuple[torch.Tensor, ...]:
    """(weight [U, H], bias [U] or None) of the FFN's up side in moekit's fused order: gate rows first."""
    if kind == "gated":
        gate, up = ups if gate_first else ups[::-1]
        (wg, bg), (wu, bu) = _weights(ffn, gate), _weights(ffn, up)
        return torch.cat([wg, wu], 0), None if bg is None else torch.cat([bg, bu], 0)
    weight, bias = _weights(ffn, ups[0])
    if kind == "fused" and not gate_first:
        half = weight.shape[0] // 2
        weight = torch.cat([weight[half:], weight[:half]], 0)
        bias = None if bias is None else torch.cat([bias[half:], bias[:half]], 0)
    return weight, bias


def reference(ffn: nn.Module, match: FfnMatch, gate_first: bool, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What moekit's experts compute from this FFN's projections, for input `x` [T, H]."""
    up_w, up_b = fused_up(ffn, match.kind, match.ups, gate_first)
    down_w, down_b = _weights(ffn, match.down)
    hidden = F.linear(x, up_w, up_b)
    if match.kind == "plain":
        hidden = act(hidden)
    else:
        gate, up = hidden.chunk(2, dim=-1)
        hidden = act(gate) * up
    return F.linear(hidden, down_w, down_b)


def probe_input(width: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, PROBE_TOKENS, width, generator=generator).to(device=device, dtype=dtype)  # [B, T, H]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within float tolerance of their dtype (fp32: 1e-5 of the output's scale)."""
    if a.shape != b.shape:
        return False
    scale = max(float(b.float().abs().max()), 1e-6)
    tol = 1e-5 if a.dtype == torch.float32 else 2e-2
    return float((a.float() - b.float()).abs().max()) <= tol * scale


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@dataclass(frozen=True)
class Settled:
    """The layout choices a probe settled: gate first or second, and which activation (attr or config name)."""

    gate_first: bool
    act_attr: str | None
    act_name: str | None
    computed: bool  # True when a probe decided; False when names did (meta device)


def _named_gate_first(match: FfnMatch) -> bool:
    if match.kind != "gated":
        return True
    first, second = (p.name.lower() for p in match.ups)
    return not (any(g == second or g in second for g in GATE_NAMES) and not any(g in first for g in GATE_NAMES))


def settle(ffn: nn.Module, match: FfnMatch, config: Any) -> Settled | None:
    """The gate order and activation under which the FFN's projections reproduce its output; None when no
    candidate does (the FFN computes more than act(gate) * up -> down). On the meta device names decide."""
    acts: list[tuple[str | None, str | None, nn.Module]] = []
    if match.act_attr is not None:
        acts.append((match.act_attr, None, getattr(ffn, match.act_attr)))
    acts += [(None, name, ACT2FN[name]) for name in config_activations(config)]
    if not acts:
        acts.append(
            (None, "silu" if match.kind != "plain" else "gelu", ACT2FN["silu" if match.kind != "plain" else "gelu"])
        )
    weight = getattr(ffn, match.down.name).weight
    if weight.device.type == "meta" or hasattr(weight, "device_mesh"):  # no weights, or sharded (FSDP2 DTensor)
        attr, name, _ = acts[0]
        return Settled(_named_gate_first(match), attr, name, computed=False)
    x = probe_input(match.down.out_features, weight.dtype, weight.device)
    was_training = ffn.training
    ffn.eval()
    try:
        with torch.no_grad():
            want = ffn(x, torch.zeros_like(x)) if takes_residual(ffn) else ffn(x)
            orders = (True, False) if match.kind != "plain" else (True,)
            preferred = _named_gate_first(match)
            orders = sorted(orders, key=lambda o: o != preferred)
            for (attr, name, act), order in itertools.product(acts, orders):
                if close(reference(ffn, match, order, act, x), want):
                    return Settled(order, attr, name, computed=True)
    finally:
        ffn.train(was_training)
    return None
