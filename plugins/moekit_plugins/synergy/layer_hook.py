"""Change one decoder layer's output inside the forward, knowing which positions hold visual tokens.

A decoder layer sees hidden states only, so pre-hooks on every module above the layer stack (the model, the
VLM's inner model, ...) keep the `input_ids` of the current forward; the layer's forward hook hands the layer's
output and those ids to `fn`, whose return replaces the output. Hooks on inner modules fire whatever wrapper
calls the model (peft calls the outer `forward` directly, past the outer pre-hook) and in `generate` (prefill
sees the prompt's ids, a decoding step one token). The ids are kept after the forward, so gradient
checkpointing's recomputation in the backward changes the layer exactly as the forward did; a module above the
stack called without `input_ids` (a forward from `inputs_embeds`) clears them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LayerFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LayerHook:
    """`fn(hidden [B, L, H], input_ids [B, L]) -> hidden` on the output of decoder layer `index`."""

    def __init__(self, model: nn.Module, layers_path: str, index: int, fn: LayerFn):
        layers = model.get_submodule(layers_path)
        if not -len(layers) <= index < len(layers):
            raise ValueError(f"layer {index} does not exist: the model has {len(layers)} decoder layers")
        self.fn, self.input_ids = fn, None
        parts = layers_path.split(".")
        # The stack's own container may be called with inputs_embeds (a VLM's language model): it never clears.
        above = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1)]
        container = model.get_submodule(".".join(parts[:-1]))
        self.handles = [m.register_forward_pre_hook(self._see, with_kwargs=True) for m in above]
        self.handles.append(container.register_forward_pre_hook(self._see_only, with_kwargs=True))
        self.handles.append(layers[index].register_forward_hook(self._change))

    @staticmethod
    def _ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        return ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None

    def _see(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.input_ids = self._ids(args, kwargs)

    def _see_only(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = self._ids(args, kwargs)
        if ids is not None:
            self.input_ids = ids

    def _change(self, module: nn.Module, args: tuple, output: object) -> object:
        hidden = output[0] if isinstance(output, tuple) else output
        ids = self.input_ids
        if ids is None or tuple(ids.shape) != tuple(hidden.shape[:2]):
            return output
        changed = self.fn(hidden, ids)
        return (changed, *output[1:]) if isinstance(output, tuple) else changed

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
