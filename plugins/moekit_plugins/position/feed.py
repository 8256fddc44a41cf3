"""Per-forward camera geometry for the images and videos of a batch, handed to a visual-token hook."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from moekit.arch import ArchError, VisualHook, VisualItem, add_to_visual_tokens
from moekit_plugins.position.geometry import CameraGeometry

PointsFn = Callable[[CameraGeometry], torch.Tensor]  # geometry -> per-pixel 3D points [F, H, W, 3]
EncodeFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (coords [N, 3], valid [N], dim) -> [N, dim]


class GeometryFeed:
    """Holds `images=[...]` / `videos=[...]` geometry (one entry or None per item, in batch order) for one
    forward, and turns it into per-token deltas with `points` (pixel -> 3D) and `encode` (3D -> features)."""

    def __init__(self, points: PointsFn, encode: EncodeFn):
        self.points, self.encode = points, encode
        self.pending: dict[str, list[CameraGeometry | None]] = {}
        self.used: set[str] = set()

    @contextmanager
    def inputs(
        self,
        images: Sequence[CameraGeometry | None] | None = None,
        videos: Sequence[CameraGeometry | None] | None = None,
    ) -> Iterator[None]:
        for name, given in (("images", images), ("videos", videos)):
            if given is not None and not all(g is None or isinstance(g, CameraGeometry) for g in given):
                raise TypeError(f"{name} must be a list of CameraGeometry or None, one per {name[:-1]} of the batch")
        self.pending = {k: list(v) for k, v in (("image", images), ("video", videos)) if v is not None}
        self.used = set()
        try:
            yield
            unused = sorted(set(self.pending) - self.used)
            if unused:
                raise ValueError(
                    f"geometry was given for {', '.join(k + 's' for k in unused)} but the forward passed no such input "
                    "through the vision encoder (did it get pixel_values / pixel_values_videos?)"
                )
        finally:
            self.pending, self.used = {}, set()

    def deltas(self, items: list[VisualItem]) -> list[torch.Tensor | None]:
        if not items or items[0].kind not in self.pending:
            return [None] * len(items)
        kind = items[0].kind
        given = self.pending[kind]
        if len(given) != len(items):
            raise ValueError(f"geometry for {len(given)} {kind}(s) was given, but the forward has {len(items)}")
        self.used.add(kind)
        out: list[torch.Tensor | None] = []
        for item, geometry in zip(items, given):
            if geometry is None:
                out.append(None)
                continue
            if item.layout is None:
                raise ArchError(f"{kind} {item.index}: {item.refusal}")
            depth = geometry.depth
            item.layout.check(*depth.shape, what=f"the depth of {kind} {item.index}")
            points = self.points(geometry)
            coords, valid = item.layout.pool(points, geometry.valid())
            features = item.features
            delta = self.encode(coords.to(features.device), valid.to(features.device), features.shape[-1])
            out.append(delta)
        return out


def token_width(model: nn.Module | None, dim: int | None, name: str) -> int:
    """Width of the visual tokens an encoder adds to: `dim`, else the model's embedding width."""
    if dim is not None:
        return dim
    if model is None:
        raise ValueError(f"{name} needs the model (or dim=) to size its layers")
    return model.get_input_embeddings().embedding_dim


class VisualEncoderBase(nn.Module):
    """What every visual-token position encoder shares: attach to a model, remove, `inputs(...)` per forward."""

    def __init__(self) -> None:
        super().__init__()
        self._hook: VisualHook | None = None

    def attach(self, model: nn.Module) -> VisualEncoderBase:
        """Hook `self.token_deltas` into `model`'s visual tokens (raises ArchError for a family whose visual site moekit does not know)."""
        if self._hook is not None:
            raise RuntimeError("this encoder is already attached; call remove() first")
        self._hook = add_to_visual_tokens(model, self.token_deltas)
        return self.to(
            model.get_input_embeddings().weight.device
        )  # parameters stay fp32; deltas take the tokens' dtype

    def remove(self) -> None:
        """Unhook from the model: its visual tokens are the encoder's own again."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def feed_batch(
        self, geometry: Sequence[dict[str, torch.Tensor] | None], video_samples: Sequence[int]
    ) -> AbstractContextManager[None]:
        """Per-batch inputs from moekit's data layer (see moekit/position.py); this encoder needs none."""
        return nullcontext()


class GeometryEncoder(VisualEncoderBase):
    """A visual-token encoder fed with camera geometry: subclasses give `points` (pixels -> 3D) and `encode`."""

    def __init__(self) -> None:
        super().__init__()
        self.feed = GeometryFeed(self.points, self.encode)

    def inputs(
        self,
        images: Sequence[CameraGeometry | None] | None = None,
        videos: Sequence[CameraGeometry | None] | None = None,
    ) -> AbstractContextManager[None]:
        """`with encoder.inputs(videos=[geometry, None]): model(**batch)`: one entry per item, in batch order."""
        return self.feed.inputs(images=images, videos=videos)

    def feed_batch(
        self, geometry: Sequence[dict[str, torch.Tensor] | None], video_samples: Sequence[int]
    ) -> AbstractContextManager[None]:
        """The geometry of each video of the batch (a student 3D scene has some, a plain video none)."""
        videos = [batch_geometry(geometry[r], r) for r in video_samples]
        if not any(v is not None for v in videos):
            return nullcontext()
        return self.inputs(videos=videos)

    def token_deltas(self, items: list[VisualItem]) -> list[torch.Tensor | None]:
        return self.feed.deltas(items)


def batch_geometry(entry: dict[str, torch.Tensor] | None, sample: int) -> CameraGeometry | None:
    """A data-layer geometry entry (depth in metres [F, H, W], intrinsics [3, 3] of the resized frames,
    camera-to-world poses [F, 4, 4]) as a checked `CameraGeometry`; errors name the batch row."""
    if entry is None:
        return None
    try:
        return CameraGeometry(entry["depth"].float(), entry["intrinsics"].float(), entry["poses"].float())
    except (KeyError, ValueError) as exc:
        raise type(exc)(f"geometry of batch sample {sample}: {exc}") from None
