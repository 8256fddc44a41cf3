"""NEO-ov native RoPE inside a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model (the `neo_native_rope` position encoder).

NEO-ov keeps the LLM's head as the T channels and adds H and W channels to every query and key (eq. 2-3), so
the encoder owns, per decoder layer, two new projections `q_hw` and `k_hw` (hidden -> heads x (d_H + d_W)).
Keys start at zero, so every score, and the model's output on text, is the pretrained model's until they train
(queries start random: with both at zero neither would get a gradient).

Per forward (a pre-hook on the `Qwen2_5_VLModel`, or its Qwen2-VL / Qwen3-VL counterpart): the visual units are
found from the image/video tokens and `image_grid_thw` / `video_grid_thw` (one unit per image, one per temporal
patch of a video); the model's own 3-row position ids become (t, t, t), so its rotary turns into a 1-D RoPE of
t over the whole head (T group); the (h, w) tables and the eq. 7 mask are kept for the attention function. That function is registered with
transformers' `AttentionInterface` and set as the text config's implementation: it adds the rotated H/W
channels to the query and key (the module passes it only the rotated T channels; a pre-hook on each attention
module hands it the layer's hidden states) and calls the model's original sdpa or eager attention with the mixed
mask, at the model's own scaling 1/sqrt(d_T). Qwen3-VL normalises each query and key head (QK-norm) before its
rotary; the new H/W channels get no norm (an RMSNorm of keys that start at zero would have gradients of order
1/sqrt(eps)), so they enter the score as NEO-ov's eq. 2-3 write them.

Cached decoding: the model's KV cache holds the T channels of the keys; this encoder keeps each layer's rotated H/W
key channels beside it (`_Decoding`), from the prefill on, and each decode step appends the new tokens' ones. New
tokens are text: t continues from the last one, h = w = 0, and they see every earlier valid token. The side cache
follows the cache object's row selections (beam search's `reorder_cache`, `batch_select_indices`,
`batch_repeat_interleave`) and its crops (assisted decoding drops tokens from the end).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from moekit.arch import ArchError
from moekit_plugins.position.neo_rope import NativeRope, NativeRopeParams

IMPLEMENTATION = "moekit_neo_native_rope"
FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
INNER = ("sdpa", "eager")
SPATIAL = slice(1, 3)
GRID = "_moekit_grid_thw"
_OWNERS: weakref.WeakKeyDictionary[nn.Module, tuple[NeoNativeRope, int]] = weakref.WeakKeyDictionary()


def neo_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
    """The attention function transformers calls for a model with `neo_native_rope` attached."""
    owner = _OWNERS.get(module)
    if owner is None:
        raise RuntimeError(
            f"{type(module).__name__} runs the {IMPLEMENTATION} attention but no neo_native_rope encoder is attached "
            "to it (was the encoder removed without restoring the attention implementation?)"
        )
    encoder, layer = owner
    return encoder.attend(layer, module, query, key, value, **kwargs)


AttentionInterface.register(IMPLEMENTATION, neo_attention)


def visual_units(
    input_ids: torch.Tensor,
    token_ids: dict[str, int | None],
    grids_thw: dict[str, torch.Tensor | None],
    merge: int,
) -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
    """Visual unit of every token ([B, L], 0 for text, 1.. in sequence order) and each unit's merged (H, W) grid:
    an image is one unit, each temporal patch of a video another. Grids are consumed in batch order, as the
    model consumes them."""
    batch = input_ids.shape[0]
    found: list[list[tuple[int, list[int], tuple[int, int]]]] = [[] for _ in range(batch)]
    for kind in ("image", "video"):
        token, thw = token_ids[kind], grids_thw[kind]
        grids = [] if thw is None else [tuple(int(v) for v in g) for g in thw.tolist()]
        used = 0
        for b in range(batch):
            positions = [] if token is None else (input_ids[b] == token).nonzero().flatten().tolist()
            taken = 0
            while taken < len(positions):
                if used == len(grids):
                    raise ValueError(
                        f"sample {b} has {len(positions) - taken} more {kind} tokens than {kind}_grid_thw covers "
                        f"({len(grids)} {kind}(s))"
                    )
                frames, height, width = grids[used]
                used += 1
                size = (height // merge) * (width // merge)
                for _ in range(frames):
                    chunk = positions[taken : taken + size]
                    found[b].append((chunk[0], chunk, (height // merge, width // merge)))
                    taken += size
        if used != len(grids):
            raise ValueError(f"{kind}_grid_thw lists {len(grids)} {kind}(s), the input_ids hold tokens of {used}")
    units = torch.zeros_like(input_ids, dtype=torch.long)
    out: list[list[tuple[int, int]]] = []
    for b, items in enumerate(found):
        items.sort(key=lambda item: item[0])
        for unit, (_, chunk, _) in enumerate(items, start=1):
            units[b, chunk] = unit
        out.append([grid for _, _, grid in items])
    return units, out


class NeoNativeRope(nn.Module):
    """NEO-ov's native RoPE and mixed mask in a Qwen-VL model, with the new H/W query/key projections."""

    def __init__(self, params: NativeRopeParams, model: nn.Module):
        super().__init__()
        inner, text = _host(model)
        head_dim = text.hidden_size // text.num_attention_heads
        theta = float(text.rope_parameters["rope_theta"])
        for name, wanted, given in (("head_dim_t", head_dim, params.head_dim_t), ("theta_t", theta, params.theta_t)):
            if given is not None and given != wanted:
                raise ValueError(
                    f"neo_native_rope: {name}={given} but the model's is {wanted}; the T group is the LLM's own "
                    f"RoPE (NEO-ov keeps it), so leave {name} unset or set it to {wanted}"
                )
        self.params = params
        self.rope = NativeRope(params.model_copy(update={"head_dim_t": head_dim, "theta_t": theta}))
        self.spatial_dim = params.head_dim_h + params.head_dim_w
        self.heads, self.kv_heads = text.num_attention_heads, text.num_key_value_heads
        layers = inner.language_model.layers
        self.q_hw = nn.ModuleList(
            nn.Linear(text.hidden_size, self.heads * self.spatial_dim, bias=False) for _ in layers
        )
        self.k_hw = nn.ModuleList(
            nn.Linear(text.hidden_size, self.kv_heads * self.spatial_dim, bias=False) for _ in layers
        )
        for q, k in zip(self.q_hw, self.k_hw):
            nn.init.normal_(q.weight, std=params.init_std)
            nn.init.zeros_(k.weight)
        self._hooks: list[Any] = []
        self._hidden: dict[int, torch.Tensor] = {}
        self._state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._decoding: _Decoding | None = None
        self._attach(model, inner, text)

    def _attach(self, model: nn.Module, inner: nn.Module, text: Any) -> None:
        self._text, self._previous = text, text._attn_implementation
        if self._previous not in INNER:
            raise ArchError(
                f"neo_native_rope needs sdpa or eager attention (it passes a mixed [B, 1, L, L] mask); the model "
                f"uses {self._previous!r}: load it with attn_implementation='sdpa'"
            )
        attention = [layer.self_attn for layer in inner.language_model.layers]
        if self._previous == "eager":
            self.inner_attention = inspect.getmodule(type(attention[0])).eager_attention_forward
        else:
            self.inner_attention = AttentionInterface()[self._previous]
        self._merge = model.config.vision_config.spatial_merge_size
        self._tokens = {"image": model.config.image_token_id, "video": model.config.video_token_id}
        self._hooks.append(inner.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._hooks.append(inner.visual.register_forward_hook(_keep_grid, with_kwargs=True))
        for layer, module in enumerate(attention):
            _OWNERS[module] = (self, layer)
            self._hooks.append(module.register_forward_pre_hook(partial(self._capture, layer), with_kwargs=True))
        text._attn_implementation = IMPLEMENTATION
        self.to(model.get_input_embeddings().weight.device)

    def remove(self) -> None:
        """Unhook from the model and give it back its own attention implementation."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for module in [m for m, (owner, _) in _OWNERS.items() if owner is self]:
            del _OWNERS[module]
        if self._text is not None:
            self._text._attn_implementation = self._previous
            self._text = None

    @contextmanager
    def feed_batch(
        self, geometry: Sequence[dict[str, torch.Tensor] | None], video_samples: Sequence[int]
    ) -> Iterator[None]:
        """No geometry is needed (the units come from the input ids and grids of each forward)."""
        self._decoding = None
        try:
            yield
        finally:
            self._decoding = None

    def layout(
        self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
        """Visual units and grids of a batch (see `visual_units`)."""
        grids = {"image": image_grid_thw, "video": video_grid_thw}
        return visual_units(input_ids, self._tokens, grids, self._merge)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("neo_native_rope finds the visual units from input_ids; this forward got inputs_embeds")
        padding = kwargs.get("attention_mask")
        if padding is not None and padding.ndim != 2:
            raise ValueError(f"neo_native_rope builds its own mask; it needs a 2-D padding mask, got {padding.ndim}-D")
        cache = kwargs.get("past_key_values")
        past = 0 if cache is None else cache.get_seq_length()
        if past:
            self._decode_step(input_ids, padding, cache, past, kwargs)
        else:
            self._whole_sequence(input_ids, padding, cache, kwargs)
        if args:
            args, kwargs["input_ids"] = (), input_ids
        return args, kwargs

    def _whole_sequence(
        self, input_ids: torch.Tensor, padding: torch.Tensor | None, cache: Any, kwargs: dict[str, Any]
    ) -> None:
        """A forward over the whole sequence (training, scoring, the prefill of a cached generate): units, the
        (t, h, w) index, the eq. 7 mask; the model's own position ids become (t, t, t)."""
        grids_thw = [kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw")]
        encoded = kwargs.get("mm_encoder_outputs") or {}
        for k, kind in enumerate(("image", "video")):  # generate encodes the media first and passes only features
            if grids_thw[k] is None and encoded.get(kind) is not None:
                grids_thw[k] = _encoded_grid(encoded[kind])
        units, grids = self.layout(input_ids, *grids_thw)
        index = self.rope.index(units, grids, attention_mask=padding)
        cos, sin = self.rope.cos_sin(index, SPATIAL)
        allowed = NativeRope.mask(units, attention_mask=padding)
        if padding is not None:  # a padding query sees itself, so no softmax row is empty (its output is unused)
            eye = torch.eye(units.shape[1], dtype=torch.bool, device=units.device)
            allowed = allowed | (eye & ~padding.bool()[:, :, None])
        self._state = (cos, sin, allowed[:, None])
        kwargs["position_ids"] = index[0][None].expand(3, -1, -1)
        self._decoding = None
        if cache is not None:  # the prefill of a cached generate: decode steps continue from here
            valid = torch.ones_like(input_ids, dtype=torch.bool) if padding is None else padding.bool()
            self._decoding = _Decoding(cache, index[0].masked_fill(~valid, -1).amax(-1) + 1)

    def _decode_step(
        self, input_ids: torch.Tensor, padding: torch.Tensor | None, cache: Any, past: int, kwargs: dict[str, Any]
    ) -> None:
        """A cached step: the new tokens (text) take t after the last one and h = w = 0, and see every earlier valid
        token and the new ones up to themselves."""
        decoding = self._decoding
        if decoding is None or decoding.cache() is not cache:
            raise ValueError("neo_native_rope: a KV cache this encoder did not fill from its prefill (one generate)")
        if decoding.broken is not None:
            raise ValueError(f"neo_native_rope: {decoding.broken}; decode without the cache (use_cache=False)")
        if any(token is not None and bool((input_ids == token).any()) for token in self._tokens.values()):
            raise ValueError("neo_native_rope: new image or video tokens in a cached decode step")
        batch, new = input_ids.shape
        t = decoding.next_t[:, None] + torch.arange(new, device=input_ids.device)
        zeros = torch.zeros_like(t)
        cos, sin = self.rope.cos_sin(torch.stack([t, zeros, zeros]), SPATIAL)
        keys = torch.arange(past + new, device=input_ids.device)
        allowed = (keys[None, :] <= past + torch.arange(new, device=input_ids.device)[:, None])[None]
        if padding is not None:
            allowed = allowed & padding.bool()[:, None, -(past + new) :]
        self._state = (cos, sin, allowed.expand(batch, -1, -1)[:, None])
        decoding.next_t = decoding.next_t + new
        kwargs["position_ids"] = t[None].expand(3, -1, -1)

    def _capture(self, layer: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._hidden[layer] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def attend(
        self, layer: int, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append the rotated H/W channels to `query` / `key` (T channels, already rotated) and attend under
        the eq. 7 mask with the model's original attention."""
        if self._state is None or layer not in self._hidden:
            raise RuntimeError("neo_native_rope: attention ran outside a forward of the model it is attached to")
        cos, sin, allowed = self._state
        hidden = self._hidden.pop(layer)
        batch, length = hidden.shape[:2]
        q_proj, k_proj = self.q_hw[layer], self.k_hw[layer]  # called as modules, so wrappers' hooks run
        q_hw = q_proj(hidden.to(q_proj.weight.dtype)).view(batch, length, self.heads, -1)
        k_hw = k_proj(hidden.to(k_proj.weight.dtype)).view(batch, length, self.kv_heads, -1)
        q_hw = self.rope.rotate(q_hw.transpose(1, 2), cos, sin, SPATIAL)
        k_hw = self.rope.rotate(k_hw.transpose(1, 2), cos, sin, SPATIAL)
        if self._decoding is not None:  # a cached generate: the H/W keys of every earlier token, then these
            k_hw = self._decoding.extend(layer, k_hw)
        if k_hw.shape[2] != key.shape[2]:
            raise ValueError(
                f"neo_native_rope: layer {layer} has {key.shape[2]} cached keys but {k_hw.shape[2]} H/W keys (a KV "
                "cache filled without this encoder?)"
            )
        query = torch.cat([query, q_hw.to(query.dtype)], dim=-1)
        key = torch.cat([key, k_hw.to(key.dtype)], dim=-1)
        mask = allowed if self._previous == "sdpa" else NativeRope.additive(allowed[:, 0], query.dtype)
        kwargs["is_causal"] = False
        return self.inner_attention(module, query, key, value, mask, **kwargs)


class _Decoding:
    """One cached `generate`: the cache object it follows, the next t of every row and each layer's rotated H/W
    key channels so far ([B, kv heads, L, d_H + d_W]). The cache's row operations are wrapped on that object so
    that these rows follow theirs."""

    def __init__(self, cache: Any, next_t: torch.Tensor):
        self.cache: weakref.ref = weakref.ref(cache)
        self.next_t = next_t
        self.keys: dict[int, torch.Tensor] = {}
        self.broken: str | None = None
        follow = {
            "reorder_cache": self._select,
            "batch_select_indices": self._select,
            "batch_repeat_interleave": self._repeat,
            "crop": self._crop,
        }
        for name, ours in follow.items():
            if hasattr(cache, name):
                setattr(cache, name, _after(getattr(cache, name), ours))

    def extend(self, layer: int, new: torch.Tensor) -> torch.Tensor:
        before = self.keys.get(layer)
        self.keys[layer] = new if before is None else torch.cat([before, new], dim=2)
        return self.keys[layer]

    def _select(self, indices: torch.Tensor) -> None:
        indices = indices.to(self.next_t.device)
        self.next_t = self.next_t.index_select(0, indices)
        self.keys = {layer: k.index_select(0, indices.to(k.device)) for layer, k in self.keys.items()}

    def _repeat(self, repeats: int) -> None:
        self.next_t = self.next_t.repeat_interleave(repeats, dim=0)
        self.keys = {layer: k.repeat_interleave(repeats, dim=0) for layer, k in self.keys.items()}

    def _crop(self, *args: Any, **kwargs: Any) -> None:
        """Drop the H/W keys of the tokens the cache dropped from its end (assisted decoding): decoded text, one t
        each."""
        cache = self.cache()
        held = next(iter(self.keys.values())).shape[2] if self.keys else None
        length = None if cache is None else cache.get_seq_length()
        if held is None or length is None or length == held:
            return
        if length > held:
            self.broken = f"the KV cache grew to {length} tokens outside a forward (the H/W keys hold {held})"
            return
        self.keys = {layer: k[:, :, :length] for layer, k in self.keys.items()}
        self.next_t = self.next_t - (held - length)


def _after(original, ours):
    """`original(...)`, then `ours(...)` with the same arguments."""

    def both(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        ours(*args, **kwargs)
        return out

    return both


def _keep_grid(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
    """Keep the vision tower's `grid_thw` on its output: `generate` hands the model the encoded features
    (`mm_encoder_outputs`) without the grids, and the units need them."""
    grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    if grid is not None and output is not None:
        object.__setattr__(output, GRID, grid)


def _encoded_grid(output: Any) -> torch.Tensor | None:
    """The grid of every image (or video) of encoded features, one row per entry of `pooler_output`. `generate`
    expands them for beam search in place, repeating each sample's entries (the same tensor objects), while the
    grid kept on the output stays one row per original entry: rows are matched to entries by identity, the
    originals in order of first appearance."""
    grid = getattr(output, GRID, None)
    pooled = getattr(output, "pooler_output", None)
    if grid is None or not isinstance(pooled, (list, tuple)) or len(pooled) == len(grid):
        return grid
    first = list(dict.fromkeys(id(t) for t in pooled))
    if len(first) != len(grid):
        return grid  # the units check then names the mismatch
    row = {key: i for i, key in enumerate(first)}
    return grid[torch.tensor([row[id(t)] for t in pooled], device=grid.device)]


def _host(model: nn.Module) -> tuple[nn.Module, Any]:
    """The multimodal model inside `model` (`Qwen2_5_VLModel`, `Qwen2VLModel`, `Qwen3VLModel`) and its text
    config; refuses other families."""
    model_type = str(getattr(model.config, "model_type", "")).removeprefix("moekit_")
    inner = getattr(model, "model", None)
    if model_type not in FAMILIES or not hasattr(inner, "language_model"):
        raise ArchError(
            f"neo_native_rope is wired into {', '.join(FAMILIES)} only (its text attention takes explicit 3-row "
            f"position ids and sdpa/eager attention with a custom mask); the model is {model_type or type(model).__name__!r}"
        )
    return inner, inner.language_model.config
