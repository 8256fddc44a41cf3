"""Which decoder layers become MoE: `interval:K[:OFFSET]`, `first_half`, `last_half`, `full`, or a list."""

from __future__ import annotations

import re

LAYOUT_HELP = (
    "interval:K (optionally interval:K:OFFSET), first_half, last_half, full, or an explicit list like [0, 4, 8]"
)
_INTERVAL = re.compile(r"^interval:(\d+)(?::(\d+))?$")


def check_layout(layers: str | list[int]) -> str | list[int]:
    """Validate the syntax of a layout (the layer count is checked later, against the model)."""
    if isinstance(layers, list):
        if not layers:
            raise ValueError("the layer list is empty; name at least one layer")
        if len(set(layers)) != len(layers):
            raise ValueError(f"the layer list {layers} names a layer twice")
        if any(i < 0 for i in layers):
            raise ValueError(f"layer indices must be >= 0, got {layers}")
        return sorted(layers)
    text = layers.strip()
    if "," in text or text.isdigit():
        return check_layout([int(x) for x in text.strip("[]").split(",") if x.strip()])
    match = _INTERVAL.match(text)
    if match:
        step, offset = int(match.group(1)), int(match.group(2) or 0)
        if step < 1:
            raise ValueError(f"interval step must be >= 1 in {text!r}")
        if offset >= step:
            raise ValueError(f"interval offset {offset} must be smaller than the step {step} in {text!r}")
        return text
    if text in ("first_half", "last_half", "full"):
        return text
    raise ValueError(f"unknown layer layout {layers!r}; valid: {LAYOUT_HELP}")


def resolve_layers(layers: str | list[int], num_layers: int) -> list[int]:
    """The sorted layer indices `layers` selects in a decoder of `num_layers` layers."""
    layers = check_layout(layers)
    if isinstance(layers, list):
        bad = [i for i in layers if i >= num_layers]
        if bad:
            raise ValueError(
                f"layer(s) {bad} do not exist: this decoder has {num_layers} layers (valid range 0..{num_layers - 1})"
            )
        return layers
    if layers == "full":
        return list(range(num_layers))
    if layers == "first_half":
        return list(range(num_layers // 2))
    if layers == "last_half":
        return list(range(num_layers // 2, num_layers))
    match = _INTERVAL.match(layers)
    step, offset = int(match.group(1)), int(match.group(2) or 0)
    return list(range(offset, num_layers, step))
