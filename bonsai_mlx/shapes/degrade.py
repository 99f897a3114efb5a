"""Imperfections a generated image may have, applied to ground truth to test the scorer.

blur    Gaussian blur, amount = radius in pixels (PIL's GaussianBlur)
noise   additive Gaussian noise per channel, amount = sigma in 0..255 levels
jpeg    JPEG round trip, amount = quality (lower is worse)
shift   every pixel's colour moved by one random offset of length `amount` (0..255 levels),
        the same offset over the whole image, like a decoder's colour cast
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from ..errors import BonsaiError

KINDS = ("blur", "noise", "jpeg", "shift")


def degrade(image: np.ndarray, kind: str, amount: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H, W, 3]."""
    if kind == "blur":
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(amount)))
    if kind == "noise":
        return np.clip(image + rng.normal(0.0, amount, image.shape), 0, 255).round().astype(np.uint8)
    if kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(amount))
        return np.asarray(Image.open(buf).convert("RGB"))
    if kind == "shift":
        v = rng.normal(size=3)
        return np.clip(image + amount * v / np.linalg.norm(v), 0, 255).round().astype(np.uint8)
    raise BonsaiError(f"degradation must be one of {KINDS}, got {kind!r}")
