"""2D synthetic content: coloured shapes on plain backgrounds, and clips where shapes move, appear or leave.

Every clip comes with its scene graph: per object its shape, colour and track (centre per frame, None while
absent), so questions can be generated from the graph alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from moekit.demo.synth.vocab import BACKGROUNDS, COLOURS, SHAPES_2D

RADIUS = 11  # half-size of a shape in pixels at the default 112x84 canvas


@dataclass
class Shape:
    shape: str
    colour: str
    track: list[tuple[float, float] | None] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def draw(shapes: list[Shape], frame: int, background: str, size: tuple[int, int]) -> np.ndarray:
    """Frame `frame` of the clip as uint8 [H, W, 3]."""
    image = Image.new("RGB", size, BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    for s in shapes:
        centre = s.track[frame]
        if centre is None:
            continue
        x, y = centre
        box = [x - RADIUS, y - RADIUS, x + RADIUS, y + RADIUS]
        fill = COLOURS[s.colour]
        if s.shape == "circle":
            pen.ellipse(box, fill=fill)
        elif s.shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(x, y - RADIUS), (x + RADIUS, y + RADIUS), (x - RADIUS, y + RADIUS)], fill=fill)
    return np.asarray(image)


def pick_shapes(rng: np.random.Generator, count: int) -> list[Shape]:
    """`count` shapes with distinct shape kinds and distinct colours (so 'the red one' is unambiguous)."""
    kinds = rng.permutation(len(SHAPES_2D))
    colours = rng.permutation(len(COLOURS))
    names = list(COLOURS)
    return [Shape(SHAPES_2D[kinds[i % len(SHAPES_2D)]], names[colours[i]]) for i in range(count)]


def place(rng: np.random.Generator, count: int, size: tuple[int, int], taken: list[tuple[float, float]]):
    """`count` centres inside the canvas, at least 2.5 radii apart from each other and from `taken`."""
    width, height = size
    out: list[tuple[float, float]] = []
    for _ in range(count):
        for _attempt in range(50):
            p = (
                float(rng.uniform(RADIUS + 2, width - RADIUS - 2)),
                float(rng.uniform(RADIUS + 2, height - RADIUS - 2)),
            )
            if all(np.hypot(p[0] - q[0], p[1] - q[1]) > 2.5 * RADIUS for q in [*taken, *out]):
                out.append(p)
                break
        else:
            raise ValueError(f"cannot place {count} shapes on a {width}x{height} canvas; make it larger")
    return out


def still_image(rng: np.random.Generator, size: tuple[int, int], max_shapes: int = 3) -> tuple[np.ndarray, dict]:
    """One image of 1..max_shapes shapes and its graph."""
    shapes = pick_shapes(rng, int(rng.integers(1, max_shapes + 1)))
    for s, p in zip(shapes, place(rng, len(shapes), size, [])):
        s.track = [p]
    background = str(rng.choice(list(BACKGROUNDS)))
    return draw(shapes, 0, background, size), graph(shapes, background, size)


def motion_track(
    rng: np.random.Generator, direction: str, frames: int, size: tuple[int, int]
) -> list[tuple[float, float]]:
    """A straight track across about half the canvas in `direction` (image y grows downwards)."""
    width, height = size
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    span = (width if dx else height) * 0.5
    lo = RADIUS + 2
    start_x = width - lo - span * max(dx, 0) if dx else float(rng.uniform(lo, width - lo))
    start_y = height - lo - span * max(dy, 0) if dy else float(rng.uniform(lo, height - lo))
    if dx < 0:
        start_x = lo + span
    if dy < 0:
        start_y = lo + span
    step = span / max(1, frames - 1)
    return [(start_x + dx * step * t, start_y + dy * step * t) for t in range(frames)]


def clip(
    rng: np.random.Generator,
    frames: int,
    size: tuple[int, int],
    image_gap: int = 0,
    events: bool = False,
) -> tuple[list[np.ndarray], dict]:
    """A clip of `image_gap + frames` frames: one shape moves; with `events`, one may appear and one may leave.

    For image <-> video pairs the image is frame 0 and the video the last `frames` frames (a non-adjacent clip
    when `image_gap` > 0), as the paper pairs a first frame with a later clip.
    """
    total = image_gap + frames
    extra = int(rng.integers(0, 2)) + (int(rng.integers(0, 2)) if events else 0) * 2
    shapes = pick_shapes(rng, 1 + min(extra, 2))
    mover = shapes[0]
    for _attempt in range(100):  # a new path when the others do not fit beside this one
        direction = str(rng.choice(["left", "right", "up", "down"]))
        mover.track = motion_track(rng, direction, total, size)
        try:
            spots = place(rng, len(shapes) - 1, size, mover.track)
            break
        except ValueError:
            continue
    else:
        raise ValueError(f"cannot fit {len(shapes)} shapes beside a moving one on a {size[0]}x{size[1]} canvas")
    for s, p in zip(shapes[1:], spots):
        s.track = [p] * total
    if events and len(shapes) >= 3:
        kind = str(rng.choice(["appear", "leave", "both"]))
        if kind in ("appear", "both"):
            shapes[1].track = [None] * (image_gap + 1) + shapes[1].track[image_gap + 1 :]
        if kind in ("leave", "both"):
            shapes[2].track = shapes[2].track[: image_gap + 1] + [None] * (frames - 1)
    background = str(rng.choice(list(BACKGROUNDS)))
    out = [draw(shapes, t, background, size) for t in range(total)]
    g = graph(shapes, background, size)
    g["mover"], g["direction"], g["image_gap"] = mover.name, direction, image_gap
    return out, g


def graph(shapes: list[Shape], background: str, size: tuple[int, int]) -> dict:
    return {
        "size": list(size),
        "background": background,
        "objects": [
            {
                "name": s.name,
                "shape": s.shape,
                "colour": s.colour,
                "track": [None if p is None else list(p) for p in s.track],
            }
            for s in shapes
        ],
    }
