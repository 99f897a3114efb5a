"""The generated CUDA twins on MLX's CUDA back-end (device machine only).

Skipped cleanly elsewhere: on the CPU back-end mx.fast.cuda_kernel raises.
The GEMM path's tensor-core tile (metal/tile_mma.cuh) is hand-written, so
these cases are what keep it in lockstep with the Metal source. The slab
path's decode kernels are checked bit for bit against packing.dequantize, and
the whole slab path (decode + MLX's matmul + concatenation) against the
oracle and the reference path.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx import kernels, packing
from bonsai_mlx.packed_linear import packed_matmul_reference

sys.path.insert(0, str(Path(__file__).parent))
from kernel_helpers import TOL, dense, random_weight, rel_err, slab_weight, to_numpy  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA back-end"),
]

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
CASES = [
    (M, N, K, dt)
    for (M, N, K) in [(1, 72, 640), (5, 100, 384), (16, 300, 1280), (24, 136, 1152), (33, 136, 128), (70, 200, 640),
                      (257, 390, 1152), (1536, 640, 3072)]
    for dt in ("float16", "bfloat16", "float32")
]


@pytest.mark.parametrize("fmt", kernels.FORMATS)
@pytest.mark.parametrize("M,N,K,dtype", CASES)
def test_cuda_kernel_matches_oracle(fmt, M, N, K, dtype):
    rng = np.random.default_rng(abs(hash((fmt, M, N, K, dtype))) % 2**32)
    t, s, pw = random_weight(rng, fmt, N, K)
    x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(DTYPES[dtype])
    # Poison whatever memory the allocator hands back next.
    mx.eval(mx.full((M * N * 4,), float("nan")))
    y = kernels.packed_matmul(x, pw, "cuda")
    y = to_numpy(y).astype(np.float64)
    assert np.isfinite(y).all()
    ref = to_numpy(x).astype(np.float64) @ dense(t, s).T
    # bf16 tensor-core tiles round the fp16 scale to bf16 as well.
    tol = TOL[dtype] * (2 if dtype == "bfloat16" else 1)
    assert rel_err(y, ref) < tol


# (format, matrix rows N, slab rows [n0, n1), K, dtype): as the harness cases, plus one klein-sized slab.
DECODE_CASES = [
    ("binary", 70, 13, 50, 640, "bfloat16"),
    ("binary", 40, 31, 40, 1152, "float16"),
    ("binary", 3072, 1536, 3072, 3072, "float16"),
    ("ternary", 33, 11, 30, 384, "float16"),
    ("ternary", 40, 3, 40, 1152, "bfloat16"),
    ("ternary", 3072, 1536, 3072, 3072, "bfloat16"),
]


@pytest.mark.parametrize("fmt,N,n0,n1,K,dtype", DECODE_CASES)
def test_cuda_decode_matches_packing_dequantize_bit_for_bit(fmt, N, n0, n1, K, dtype):
    rng = np.random.default_rng(abs(hash((fmt, N, n0, n1, K, dtype))) % 2**32)
    t, s, pw = slab_weight(rng, fmt, N, K)
    dt = DTYPES[dtype]
    mx.eval(mx.full(((n1 - n0) * K,), float("nan")))  # poison what the allocator hands back next
    bits = np.array(kernels.decode_slab(pw, n0, n1, dt, "cuda").view(mx.uint16))
    with mx.stream(mx.cpu):  # the reference's +0 fold on the CPU, whatever the GPU's float flags
        rows = packing.PackedWeight(pw.fmt, pw.data[n0:n1], pw.scales[n0:n1], (n1 - n0, K))
        want = np.array(packing.dequantize(rows, dt).view(mx.uint16))
    bad = np.argwhere(bits != want)
    assert bad.size == 0, f"{len(bad)} elements differ, first at {tuple(bad[0])}"


# Slab path, forced with path="slab" whatever slab_min_m is: (M, N, K, slab cap in weights or None
# for the default config's): many slabs with a ragged last one, klein shapes at the real cap (one
# slab, and several), and M = 40.
SLAB_CASES = [
    (1024, 640, 3072, 128 * 3072),
    (1536, 390, 1152, 128 * 1152),
    (40, 3072, 3072, None),
    (40, 18432, 3072, None),
    (256, 3072, 12288, None),
]


@pytest.mark.parametrize("fmt", kernels.FORMATS)
@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
@pytest.mark.parametrize("M,N,K,cap", SLAB_CASES)
def test_cuda_slab_path_matches_oracle_and_reference(fmt, dtype, M, N, K, cap):
    config = kernels.DEFAULT_CONFIG if cap is None else replace(kernels.DEFAULT_CONFIG, slab_max_elements=cap)
    rng = np.random.default_rng(abs(hash((fmt, M, N, K, dtype))) % 2**32)
    t, s, pw = random_weight(rng, fmt, N, K)
    x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(DTYPES[dtype])
    rows = kernels.plan(fmt, M, N, K, x.dtype, "cuda", "slab", config).slab_rows
    assert (len(kernels.slab_ranges(N, rows)) == 1) == (N * K <= config.slab_max_elements)
    mx.eval(mx.full((M * N * 4,), float("nan")))
    y = to_numpy(kernels.packed_matmul(x, pw, "cuda", path="slab", config=config)).astype(np.float64)
    assert np.isfinite(y).all()
    # Bound: MLX's matmul accumulates in float32; the slab holds W exactly in float16, and with each
    # scale rounded once to bfloat16 (<= 2^-9 relative) in bfloat16; the output rounds once. So the
    # same bound as the fused kernels (TOL: 2e-3 fp16, 1e-2 bf16; bf16 doubled as there).
    tol = TOL[dtype] * (2 if dtype == "bfloat16" else 1)
    ref = to_numpy(x).astype(np.float64) @ dense(t, s).T
    assert rel_err(y, ref) < tol
    assert rel_err(y, to_numpy(packed_matmul_reference(x, pw)).astype(np.float64)) < tol


@pytest.mark.parametrize("fmt", kernels.FORMATS)
def test_cuda_slab_path_is_chosen_at_slab_min_m_and_compiles(fmt):
    rng = np.random.default_rng(3)
    t, s, pw = random_weight(rng, fmt, 640, 1152)
    M = kernels.DEFAULT_CONFIG.slab_min_m[fmt]
    assert kernels.plan(fmt, M, 640, 1152, mx.float16, "cuda").slab_rows > 0
    x = mx.array(rng.standard_normal((M, 1152)).astype(np.float32)).astype(mx.float16)
    y = kernels.packed_matmul(x, pw, "cuda")
    ref = to_numpy(x).astype(np.float64) @ dense(t, s).T
    assert rel_err(to_numpy(y).astype(np.float64), ref) < TOL["float16"]
    # Under mx.compile (weights as inputs) it gives the same values.
    f = mx.compile(lambda a, d, sc: kernels.packed_matmul(a, type(pw)(fmt=fmt, data=d, scales=sc, shape=pw.shape),
                                                           "cuda"))
    np.testing.assert_array_equal(np.array(f(x, pw.data, pw.scales)), np.array(y))


@pytest.mark.parametrize("B,R,C,dtype", [(1, 1 << 20, 128, "float16"), (2, 4097, 512, "bfloat16"), (1, 300, 96, "float16")])
def test_cuda_column_moments_accumulate_in_float32(B, R, C, dtype):
    """The VAE's column moments on the GPU at a 1024 px stage's shape and others: float64 sums
    of the values read within 1e-5, channel means far from zero and far apart."""
    rng = np.random.default_rng(R + C)
    x = rng.standard_normal((B, R, C)).astype(np.float32) * 3 + rng.uniform(-200, 200, (B, 1, C)).astype(np.float32)
    xm = mx.array(x).astype(DTYPES[dtype])
    xs = np.array(xm.astype(mx.float32)).astype(np.float64)
    np.testing.assert_allclose(np.array(kernels.column_moments(xm, backend="cuda")), xs.sum(axis=1), rtol=1e-5)
    mean = xs.mean(axis=1).astype(np.float32)
    want = ((xs - mean[:, None].astype(np.float64)) ** 2).sum(axis=1)
    np.testing.assert_allclose(np.array(kernels.column_moments(xm, mx.array(mean), "cuda")), want, rtol=1e-5)


@pytest.mark.parametrize("B,R,C,dtype", [(1, 32 * 1024, 128, "float16"), (1, 64 * 1024, 256, "bfloat16"),
                                         (2, 301, 96, "float16"), (1, 1000, 128, "float16")])
def test_cuda_block_moments_give_each_blocks_sum_and_deviations(B, R, C, dtype):
    """block_moments on the GPU at 1024 px strips' shapes (32 rows of 128 channels, 64 of 256),
    a small uneven one and one whose last blocks hold no rows (1,000 rows in 128 blocks of 8):
    each block's float64 sum within 1e-5 and its squared deviations
    around its own mean within 1e-4, channel means far from zero and apart."""
    from kernel_helpers import check_block_moments, far_apart_columns

    xm = far_apart_columns(B, R, C, DTYPES[dtype])
    check_block_moments(xm, *kernels.block_moments(xm, "cuda"))


def test_cuda_strip_statistics_from_the_kernel_equal_the_float32_copies(monkeypatch):
    """vae_strips' merged statistics of float16 strips on the GPU (block_moments) against the
    float32-copy moments (forced by hiding the kernel), within 1e-5."""
    from bonsai_mlx.vae_strips import _merged, _moments

    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((1, 96, 1024, 128)).astype(np.float32) * 4 + 30).astype(mx.float16)
    spans = ((0, 32), (32, 64), (64, 96))
    got = [np.array(a) for a in _merged([_moments(x[:, a:b]) for a, b in spans], 32)]
    monkeypatch.setattr(kernels, "moments_backend", lambda dt: None)
    want = [np.array(a) for a in _merged([_moments(x[:, a:b]) for a, b in spans], 32)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_cuda_group_stats_of_16_bit_activations_equal_the_float32_reduction(monkeypatch):
    """vae.group_stats on the GPU takes the kernel for float16 and agrees with the float32-copy
    reduction (forced by hiding the kernel) within 1e-5."""
    from bonsai_mlx import vae

    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((2, 96, 80, 128)).astype(np.float32) * 4 + 30).astype(mx.float16)
    assert kernels.moments_backend(mx.float16) == "cuda"
    got = [np.array(a) for a in vae.group_stats(x, 32)]
    monkeypatch.setattr(kernels, "moments_backend", lambda dt: None)
    want = [np.array(a) for a in vae.group_stats(x, 32)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
