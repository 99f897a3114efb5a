"""What a prompt of the shapes task asks for, every prompt there is, and the split.

Six categories follow GenEval's tasks, with circles, squares and triangles in eight
colours standing in for its object classes:

  single_object  "an image of a circle"                      at least one circle
  two_object     "an image of a circle and a square"         at least one of each
  counting       "an image of three triangles"               exactly three triangles
  colors         "an image of a red circle"                  at least one red circle
  position       "an image of a circle left of a square"     a circle placed so of a square
  color_attr     "an image of a red circle and a blue square"  one of each, each in its colour

Attributes a prompt leaves open (the colour in single_object, two_object, counting and
position) are drawn at random when an image is made for it.

The split: inside each category, prompts are ordered by the SHA-256 of
SPLIT_SALT + prompt text and the first quarter (at least one) is held out for
evaluation; training draws only from the rest. The rule depends on the text alone,
so it is the same on every machine and for every seed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import permutations
from typing import Optional

import numpy as np

from ..errors import BonsaiError

# Saturated, mutually distant colours on a white background (tests/test_shapes.py checks
# the distances); light tints are left out because a blurred edge of a strong colour
# against white is such a tint.
COLORS = {
    "red": (215, 25, 25),
    "orange": (250, 125, 0),
    "yellow": (240, 225, 20),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 180),
    "pink": (250, 110, 190),
    "black": (25, 25, 25),
}
BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
IMAGE_SIZE = 128

SPLIT_SALT = "bonsai-shapes-split-v1:"
HELD_OUT_FRACTION = 0.25


@dataclass(frozen=True)
class Spec:
    """One prompt's requirements. `shapes` has one entry (single_object, counting, colors)
    or two (the others); `colors` has one entry per shape, None where the prompt names no
    colour; `count` is the exact count for counting; `relation` reads
    "shapes[0] <relation> shapes[1]"."""

    category: str
    shapes: tuple[str, ...]
    colors: tuple[Optional[str], ...]
    count: int = 1
    relation: Optional[str] = None

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise BonsaiError(f"category must be one of {CATEGORIES}, got {self.category!r}")
        if not self.shapes or any(s not in SHAPES for s in self.shapes):
            raise BonsaiError(f"shapes must be taken from {SHAPES}, got {self.shapes!r}")
        if len(self.colors) != len(self.shapes) or any(c is not None and c not in COLORS for c in self.colors):
            raise BonsaiError(f"colors must name one of {sorted(COLORS)} (or None) per shape, got {self.colors!r}")
        if self.count not in NUMBERS:
            raise BonsaiError(f"count must be in 1..{max(NUMBERS)}, got {self.count!r}")
        if self.relation is not None and self.relation not in RELATIONS:
            raise BonsaiError(f"relation must be one of {RELATIONS}, got {self.relation!r}")

    @property
    def prompt(self) -> str:
        c = self.category
        if c == "counting":
            noun = self.shapes[0] if self.count == 1 else PLURALS[self.shapes[0]]
            return f"an image of {NUMBERS[self.count]} {noun}"
        things = [_with_article(f"{col} {s}" if col else s) for s, col in zip(self.shapes, self.colors)]
        if c == "position":
            return f"an image of {things[0]} {self.relation} {things[1]}"
        return "an image of " + " and ".join(things)

    def object_count(self) -> int:
        return self.count if self.category == "counting" else len(self.shapes)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@lru_cache(maxsize=None)
def all_specs(category: str) -> tuple[Spec, ...]:
    """Every prompt of a category, in a fixed order."""
    colors = tuple(COLORS)
    if category == "single_object":
        return tuple(Spec(category, (s,), (None,)) for s in SHAPES)
    if category == "two_object":
        return tuple(Spec(category, pair, (None, None)) for pair in permutations(SHAPES, 2))
    if category == "counting":
        return tuple(Spec(category, (s,), (None,), count=n) for s in SHAPES for n in NUMBERS)
    if category == "colors":
        return tuple(Spec(category, (s,), (c,)) for s in SHAPES for c in colors)
    if category == "position":
        return tuple(Spec(category, pair, (None, None), relation=r) for pair in permutations(SHAPES, 2)
                     for r in RELATIONS)
    if category == "color_attr":
        return tuple(Spec(category, pair, cols) for pair in permutations(SHAPES, 2)
                     for cols in permutations(colors, 2))
    raise BonsaiError(f"category must be one of {CATEGORIES}, got {category!r}")


def _split_key(spec: Spec) -> str:
    return hashlib.sha256((SPLIT_SALT + spec.prompt).encode()).hexdigest()


@lru_cache(maxsize=None)
def _split(category: str) -> tuple[tuple[Spec, ...], tuple[Spec, ...]]:
    specs = sorted(all_specs(category), key=_split_key)
    n_held = max(1, math.ceil(HELD_OUT_FRACTION * len(specs)))
    return tuple(specs[n_held:]), tuple(specs[:n_held])


def train_specs(category: str) -> tuple[Spec, ...]:
    return _split(category)[0]


def held_out_specs(category: str) -> tuple[Spec, ...]:
    return _split(category)[1]


def evaluation_specs(count: Optional[int] = None) -> list[Spec]:
    """The held-out prompts, categories interleaved (one of each in turn) so that the first
    `count` cover every category as evenly as they can; all of them when count is None."""
    per = [list(held_out_specs(c)) for c in CATEGORIES]
    out: list[Spec] = []
    for i in range(max(len(p) for p in per)):
        out.extend(p[i] for p in per if i < len(p))
    if count is not None:
        if not isinstance(count, int) or count < 1:
            raise BonsaiError(f"count must be a positive number of prompts, got {count!r}")
        out = out[:count]
    return out


def training_prompts() -> set[str]:
    return {s.prompt for c in CATEGORIES for s in train_specs(c)}


def sample_train_spec(rng: np.random.Generator) -> Spec:
    """A category uniformly, then a training prompt of it uniformly."""
    specs = train_specs(CATEGORIES[rng.integers(len(CATEGORIES))])
    return specs[rng.integers(len(specs))]


def vocabulary() -> list[str]:
    """Every word any prompt of the task uses (training and held out)."""
    words = {w for c in CATEGORIES for s in all_specs(c) for w in s.prompt.split()}
    return sorted(words)
