"""The generated CUDA twins on MLX's CUDA back-end (device machine only).

Skipped cleanly elsewhere: on the CPU back-end mx.fast.cuda_kernel raises.
The GEMM path's tensor-core tile (metal/tile_mma.cuh) is hand-written, so
these cases are what keep it in lockstep with the Metal source.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx import kernels

sys.path.insert(0, str(Path(__file__).parent))
from kernel_helpers import TOL, dense, random_weight, rel_err, to_numpy  # noqa: E402

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
