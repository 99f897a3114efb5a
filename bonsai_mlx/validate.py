"""Small checks shared by the validators: value types, short value reprs, and the bounds
of a generation's arguments (checked by the pipeline and, before loading, by the CLI)."""

from __future__ import annotations

import math

MAX_STEPS = 1000
MAX_SEED = 2**64 - 1  # mx.random.key takes a uint64


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
