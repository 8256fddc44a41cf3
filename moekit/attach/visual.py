"""A VLM's visual tokens in LLM space: which pixels each token covers, and a hook that adds to the tokens.

Position encoders (plug-ins) use `add_to_visual_tokens(model, fn)`: moekit wraps the model's own
`get_image_features` / `get_video_features` (named by the family's `VisualSite`), so whatever path the forward
takes (training, `generate`), the tokens that go into the LLM are the encoder's output plus what `fn` returns.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from moekit.arch import FAMILIES, ArchError, VisualSite, family_for
from moekit.arch.adapter import auto_kind
from moekit.config.record import dense_model_type

VisualKind = Literal["image", "video"]


@dataclass(frozen=True)
class TokenLayout:
    """How the tokens of one image or video map to the frames and pixels the vision encoder saw.

    Tokens run over `grid` = (t, h, w) in raster order, then `extra` tokens with no position (LLaVA-OneVision's
    newline). A token covers `frames_per_token` frames and, in `mean` mode, a block of `block` x `block` pixels;
    in `bilinear` mode the per-patch grid is resampled to (h, w) like the model resamples its features.
    """

    frames: int
    height: int
    width: int
    grid: tuple[int, int, int]
    frames_per_token: int
    block: int
    mode: Literal["mean", "bilinear"] = "mean"
    patch: int = 0
    extra: int = 0

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w + self.extra

    def check(self, frames: int, height: int, width: int, what: str) -> None:
        """Refuse per-pixel data whose frames or size differ from what the encoder saw."""
        if (frames, height, width) != (self.frames, self.height, self.width):
            raise ValueError(
                f"{what} has {frames} frame(s) of {height}x{width} px, but the vision encoder saw {self.frames} "
                f"frame(s) of {self.height}x{self.width} px for this input; resize/pad it exactly like the frames "
                "(Qwen-VL: multiples of 28 px, an odd frame count padded with the last frame)"
            )

    def pool(self, values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token mean of per-pixel `values` [F, H, W, C] over pixels where `valid` [F, H, W] holds.

        Returns `(tokens [N, C], token_valid [N])`; a token none of whose pixels is valid gets zeros.
        """
        self.check(*values.shape[:3], what="per-pixel data")
        weight = valid.to(values.dtype)[..., None]
        if self.mode == "mean":
            sums, counts = self._block_sum(values * weight), self._block_sum(weight)
        else:
            sums, counts = self._bilinear(values * weight), self._bilinear(weight)
        out = torch.where(counts > 0, sums / counts.clamp_min(1e-12), torch.zeros_like(sums))
        token_valid = counts[:, 0] > 0
        if self.extra:
            out = torch.cat([out, out.new_zeros(self.extra, out.shape[1])])
            token_valid = torch.cat([token_valid, token_valid.new_zeros(self.extra)])
        return out, token_valid

    def frame_index(self) -> torch.Tensor:
        """Temporal index of each token (the t of its grid cell); -1 for `extra` tokens."""
        t, h, w = self.grid
        index = torch.arange(t).repeat_interleave(h * w)
        return torch.cat([index, torch.full((self.extra,), -1)])

    def _block_sum(self, x: torch.Tensor) -> torch.Tensor:
        t, h, w = self.grid
        c, f, b = x.shape[-1], self.frames_per_token, self.block
        return x.reshape(t, f, h, b, w, b, c).sum(dim=(1, 3, 5)).reshape(t * h * w, c)

    def _bilinear(self, x: torch.Tensor) -> torch.Tensor:
        t, h, w = self.grid
        frames, height, width, c = x.shape
        p = self.patch
        patches = x.reshape(frames, height // p, p, width // p, p, c).sum(dim=(2, 4)).permute(0, 3, 1, 2)
        pooled = F.interpolate(patches, size=[h, w], mode="bilinear")
        return pooled.permute(0, 2, 3, 1).reshape(t * h * w, c)


@dataclass
class VisualItem:
    """One image or video of the current forward: its tokens and (when moekit knows it) their layout."""

    kind: VisualKind
    index: int  # position among this forward's items of the same kind, in batch order
    features: torch.Tensor  # [N, D] tokens in LLM space
    layout: TokenLayout | None
    refusal: str = ""  # why `layout` is None


AddFn = Callable[[list[VisualItem]], list[torch.Tensor | None]]


def visual_site(model: nn.Module) -> tuple[VisualSite, nn.Module]:
    """The family's VisualSite and the module whose feature methods produce the visual tokens.

    Raises ArchError explaining which families moekit knows this for, and how a plug-in adds one.
    """
    model_type = dense_model_type(model.config)
    family = family_for(model_type)
    site = family.visual if family is not None else None
    if site is None:
        known = sorted(t for t, f in FAMILIES.items() if f.visual is not None)
        raise ArchError(
            f"moekit does not know where model type {model_type!r} produces its visual tokens in LLM space, so "
            f"position encoders cannot hook into it. Known for: {', '.join(known)}. "
            + (
                "This family has no vision input. "
                if auto_kind(model) == "causal-lm"
                else "A plug-in can add it: moekit_arch_adapters returning {model_type: Family(..., "
                "visual=VisualSite(layout=..., owner=..., image=..., video=...))}."
            )
        )
    owner = model
    if site.owner and site.owner in dict(model.named_modules()):
        owner = model.get_submodule(site.owner)
    for method in (site.image, site.video):
        if method is not None and not callable(getattr(owner, method, None)):
            raise ArchError(f"{type(owner).__name__} has no method {method!r}, which the {model_type} VisualSite names")
    return site, owner


def token_layouts(
    site: VisualSite, config: Any, kind: VisualKind, arguments: dict[str, Any]
) -> list[tuple[TokenLayout | None, str]]:
    """(layout, refusal) per item of one `get_*_features` call, from its arguments and the model config."""
    vision = config.vision_config
    patch = _int(vision.patch_size)
    if site.layout == "merged_patches":
        grid = next(v for k, v in arguments.items() if k.endswith("grid_thw"))
        merge, temporal = vision.spatial_merge_size, _int(vision.temporal_patch_size)
        out = []
        for t, h, w in grid.tolist():
            per_token = temporal if kind == "video" else 1  # an image is one frame, repeated by the processor
            out.append(
                (
                    TokenLayout(
                        frames=t * per_token,
                        height=h * patch,
                        width=w * patch,
                        grid=(t, h // merge, w // merge),
                        frames_per_token=per_token,
                        block=patch * merge,
                    ),
                    "",
                )
            )
        return out
    if site.layout == "pooled_frames":
        if kind == "image":
            pixels = arguments.get("pixel_values")
            count = len(arguments.get("image_sizes", pixels if pixels is not None else []))
            why = (
                f"{config.model_type} image tokens come from 'anyres' tiles of a resized and padded copy of the "
                "image, so no fixed pixel block belongs to a token; give multi-view frames as a video instead"
            )
            return [(None, why)] * count
        videos = arguments["pixel_values_videos"]
        size = _int(vision.image_size)
        side = math.ceil(size // patch / 2)
        layout = TokenLayout(
            frames=videos.shape[1],
            height=size,
            width=size,
            grid=(videos.shape[1], side, side),
            frames_per_token=1,
            block=0,
            mode="bilinear",
            patch=patch,
            extra=1,
        )
        return [(layout, "")] * videos.shape[0]
    raise ArchError(f"unknown visual layout {site.layout!r}")


def _int(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


class VisualHook:
    """Handle of one `add_to_visual_tokens` registration; `remove()` undoes it."""

    def __init__(self, owner: nn.Module, fn: AddFn):
        self.owner, self.fn = owner, fn

    def remove(self) -> None:
        hooks = self.owner.__dict__.get("_moekit_visual_fns", [])
        if self.fn in hooks:
            hooks.remove(self.fn)
        if not hooks:
            for method in self.owner.__dict__.pop("_moekit_visual_wrapped", ()):
                self.owner.__dict__.pop(method, None)


def add_to_visual_tokens(model: nn.Module, fn: AddFn) -> VisualHook:
    """Call `fn(items)` on the visual tokens of every forward and add what it returns (None = leave as is).

    Several hooks may be active; each sees the encoder's original tokens and their deltas add up.
    """
    site, owner = visual_site(model)
    fns = owner.__dict__.setdefault("_moekit_visual_fns", [])
    if "_moekit_visual_wrapped" not in owner.__dict__:
        wrapped = []
        state = {"active": False}
        for kind, method in (("image", site.image), ("video", site.video)):
            if method is not None:
                setattr(owner, method, _wrap(getattr(owner, method), kind, site, model.config, fns, state))
                wrapped.append(method)
        owner.__dict__["_moekit_visual_wrapped"] = wrapped
    fns.append(fn)
    return VisualHook(owner, fn)


def _wrap(original: Callable, kind: VisualKind, site: VisualSite, config: Any, fns: list, state: dict) -> Callable:
    signature = inspect.signature(original)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if state["active"]:  # e.g. Qwen3-VL's get_video_features calls get_image_features: add once, outside
            return original(*args, **kwargs)
        state["active"] = True
        try:
            out = original(*args, **kwargs)
        finally:
            state["active"] = False
        if not fns:
            return out
        arguments = signature.bind_partial(*args, **kwargs).arguments
        pooled = out.pooler_output
        tokens = list(pooled) if isinstance(pooled, (list, tuple)) else list(pooled.unbind(0))
        layouts = token_layouts(site, config, kind, arguments)
        if len(layouts) != len(tokens):
            raise ArchError(f"{kind} features: {len(tokens)} items but {len(layouts)} layouts; report this as a bug")
        items = [VisualItem(kind, i, x, lay, why) for i, (x, (lay, why)) in enumerate(zip(tokens, layouts))]
        for index, (item, (layout, _)) in enumerate(zip(items, layouts)):
            if layout is not None and layout.num_tokens != item.features.shape[0]:
                raise ArchError(
                    f"{kind} {index}: the model made {item.features.shape[0]} tokens, the layout expects "
                    f"{layout.num_tokens}; report this as a bug"
                )
        for fn in list(fns):
            for index, delta in enumerate(fn(items)):
                if delta is not None:
                    tokens[index] = tokens[index] + delta.to(tokens[index].dtype)
        if isinstance(pooled, torch.Tensor):
            out.pooler_output = torch.stack(tokens)
        else:
            out.pooler_output = type(pooled)(tokens)
        return out

    wrapper.__wrapped__ = original
    return wrapper
