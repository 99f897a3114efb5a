"""Test-only numpy packers and oracle for the packed kernels.

Independent of bonsai_mlx.packing on purpose: they follow the format spec
(docs/bonsai-formats, bonsai_mlx/packing.py docstring) line by line, so a
kernel and a packer cannot agree on the same wrong layout.
"""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np


def random_codes(rng, fmt: str, n: int, k: int) -> np.ndarray:
    """t [N, K]: {-1, +1} for binary, {-1, 0, +1} for ternary."""
    if fmt == "binary":
        return rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, k))
    return rng.integers(-1, 2, size=(n, k)).astype(np.int8)


def pack(fmt: str, t: np.ndarray, scales: np.ndarray):
    """A PackedWeight-like namespace (fmt, data, scales, shape) from codes t [N, K]."""
    n, k = t.shape
    assert k % 128 == 0
    if fmt == "binary":
        bits = (t > 0).astype(np.uint64).reshape(n, k // 32, 32)
        data = (bits << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)
    elif fmt == "ternary":
        kb = -(-k // 5)
        codes = np.ones((n, kb * 5), dtype=np.uint32)  # pad trits: code 1
        codes[:, :k] = t + 1
        data = (codes.reshape(n, kb, 5) * (3 ** np.arange(5, dtype=np.uint32))).sum(-1).astype(np.uint8)
    else:
        raise ValueError(fmt)
    return SimpleNamespace(fmt=fmt, data=mx.array(data), scales=mx.array(scales.astype(np.float16)), shape=(n, k))


def random_weight(rng, fmt: str, n: int, k: int):
    t = random_codes(rng, fmt, n, k)
    s = rng.uniform(0.005, 0.05, size=(n, k // 128)).astype(np.float16)
    return t, s, pack(fmt, t, s)


def slab_weight(rng, fmt: str, n: int, k: int):
    """Like random_weight, with fp16 scales of both signs plus +0, -0 and two fp16 subnormals: a
    decoded slab must fold -0 into +0 and round to bf16 exactly as packing.dequantize does."""
    t = random_codes(rng, fmt, n, k)
    s = (rng.uniform(0.005, 0.05, size=(n, k // 128)) * rng.choice([-1, 1], size=(n, k // 128))).astype(np.float16)
    flat = s.reshape(-1)
    special = np.array([0.0, -0.0, 3e-6, -6e-8], dtype=np.float16)[: flat.size]
    flat[rng.choice(flat.size, size=special.size, replace=False)] = special
    return t, s, pack(fmt, t, s)


def dense(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """W [N, K] in float64."""
    return t.astype(np.float64) * np.repeat(s.astype(np.float64), 128, axis=1)


def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)) if a.dtype == mx.bfloat16 else np.array(a)


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    y = y.astype(np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


# Relative error bounds by input dtype: float accumulation vs float64, then the
# output rounding of the dtype.
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


def run_moments(x: mx.array, mean: mx.array | None = None, threads: int | None = None) -> np.ndarray:
    """kernels.column_moments through the exact Metal source in the CPU harness (the plan its
    launcher makes, `threads` aside): [B, C] float64, the partial sums added in float64."""
    from bonsai_mlx import kernels
    from metal_harness import harness

    B, R, C = x.shape
    launch = kernels.moments_plan(B, R, C, x.dtype, mean is not None, threads or kernels.MOMENTS_THREADS)
    header, body = kernels.metal_source(launch.kernel)
    inputs, outputs = kernels.io_names(launch.kernel)
    m = mx.zeros((B, C), dtype=mx.float32) if mean is None else mean.astype(mx.float32).reshape(B, C)
    (out,) = harness.run(f"bonsai_{launch.kernel}", list(inputs), list(outputs), body, header, [x, m],
                         [(B, launch.grid[1], C)], [mx.float32], launch.grid, launch.threadgroup, launch.template)
    assert harness.unwritten(out) == 0, f"{harness.unwritten(out)} partial sums never written"
    return out.astype(np.float64).sum(axis=1)


def run_block_moments(x: mx.array, values: int | None = None):
    """kernels.block_moments through the exact Metal source in the CPU harness (the plan its
    launcher makes, the `values` it aims at aside): (rows of each block, sums, squared deviations around
    each block's mean), the last two [B, blocks, C] float32 mx arrays."""
    from bonsai_mlx import kernels
    from metal_harness import harness

    B, R, C = x.shape
    launch = kernels.block_moments_plan(B, R, C, x.dtype, values or kernels.BLOCK_MOMENTS_VALUES)
    header, body = kernels.metal_source(launch.kernel)
    inputs, outputs = kernels.io_names(launch.kernel)
    nb = launch.grid[1] // launch.threadgroup[1]
    sums, m2s = harness.run(f"bonsai_{launch.kernel}", list(inputs), list(outputs), body, header, [x],
                            [(B, nb, C)] * 2, [mx.float32] * 2, launch.grid, launch.threadgroup, launch.template)
    assert harness.unwritten(sums) == 0 and harness.unwritten(m2s) == 0, "block moments never written"
    return kernels.block_counts(R, nb), mx.array(sums), mx.array(m2s)


def far_apart_columns(B: int, R: int, C: int, dtype) -> mx.array:
    """x [B, R, C] of `dtype` whose channel means lie far from zero and far apart (up to 200):
    a reduction that cancelled E[x]^2 against E[x^2] in float32 misses by far more than 1e-4."""
    rng = np.random.default_rng(R + C)
    x = rng.standard_normal((B, R, C)).astype(np.float32) * 3 + rng.uniform(-200, 200, (B, 1, C)).astype(np.float32)
    return mx.array(x).astype(dtype)


def check_block_moments(x: mx.array, counts: tuple, sums, m2s) -> None:
    """block_moments' (counts, sums, squared deviations) of x [B, R, C] against float64 block by
    block: the counts cover R, each block's sum within 1e-5 and its squared deviations around
    its own mean within 1e-4 (relative); a block of no rows holds zeros."""
    xs = np.array(x.astype(mx.float32)).astype(np.float64)
    sums, m2s = np.array(sums), np.array(m2s)
    assert sum(counts) == x.shape[1] and sums.shape == m2s.shape == (x.shape[0], len(counts), x.shape[2])
    edges = np.cumsum([0, *counts])
    for j, (a, b) in enumerate(zip(edges, edges[1:])):
        blk = xs[:, a:b]
        np.testing.assert_allclose(sums[:, j], blk.sum(axis=1), rtol=1e-5, atol=1e-3)
        dev = ((blk - blk.mean(axis=1, keepdims=True)) ** 2).sum(axis=1) if b > a else np.zeros_like(sums[:, j])
        np.testing.assert_allclose(m2s[:, j], dev, rtol=1e-4, atol=1e-3)


def exported_moments(directory, x: mx.array) -> np.ndarray:
    """The column sums of x [B, R, C] by the column-moments kernel as an app runs it: the launch
    kernels.json in `directory` describes, the source file beside it, in the CPU harness.
    [B, C] float64."""
    import json
    from pathlib import Path

    from bonsai_mlx import kernel_spec
    from metal_harness import harness

    directory = Path(directory)
    e = json.loads((directory / "kernels.json").read_text())["kernels"]["column_moments"]
    B, R, C = x.shape
    names = kernel_spec.evaluate_lets(e["let"], {"B": B, "R": R, "C": C})
    (out,) = harness.run(e["name"], e["inputs"], e["outputs"], (directory / e["source"]).read_text(), "",
                         [x, mx.zeros((B, C), dtype=mx.float32)],
                         [tuple(kernel_spec.evaluate(d, names) for d in e["output_shapes"][0])], [mx.float32],
                         [kernel_spec.evaluate(g, names) for g in e["grid"]],
                         [kernel_spec.evaluate(t, names) for t in e["threadgroup"]], [("T", x.dtype), ("SQ", 0)])
    assert harness.unwritten(out) == 0 and e["output_dtypes"] == ["float32"]
    return out.astype(np.float64).sum(axis=1)
