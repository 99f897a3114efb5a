"""Small checks shared by the validators: value types, short value reprs, and the bounds
of a generation's arguments (checked by the pipeline and, before loading, by the CLI)."""

from __future__ import annotations

import math

import numpy as np

from .errors import BonsaiError

MAX_STEPS = 1000
MAX_SEED = 2**64 - 1  # mx.random.key takes a uint64
MIN_SIZE, MAX_SIZE = 64, 2048  # pixels per side; the multiple-of-16 rule is the VAE's x the 2x2 patch
MAX_SEQUENCE_LENGTH = 4096  # prompt tokens a pipeline pads or truncates to


def is_int(v) -> bool:
    """An integer that is not a bool (JSON true/false arrive as bool, a subclass of int)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def brief(value, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, for messages about values read from files."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 5] + " ...]"


def check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise BonsaiError(f"{name} must be an integer number of pixels, got {v!r}")
        if v % 16:
            lo, hi = v // 16 * 16, v // 16 * 16 + 16
            raise BonsaiError(f"{name}={v} is not a multiple of 16 (the VAE and 2x2 patching need it); try {lo} or {hi}")
        if not MIN_SIZE <= v <= MAX_SIZE:
            raise BonsaiError(f"{name}={v} is outside the supported range {MIN_SIZE}..{MAX_SIZE} pixels")
