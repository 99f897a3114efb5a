"""GenEval-style scoring of a shapes image by deterministic image analysis.

Detection (`detect`):
  1. a 3x3 median filter per channel (removes pixel noise and JPEG speckle);
  2. the background is the median colour of the 2-pixel frame; when fewer than half of
     the frame's pixels lie within FOREGROUND_DISTANCE of it there is no background and
     nothing is detected (noise, a full-frame texture);
  3. foreground = pixels farther than FOREGROUND_DISTANCE (RGB, 0..255) from the background,
     split into 4-connected components; components under MIN_AREA pixels or over
     MAX_AREA_FRACTION of the image are dropped;
  4. colour: the median colour of the component's interior (its mask eroded by one pixel,
     the whole mask when that is empty), named by the nearest palette colour when it is
     within COLOR_TOLERANCE, else unknown;
  5. shape, from the component's box (width w, height h, pixel count A):
     aspect w/h outside [1/MAX_ASPECT, MAX_ASPECT] -> unknown;
     area of the top half over the bottom half below TRIANGLE_ASYMMETRY (or its
     inverse above 1/TRIANGLE_ASYMMETRY) -> triangle (an upright one has 1/3);
     else fill A/(w*h) >= SQUARE_FILL -> square (1.0), >= CIRCLE_FILL -> circle (pi/4),
     else unknown.

Per prompt (`check`), as GenEval's rules read with shapes for object classes:
  single_object  >= 1 object of the shape
  two_object     >= 1 of each shape
  counting       exactly N of the shape (GenEval: at least N and not N+1)
  colors         >= 1 object of the shape in the colour
  color_attr     >= 1 of the first shape in its colour and >= 1 of the second in its colour
  position       some object of the first shape stands in the relation to some object of
                 the second: with d the offset between their box centres, the component
                 of d along the relation's direction, less 10% of the two boxes' summed
                 extent along that axis, exceeds half of |d| (within 60 degrees of it).
An image is correct or not; a category's score is the fraction of its images that are
correct, and the overall score is the mean of the category scores (GenEval's "overall").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from ..errors import BonsaiError
from .scenes import CATEGORIES, COLORS, Spec

FOREGROUND_DISTANCE = 80.0
MIN_AREA = 40
MAX_AREA_FRACTION = 0.6
COLOR_TOLERANCE = 50.0
MAX_ASPECT = 1.5
TRIANGLE_ASYMMETRY = 0.6
SQUARE_FILL = 0.89
CIRCLE_FILL = 0.62
RELATION_MARGIN = 0.1
_DIRECTIONS = {"left of": (-1.0, 0.0), "right of": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}
_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    shape: Optional[str]  # None: not a circle, square or triangle
    color: Optional[str]  # None: no palette colour near enough
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int
    fill: float
    asymmetry: float  # top-half area / bottom-half area

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


def as_rgb(image) -> np.ndarray:
    """float32 [H, W, 3] in 0..255 from a PIL image, uint8 array or float array in [0, 1]."""
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise BonsaiError(f"an image must be [H, W, 3] RGB, got shape {list(a.shape)}")
    if a.dtype == np.uint8:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.floating):
        return np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0
    raise BonsaiError(f"an image must be uint8 or float in [0, 1], got {a.dtype}")


def _median3(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    stack = np.stack([p[i:i + h, j:j + w] for i in range(3) for j in range(3)])
    return np.median(stack, axis=0)


def components(mask: np.ndarray) -> np.ndarray:
    """4-connected labels (0 = outside the mask; 1.. = components, not consecutive)."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    big = h * w + 1
    while True:
        cur = np.where(mask, labels, big)
        best = cur.copy()
        best[1:] = np.minimum(best[1:], cur[:-1])
        best[:-1] = np.minimum(best[:-1], cur[1:])
        best[:, 1:] = np.minimum(best[:, 1:], cur[:, :-1])
        best[:, :-1] = np.minimum(best[:, :-1], cur[:, 1:])
        best = np.where(mask, best, 0)
        # Pointer jumping: every pixel takes its label's own label, which halves long chains.
        flat = np.concatenate([[0], best.reshape(-1)])
        best = np.where(mask, flat[best], 0)
        if np.array_equal(best, labels):
            return labels
        labels = best


def _erode(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1, constant_values=False)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _classify_shape(mask: np.ndarray) -> tuple[Optional[str], float, float]:
    h, w = mask.shape
    area = mask.sum()
    fill = float(area) / (h * w)
    top, bottom = mask[: h // 2].sum(), mask[h - h // 2:].sum()
    asym = float(top) / max(float(bottom), 1.0)
    if not 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
        return None, fill, asym
    if asym < TRIANGLE_ASYMMETRY or asym > 1 / TRIANGLE_ASYMMETRY:
        return "triangle", fill, asym
    if fill >= SQUARE_FILL:
        return "square", fill, asym
    if fill >= CIRCLE_FILL:
        return "circle", fill, asym
    return None, fill, asym


def nearest_color(rgb) -> Optional[str]:
    d = np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float32), axis=1)
    i = int(np.argmin(d))
    return _PALETTE_NAMES[i] if d[i] <= COLOR_TOLERANCE else None


def detect(image) -> list[Detection]:
    a = _median3(as_rgb(image))
    h, w = a.shape[:2]
    frame = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3),
                            a[:, -2:].reshape(-1, 3)])
    bg = np.median(frame, axis=0)
    if np.mean(np.linalg.norm(frame - bg, axis=1) <= FOREGROUND_DISTANCE) < 0.5:
        return []
    fg = np.linalg.norm(a - bg, axis=2) > FOREGROUND_DISTANCE
    labels = components(fg)
    ids, counts = np.unique(labels[fg], return_counts=True)
    out = []
    for lab, n in zip(ids, counts):
        if n < MIN_AREA or n > MAX_AREA_FRACTION * h * w:
            continue
        ys, xs = np.nonzero(labels == lab)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        mask = labels[y0:y1, x0:x1] == lab
        inner = _erode(mask)
        pixels = a[y0:y1, x0:x1][inner if inner.any() else mask]
        shape, fill, asym = _classify_shape(mask)
        out.append(Detection(shape, nearest_color(np.median(pixels, axis=0)), (int(x0), int(y0), int(x1), int(y1)),
                             int(n), fill, asym))
    return out


def in_relation(a: Detection, b: Detection, relation: str) -> bool:
    """Whether `a` stands `relation` of `b` (see the module docstring)."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = ax - bx, ay - by
    length = float(np.hypot(dx, dy))
    if length == 0:
        return False
    ux, uy = _DIRECTIONS[relation]
    axis = 0 if ux else 1
    extent = (a.box[axis + 2] - a.box[axis]) + (b.box[axis + 2] - b.box[axis])
    along = max(dx * ux + dy * uy - RELATION_MARGIN * extent, 0.0)
    return along > 0.5 * length


def check(spec: Spec, detections: list[Detection]) -> bool:
    """Whether the detections satisfy the prompt (GenEval's rules, module docstring)."""
    def found(shape, color=None):
        return [d for d in detections if d.shape == shape and (color is None or d.color == color)]

    c = spec.category
    if c == "counting":
        return len(found(spec.shapes[0])) == spec.count
    if c == "position":
        a, b = found(spec.shapes[0]), found(spec.shapes[1])
        return any(in_relation(x, y, spec.relation) for x in a for y in b)
    return all(found(s, col) for s, col in zip(spec.shapes, spec.colors))


def score_image(spec: Spec, image) -> bool:
    return check(spec, detect(image))


def summarize(results: Iterable[tuple[Spec, bool]]) -> dict:
    """{"categories": {name: {"score", "correct", "images"}}, "overall": mean of the category
    scores, "images": n}; categories with no image are left out of the overall mean."""
    tally = {c: [0, 0] for c in CATEGORIES}
    for spec, ok in results:
        tally[spec.category][0] += bool(ok)
        tally[spec.category][1] += 1
    cats = {c: {"score": k / n, "correct": k, "images": n} for c, (k, n) in tally.items() if n}
    if not cats:
        raise BonsaiError("no images to score")
    return {"categories": cats, "overall": float(np.mean([v["score"] for v in cats.values()])),
            "images": sum(v["images"] for v in cats.values())}
