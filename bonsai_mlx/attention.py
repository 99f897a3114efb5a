"""Scaled dot-product attention over query chunks, shared by the transformer and the VAE."""

from __future__ import annotations

import mlx.core as mx


def sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float, rows: int | None = None,
         sync: bool = False) -> mx.array:
    """q [B, H, Lq, D], k, v [B, H, L, D] -> [B, H, Lq, D], unmasked.

    With `rows`, queries go that many at a time, each chunk waiting for the one before
    (and evaluated before the next under `sync`): where the backend materialises the
    scores, it holds [B, H, rows, L] at most instead of every chunk's at once.
    """
    L = q.shape[2]
    if rows is None or rows >= L:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    parts = []
    for r in range(0, L, rows):
        qc = q[:, :, r:r + rows] if not parts else mx.depends(q[:, :, r:r + rows], parts[-1])
        parts.append(mx.fast.scaled_dot_product_attention(qc, k, v, scale=scale))
        if sync:
            mx.eval(parts[-1])
    return mx.concatenate(parts, axis=2)
