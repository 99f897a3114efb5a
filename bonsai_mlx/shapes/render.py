"""Images of the shapes task: a layout for a Spec, drawn at 128x128.

Shapes are axis-aligned: a circle of diameter s, a square of side s, a triangle with a
horizontal base of width s and its apex s above the base. Boxes keep GAP pixels from each
other and MARGIN from the border, so every object is its own connected region. Drawing is
done at SUPERSAMPLE times the size and box-averaged down, which anti-aliases the edges the
way a decoder's output is soft. Everything is a function of (spec, seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from ..errors import BonsaiError
from .scenes import BACKGROUND, COLORS, IMAGE_SIZE, Spec

MARGIN = 4
GAP = 6
SUPERSAMPLE = 4
# Side ranges in pixels by number of objects in the image.
SIDES = {1: (30, 60), 2: (24, 44), 3: (18, 32), 4: (18, 30)}
# A relation is laid out within this angle of its direction (the scorer accepts 60 degrees).
RELATION_CONE_DEG = 25.0
_DIRECTIONS = {"left of": (-1.0, 0.0), "right of": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}


@dataclass(frozen=True)
class Thing:
    shape: str
    color: str
    cx: float  # box centre, pixels, x to the right
    cy: float  # y downwards
    side: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.side / 2
        return self.cx - h, self.cy - h, self.cx + h, self.cy + h


def _apart(a: Thing, b: Thing) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + GAP <= bx0 or bx1 + GAP <= ax0 or ay1 + GAP <= by0 or by1 + GAP <= ay0


def _in_relation(a: Thing, b: Thing, relation: str) -> bool:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    ux, uy = _DIRECTIONS[relation]
    length = math.hypot(dx, dy)
    return length > 0 and (dx * ux + dy * uy) / length >= math.cos(math.radians(RELATION_CONE_DEG))


def _objects(spec: Spec, rng: np.random.Generator) -> list[tuple[str, str]]:
    names = list(COLORS)
    pick = lambda c: c if c is not None else names[rng.integers(len(names))]
    if spec.category == "counting":
        return [(spec.shapes[0], pick(None)) for _ in range(spec.count)]
    return [(s, pick(c)) for s, c in zip(spec.shapes, spec.colors)]


def layout(spec: Spec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> list[Thing]:
    """Objects with random colours (where the spec leaves them open), sides and places
    that satisfy the spec; for position, objects[0] stands in the relation to objects[1]."""
    objs = _objects(spec, rng)
    lo, hi = SIDES[len(objs)]
    scale = size / IMAGE_SIZE
    for attempt in range(2000):
        shrink = 0.97 ** (attempt // 100)  # crowded draws get smaller objects after a while
        things: list[Thing] = []
        for shape, color in objs:
            side = rng.uniform(lo, hi) * scale * shrink
            half = side / 2 + MARGIN
            things.append(Thing(shape, color, rng.uniform(half, size - half), rng.uniform(half, size - half), side))
        if not all(_apart(a, b) for i, a in enumerate(things) for b in things[i + 1:]):
            continue
        if spec.relation is not None and not _in_relation(things[0], things[1], spec.relation):
            continue
        return things
    raise BonsaiError(f"could not lay out {spec.prompt!r} in a {size}x{size} image")


def render(things: list[Thing], size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [size, size, 3] on the white background."""
    k = SUPERSAMPLE
    img = Image.new("RGB", (size * k, size * k), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for t in things:
        x0, y0, x1, y1 = (v * k for v in t.box)
        fill = COLORS[t.color]
        if t.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif t.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif t.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise BonsaiError(f"unknown shape {t.shape!r}")
    return np.asarray(img.resize((size, size), Image.BOX))


def example(spec: Spec, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[Thing]]:
    """The image for (spec, seed) and its objects."""
    things = layout(spec, np.random.default_rng(seed), size)
    return render(things, size), things


def recolored(things: list[Thing], index: int, color: str) -> list[Thing]:
    return [replace(t, color=color) if i == index else t for i, t in enumerate(things)]


def reshaped(things: list[Thing], index: int, shape: str) -> list[Thing]:
    return [replace(t, shape=shape) if i == index else t for i, t in enumerate(things)]


def swapped(things: list[Thing]) -> list[Thing]:
    """The first two objects trade places (centres)."""
    a, b = things[0], things[1]
    return [replace(a, cx=b.cx, cy=b.cy), replace(b, cx=a.cx, cy=a.cy), *things[2:]]
