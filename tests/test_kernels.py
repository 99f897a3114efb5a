"""The packed Metal kernels, executed on the CPU by tests/metal_harness.

Each case runs the exact header + body strings that bonsai_mlx.kernels hands
to mx.fast.metal_kernel, over the launch plan it would use, with poisoned
outputs, and compares with a float64 oracle (and with
packed_linear.packed_matmul_reference when that module is present).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from dataclasses import FrozenInstanceError, replace
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx import kernels, packing
from bonsai_mlx.errors import BonsaiError

sys.path.insert(0, str(Path(__file__).parent))
from kernel_helpers import TOL, bf16_bits_to_float, dense, random_weight, rel_err, run_moments, slab_weight, to_numpy
from metal_harness import harness

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
CFG = kernels.DEFAULT_CONFIG


def run_metal(pw, x: mx.array):
    """Run the planned Metal kernel in the harness; returns (y float64, launch)."""
    M, K = x.shape
    N = pw.shape[0]
    launch = kernels.plan(pw.fmt, M, N, K, x.dtype, "metal")
    header, body = kernels.metal_source(launch.kernel)
    (y,) = harness.run(
        f"bonsai_{launch.kernel}", list(kernels.INPUT_NAMES), list(kernels.OUTPUT_NAMES), body, header,
        [x, pw.data, pw.scales], [(M, N)], [x.dtype], launch.grid, launch.threadgroup, launch.template,
    )
    assert harness.unwritten(y) == 0, f"{harness.unwritten(y)} output elements never written"
    if x.dtype == mx.bfloat16:
        y = bf16_bits_to_float(y)
    return y.astype(np.float64), launch


# Ragged M (GEMV for < 32, GEMM above), N off the 64-wide tile, several K.
CASES = [
    ("binary", 1, 72, 640, "float16"),
    ("binary", 5, 100, 384, "float32"),
    ("binary", 33, 136, 128, "bfloat16"),
    ("binary", 70, 136, 640, "float16"),
    ("binary", 70, 72, 384, "float32"),
    ("binary", 20, 100, 640, "bfloat16"),
    ("binary", 16, 24, 384, "float16"),
    ("ternary", 1, 72, 640, "float16"),
    ("ternary", 5, 100, 384, "float32"),
    ("ternary", 33, 136, 128, "bfloat16"),
    ("ternary", 70, 136, 640, "float16"),
    ("ternary", 70, 72, 384, "float32"),
    ("ternary", 20, 100, 640, "bfloat16"),
    ("ternary", 16, 24, 384, "float16"),
]


@pytest.mark.parametrize("fmt,M,N,K,dtype", CASES)
def test_metal_kernel_matches_oracle(fmt, M, N, K, dtype):
    rng = np.random.default_rng(hash((fmt, M, N, K, dtype)) % 2**32)
    t, s, pw = random_weight(rng, fmt, N, K)
    x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(DTYPES[dtype])
    y, launch = run_metal(pw, x)
    want = "gemm" if M >= kernels.GEMM_MIN_M else ("gemv_fp32" if dtype == "float32" else "gemv")
    assert launch.kernel.endswith(want)
    ref = to_numpy(x).astype(np.float64) @ dense(t, s).T
    assert rel_err(y, ref) < TOL[dtype]
    try:
        from bonsai_mlx.packed_linear import packed_matmul_reference
    except ImportError:
        return
    oracle = to_numpy(packed_matmul_reference(x, pw)).astype(np.float64)
    assert rel_err(y, oracle) < TOL[dtype]


def test_plans_launch_whole_threadgroups():
    # The harness (and Metal/CUDA agreement) relies on grid % threadgroup == 0.
    for backend in ("metal", "cuda"):
        for fmt in kernels.FORMATS:
            for M in (1, 3, 16, 31, 32, 1536, 4608):
                for N, K in ((3072, 3072), (27648, 3072), (3072, 12288), (100, 128)):
                    for dt in (mx.float16, mx.float32):
                        L = kernels.plan(fmt, M, N, K, dt, backend)
                        assert all(g % t == 0 for g, t in zip(L.grid, L.threadgroup))
                        assert (L.threadgroup[0] % 32) == 0


# ----------------------------------------------------------------------------- slab path

KLEIN_SHAPES = [(3072, 3072), (18432, 3072), (3072, 9216), (27648, 3072), (3072, 12288)]


def run_decode(pw, n0, n1, dtype):
    """The decode launch for rows [n0, n1) in the harness, fed the row slices the launcher passes.
    Returns the slab's raw 16-bit patterns."""
    K = pw.shape[1]
    launch = kernels.decode_plan(pw.fmt, n1 - n0, K, dtype, "metal")
    header, body = kernels.metal_source(launch.kernel)
    inputs, outputs = kernels.io_names(launch.kernel)
    (slab,) = harness.run(
        f"bonsai_{launch.kernel}", list(inputs), list(outputs), body, header, [pw.data[n0:n1], pw.scales[n0:n1]],
        [(n1 - n0, K)], [dtype], launch.grid, launch.threadgroup, launch.template,
    )
    assert harness.unwritten(slab) == 0, f"{harness.unwritten(slab)} slab elements never written"
    return slab.view(np.uint16)


# (format, matrix rows N, slab rows [n0, n1), K, dtype): slabs starting inside the matrix, ragged
# row counts, K with 1, 2, 3, 5, 9 and 18 scale groups (K % 256 != 0: a half 256-weight simdgroup
# step; K = 2304: 3 segments of CPT = 4 steps, the last ragged) and K % 5 in {3, 1, 4, 0, 2, 4}
# (K % 5 = 1 and 2: the last chunk's trits reach the row's last byte, the third one it reads).
DECODE_CASES = [
    ("binary", 50, 0, 50, 128, "float16"),
    ("binary", 33, 5, 32, 384, "bfloat16"),
    ("binary", 70, 13, 50, 640, "bfloat16"),
    ("binary", 40, 31, 40, 1152, "float16"),
    ("binary", 9, 2, 9, 256, "float16"),
    ("binary", 12, 3, 11, 2304, "bfloat16"),
    ("ternary", 50, 0, 50, 128, "bfloat16"),
    ("ternary", 33, 11, 30, 384, "float16"),
    ("ternary", 70, 7, 44, 640, "float16"),
    ("ternary", 40, 3, 40, 1152, "bfloat16"),
    ("ternary", 9, 1, 9, 256, "float16"),
    ("ternary", 12, 4, 12, 2304, "bfloat16"),
]


@pytest.mark.parametrize("fmt,N,n0,n1,K,dtype", DECODE_CASES)
def test_decode_kernel_matches_packing_dequantize_bit_for_bit(fmt, N, n0, n1, K, dtype):
    rng = np.random.default_rng(hash((fmt, N, n0, n1, K, dtype)) % 2**32)
    t, s, pw = slab_weight(rng, fmt, N, K)
    dt = DTYPES[dtype]
    bits = run_decode(pw, n0, n1, dt)
    rows = packing.PackedWeight(pw.fmt, pw.data[n0:n1], pw.scales[n0:n1], (n1 - n0, K))
    want = np.array(packing.dequantize(rows, dt).view(mx.uint16))
    assert bits.shape == want.shape == (n1 - n0, K)
    bad = np.argwhere(bits != want)
    assert bad.size == 0, f"{len(bad)} elements differ, first at {tuple(bad[0])}: {bits[tuple(bad[0])]:#06x} != {want[tuple(bad[0])]:#06x}"
    if dtype == "float16":  # and, independently of packing, the test packer's exact values
        np.testing.assert_array_equal(bits.view(np.float16).astype(np.float64), dense(t, s)[n0:n1])


def test_plan_picks_gemv_gemm_slab_by_m():
    # The thresholds measured on an H200 (binary's fused GEMM holds out longer).
    assert CFG.slab_min_m == kernels.ByFormat(binary=1536, ternary=1024)
    for backend in ("metal", "cuda"):
        for fmt in kernels.FORMATS:
            lo, hi = kernels.GEMM_MIN_M, CFG.slab_min_m[fmt]
            assert 0 < lo < hi
            for dt in (mx.float16, mx.bfloat16):
                L = {M: kernels.plan(fmt, M, 3072, 3072, dt, backend) for M in (1, lo - 1, lo, hi - 1, hi, 4608)}
                assert L[1].kernel == L[lo - 1].kernel == f"{fmt}_gemv"
                assert L[lo].kernel == L[hi - 1].kernel == f"{fmt}_gemm"
                assert L[hi].kernel == L[4608].kernel == f"{fmt}_decode"
                assert L[hi - 1].slab_rows == 0 and L[hi].slab_rows == kernels.slab_rows(3072, 3072)
                assert kernels.plan(fmt, 1, 3072, 3072, dt, backend, path="slab").kernel == f"{fmt}_decode"
                assert kernels.plan(fmt, 4608, 3072, 3072, dt, backend, path="gemm").kernel == f"{fmt}_gemm"
            # float32 x never takes the slab (the slab is x's dtype, 16-bit).
            want = f"{fmt}_gemm" if backend == "metal" else f"{fmt}_gemv_fp32"
            assert kernels.plan(fmt, 4608, 3072, 3072, mx.float32, backend).kernel == want
            with pytest.raises(BonsaiError, match="float16 or bfloat16"):
                kernels.plan(fmt, 4608, 3072, 3072, mx.float32, backend, path="slab")
            with pytest.raises(BonsaiError, match="path"):
                kernels.plan(fmt, 4608, 3072, 3072, mx.float16, backend, path="dense")


def _recording_kernels(calls):
    """Stand-in for kernels._kernel_object that records (kernel, rows of its first input: M of x,
    or the slab's rows of w) and returns zeros: what the launcher launches, without running it."""
    def make(backend, kernel, config=CFG):
        def call(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            calls.append((kernel, inputs[0].shape[0]))
            return [mx.zeros(sh, dtype=d) for sh, d in zip(output_shapes, output_dtypes)]
        return call
    return make


def test_launcher_follows_the_plan_at_the_boundaries(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "_kernel_object", _recording_kernels(calls))
    for fmt in kernels.FORMATS:
        lo, hi = kernels.GEMM_MIN_M, CFG.slab_min_m[fmt]
        pw = random_weight(np.random.default_rng(0), fmt, 512, 256)[2]
        for M, want in ((1, "gemv"), (lo - 1, "gemv"), (lo, "gemm"), (hi - 1, "gemm")):
            calls.clear()
            y = kernels.packed_matmul(mx.zeros((M, 256), mx.float16), pw, "metal")
            assert calls == [(f"{fmt}_{want}", M)] and y.shape == (M, 512)
        calls.clear()
        y = kernels.packed_matmul(mx.zeros((2, hi // 2, 256), mx.bfloat16), pw, "cuda")
        assert y.shape == (2, hi // 2, 512) and y.dtype == mx.bfloat16
        assert calls == [(f"{fmt}_decode", 512)]  # within the cap: one slab, nothing to concatenate


def test_launchers_take_the_config_of_the_innermost_tuned_block(monkeypatch):
    """packed_linear's launchers pass no config: inside `kernels.tuned(c)` they launch as `c`
    says (here the slab cap: how many decodes a slab-path product takes), nested blocks
    restore the outer config on exit, an exception inside restores it too, and a config
    given to packed_matmul wins over the block's."""
    calls = []
    monkeypatch.setattr(kernels, "_kernel_object", _recording_kernels(calls))
    pw = random_weight(np.random.default_rng(1), "ternary", 1024, 256)[2]
    x = mx.zeros((CFG.slab_min_m["ternary"], 256), mx.float16)
    quarter, whole = replace(CFG, slab_max_elements=256 * 256), replace(CFG, slab_max_elements=1024 * 256)

    def decodes(launch=kernels.cuda_matmul, **kw):
        calls.clear()
        y = launch(x, pw, **kw)
        assert y.shape == (x.shape[0], 1024)
        return [rows for kernel, rows in calls if kernel == "ternary_decode"]

    assert kernels.current_config() is CFG and decodes() == [1024]  # within the default cap: one slab
    with kernels.tuned(quarter):
        assert decodes() == decodes(kernels.metal_matmul) == [256] * 4
        with kernels.tuned(whole):
            assert decodes() == [1024]
        assert decodes() == [256] * 4
        assert decodes(kernels.packed_matmul, backend="cuda", config=whole) == [1024]
    assert kernels.current_config() is CFG and decodes() == [1024]
    with pytest.raises(RuntimeError, match="inside"):
        with kernels.tuned(quarter):
            raise RuntimeError("inside")
    assert kernels.current_config() is CFG


def slabs_tiling(N: int, K: int, rows: int) -> list[tuple[int, int]]:
    """The slab ranges of W [N, K] at `rows` rows a slab, checked to tile [0, N) in order and to
    be one slab exactly when W is within the default cap."""
    ranges = kernels.slab_ranges(N, rows)
    assert ranges[0][0] == 0 and ranges[-1][1] == N and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert (len(ranges) == 1) == (N * K <= CFG.slab_max_elements), (N, K)
    return ranges


@pytest.mark.parametrize("N,K", KLEIN_SHAPES)
def test_slabs_stay_within_the_cap_and_cover_a_klein_matrix(monkeypatch, N, K):
    for backend in ("metal", "cuda"):
        L = kernels.plan("binary", CFG.slab_min_m["binary"], N, K, mx.float16, backend)
        rows = L.slab_rows
        assert 0 < rows <= N and rows % CFG.slab_row_multiple == 0 and rows * K <= CFG.slab_max_elements
        ranges = slabs_tiling(N, K, rows)
        assert all(0 < n1 - n0 <= rows for n0, n1 in ranges)
        # As few slabs as the cap allows.
        assert len(ranges) == -(-N * K // (CFG.slab_max_elements - CFG.slab_max_elements % (K * CFG.slab_row_multiple)))
        # The decode launch covers exactly one slab: a simdgroup per 32 CPT 8-weight chunks of a row, whole
        # threadgroups.
        t = CFG.decode
        items = rows * -(-K // (256 * t.CPT))
        assert L.grid[0] % L.threadgroup[0] == 0 and items <= L.grid[0] // 32 < items + t.NSG
    # And the launcher decodes exactly those rows (graph only: nothing is evaluated).
    calls = []
    monkeypatch.setattr(kernels, "_kernel_object", _recording_kernels(calls))
    pw = SimpleNamespace(fmt="ternary", data=mx.zeros((N, -(-K // 5)), mx.uint8), scales=mx.zeros((N, K // 128), mx.float16),
                         shape=(N, K))
    y = kernels.packed_matmul(mx.zeros((CFG.slab_min_m["ternary"], K), mx.float16), pw, "cuda")
    assert y.shape == (CFG.slab_min_m["ternary"], N)
    assert [c[1] for c in calls] == [n1 - n0 for n0, n1 in ranges]


def test_slab_rows_for_any_shape():
    """A matrix within the cap is one slab, whatever N; a larger one takes slabs within the cap
    (a row at least) that tile its rows."""
    rng = np.random.default_rng(1)
    cap = CFG.slab_max_elements
    shapes = [(int(rng.integers(1, 70000)), 128 * int(rng.integers(1, 300))) for _ in range(3000)]
    shapes += [(129, 3072), (cap // 3072, 3072), (cap // 3072 + 1, 3072), (1, 128), (5, cap // 5 // 128 * 128)]
    for N, K in shapes:
        rows = kernels.slab_rows(N, K)
        ranges = slabs_tiling(N, K, rows)
        assert 0 < rows <= N and (len(ranges) == 1 or rows * K <= cap or rows == 1), (N, K, rows)


def test_decode_plan_at_klein_shapes():
    # Every lane writes CPT = 4 chunks of 8 weights (16-byte stores); a simdgroup covers 1024 weights
    # of a row, so a K = 3072 row is 3 simdgroups. 27648x3072: 6 slabs of 4608 rows.
    for backend in ("metal", "cuda"):
        L = kernels.plan("ternary", 4608, 27648, 3072, mx.bfloat16, backend)
        assert L.slab_rows == 4608 and kernels.slab_ranges(27648, 4608)[-1] == (23040, 27648)
        assert (L.kernel, L.template, L.grid, L.threadgroup) == (
            "ternary_decode", (("T", mx.bfloat16), ("CPT", 4), ("NSG", 4)), (442368, 1, 1), (128, 1, 1))
        assert kernels.decode_plan("binary", 2048, 3072, mx.float16, backend).grid == (196608, 1, 1)
        assert kernels.plan("binary", 4608, 3072, 3072, mx.float16, backend).grid == (294912, 1, 1)  # 3072 rows


# ----------------------------------------------------------------------------- tuning config

def test_config_is_frozen_hashable_and_keys_the_plan_cache():
    assert hash(CFG) == hash(kernels.KernelConfig()) and CFG == kernels.KernelConfig()
    with pytest.raises(FrozenInstanceError):
        CFG.slab_max_elements = 1
    # A replaced config plans with its own values, and the default's plans are untouched: the
    # launcher's plan cache keys on the config itself.
    small = replace(CFG, gemv_cuda=kernels.GemvTile(NJ=2, KL=1, NSG=3), gemv_cuda_small=None,
                    gemm_cuda=kernels.GemmTile(BM=128, BN=256, BK=64, SGM=2, SGN=4),
                    slab_min_m=kernels.ByFormat(binary=64, ternary=64), slab_max_elements=128 * 3072)
    assert dict(kernels.plan("binary", 1, 3072, 3072, mx.float16, "cuda").template)["NJ"] == 4
    assert dict(kernels.plan("binary", 1, 3072, 3072, mx.float16, "cuda", config=small).template)["NJ"] == 2
    g = kernels.plan("binary", 40, 3072, 3072, mx.float16, "cuda", config=small)
    assert dict(g.template)["BN"] == 256 and g.threadgroup == (256, 1, 1)
    assert kernels.choose_path(64, mx.float16, "cuda", "ternary", small) == "slab"
    assert kernels.choose_path(64, mx.float16, "cuda", "ternary") == "gemm"
    assert kernels.slab_rows(3072, 3072, small) == 128 and kernels.slab_rows(3072, 3072) == 3072
    calls = []
    launched = {}

    def make(backend, kernel, config=CFG):
        def call(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            calls.append((kernel, inputs[0].shape[0]))
            launched[kernel] = dict(template)
            return [mx.zeros(sh, dtype=d) for sh, d in zip(output_shapes, output_dtypes)]
        return call

    pw = random_weight(np.random.default_rng(0), "ternary", 3072, 3072)[2]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(kernels, "_kernel_object", make)
        for config, nj in ((CFG, 4), (small, 2), (CFG, 4)):
            kernels.packed_matmul(mx.zeros((1, 3072), mx.float16), pw, "cuda", config=config)
            assert launched["ternary_gemv"]["NJ"] == nj
        calls.clear()
        kernels.packed_matmul(mx.zeros((64, 3072), mx.float16), pw, "cuda", config=small)
        assert calls == [("ternary_decode", 128)] * 24


def test_a_pickled_config_hashes_in_its_new_process():
    """The config's hash is kept (every launch keys caches on it); one unpickled in another
    process, whose string hashes are seeded apart, must hash as it does there."""
    import os
    import pickle
    import subprocess
    import sys

    code = ("import pickle, sys; from bonsai_mlx import kernels; "
            "sys.stdout.buffer.write(pickle.dumps(kernels.KernelConfig()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    made = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, check=True).stdout
    c = pickle.loads(made)
    assert c == CFG and hash(c) == hash(CFG) and c in {CFG}


def test_config_rejects_unhashable_values():
    with pytest.raises(BonsaiError, match="hashable"):
        replace(CFG, source_patches=[("binary_gemm.metal", "a", "b")])


def test_source_patches_change_the_text_and_the_kernel_name():
    body = kernels.metal_source("binary_gemv")[1]
    line = next(ln for ln in body.splitlines() if len(ln) > 20)
    patched = replace(CFG, source_patches=(("binary_gemv.metal", line, line + "\nconstexpr int variant = 1;"),))
    assert CFG.name_suffix == "" and patched.name_suffix.startswith("_p")
    assert kernels.metal_source("binary_gemv", patched)[1] == body.replace(line, line + "\nconstexpr int variant = 1;", 1)
    assert kernels.metal_source("ternary_gemv", patched) == kernels.metal_source("ternary_gemv")
    assert kernels.metal_source("binary_gemv") == (kernels.metal_source("binary_gemv")[0], body)  # default untouched
    missing = replace(CFG, source_patches=(("binary_gemv.metal", "no such text", ""),))
    with pytest.raises(BonsaiError, match="source patch target not found in binary_gemv.metal"):
        kernels.metal_source("binary_gemv", missing)


def test_user_errors_are_bonsai_errors():
    pw = random_weight(np.random.default_rng(0), "binary", 64, 256)[2]
    with pytest.raises(BonsaiError, match="K must be a positive multiple of 128"):
        kernels.plan("binary", 1, 64, 200, mx.float16, "metal")
    with pytest.raises(BonsaiError, match="no kernel for packed format 'ternary2'"):
        kernels.plan("ternary2", 1, 64, 256, mx.float16, "metal")
    with pytest.raises(BonsaiError, match="no kernel for packed format 'ternary2'"):
        kernels.choose_path(1, mx.float16, "metal", "ternary2")
    with pytest.raises(BonsaiError, match="backend must be 'metal' or 'cuda'"):
        kernels.plan("binary", 1, 64, 256, mx.float16, "cpu")
    with pytest.raises(BonsaiError, match="the CUDA GEMM takes float16/bfloat16"):
        kernels.plan("binary", 64, 64, 256, mx.float32, "cuda", path="gemm")
    with pytest.raises(BonsaiError, match="need rows > 0"):
        kernels.decode_plan("binary", 0, 256, mx.float16, "cuda")
    with pytest.raises(BonsaiError, match="input has 128 features"):
        kernels.packed_matmul(mx.zeros((1, 128), mx.float16), pw, "metal")
    with pytest.raises(BonsaiError, match="input must be float16, bfloat16 or float32"):
        kernels.packed_matmul(mx.zeros((1, 256), mx.int32), pw, "metal")
    if not mx.cuda.is_available():
        with pytest.raises(BonsaiError, match="'cuda' is not available"):
            kernels.packed_matmul(mx.zeros((1, 256), mx.float16), pw, "cuda")
    if not mx.metal.is_available():
        with pytest.raises(BonsaiError, match="'metal' is not available"):
            kernels.decode_slab(pw, 0, 8, mx.float16, "metal")


def test_kernels_import_only_errors_and_find_metal_next_to_themselves():
    # Imports go packed_linear -> kernels, never back: kernels imports nothing else of the package.
    tree = ast.parse(Path(kernels.__file__).read_text())
    ours = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.level or "bonsai" in (n.module or ""))]
    assert [(n.level, n.module) for n in ours] == [(1, "errors")]
    assert not any(isinstance(n, ast.Import) and any("bonsai" in a.name for a in n.names) for n in ast.walk(tree))
    here = Path(kernels.__file__).parent
    assert kernels.metal_dir() in (here / "metal", here.parent / "metal")


def _harness_kernels(calls):
    """Stand-in for kernels._kernel_object that runs the Metal source in the harness, with the
    arguments the launcher gives MLX."""
    def make(backend, kernel, config=CFG):
        inputs_n, outputs_n = kernels.io_names(kernel)
        header, body = kernels.metal_source(kernel, config)

        def call(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            calls.append((kernel, inputs[0].shape[0]))
            outs = harness.run(f"bonsai_{kernel}", list(inputs_n), list(outputs_n), body, header, inputs,
                               output_shapes, output_dtypes, grid, threadgroup, template)
            return [mx.array(o).view(mx.bfloat16) if d == mx.bfloat16 else mx.array(o)
                    for o, d in zip(outs, output_dtypes)]
        return call
    return make


@pytest.mark.parametrize("fmt,dtype", [("binary", "float16"), ("ternary", "bfloat16")])
def test_slab_path_end_to_end_in_the_harness(monkeypatch, fmt, dtype):
    # packed_matmul's slab path with the decode kernels run by the harness: slicing, row offsets,
    # the ragged last slab, MLX's matmul and the concatenation along N. 128-row slabs of K = 256.
    config = replace(CFG, slab_max_elements=128 * 256)
    calls = []
    monkeypatch.setattr(kernels, "_kernel_object", _harness_kernels(calls))
    rng = np.random.default_rng(7)
    N, K = 300, 256
    t, s, pw = slab_weight(rng, fmt, N, K)
    x = mx.array(rng.standard_normal((2, CFG.slab_min_m[fmt] // 2, K)).astype(np.float32)).astype(DTYPES[dtype])
    y = kernels.packed_matmul(x, pw, "metal", config=config)
    assert y.shape == (2, CFG.slab_min_m[fmt] // 2, N) and y.dtype == DTYPES[dtype]
    assert calls == [(f"{fmt}_decode", 128), (f"{fmt}_decode", 128), (f"{fmt}_decode", 44)]
    ref = to_numpy(x).reshape(-1, K).astype(np.float64) @ dense(t, s).T
    assert rel_err(to_numpy(y).reshape(-1, N), ref) < TOL[dtype]


def test_slab_path_holds_one_slab_at_a_time(monkeypatch):
    # The launcher chains each decode behind the previous slab's matmul (mx.depends), so MLX never
    # holds many slabs at once. The decode is stood in for by packing.dequantize of the same rows
    # (lazy MLX ops, so MLX schedules it as it would the kernel); 128 slabs of 64 rows, M = 16.
    # Measured on this machine: 1.7 MiB extra at peak chained, 7.5 MiB unchained; dense W is 16 MiB.
    def lazy_decode(backend, kernel, config=CFG):
        def call(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            rows = packing.PackedWeight(kernel.split("_")[0], inputs[0], inputs[1], tuple(output_shapes[0]))
            return [packing.dequantize(rows, output_dtypes[0])]
        return call

    monkeypatch.setattr(kernels, "_kernel_object", lazy_decode)
    config = replace(CFG, slab_max_elements=64 * 1024)
    N, K = 8192, 1024
    pw = random_weight(np.random.default_rng(5), "binary", N, K)[2]
    x = mx.array(np.random.default_rng(6).standard_normal((16, K)).astype(np.float16))
    mx.eval(pw.data, pw.scales, x)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(kernels.packed_matmul(x, pw, "metal", path="slab", config=config))
    extra = mx.get_peak_memory() - base
    assert extra < N * K * 2 / 6, f"peak extra {extra / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- harness honesty

ADD_ONE = "uint i = thread_position_in_grid.x; out[i] = inp[i] + 1.0f;"


def _run_tiny(body, n=64, tg=32, header="", **kw):
    x = mx.arange(n).astype(mx.float32)
    return harness.run("tiny", ["inp"], ["out"], body, header, [x], [(n,)], [mx.float32], (n, 1, 1), (tg, 1, 1),
                       **kw)[0]


def test_harness_runs_a_plain_kernel():
    np.testing.assert_array_equal(_run_tiny(ADD_ONE), np.arange(64) + 1)


def test_harness_detects_unwritten_outputs():
    y = _run_tiny("uint i = thread_position_in_grid.x; if (i != 17) out[i] = inp[i];")
    assert harness.unwritten(y) == 1


def test_harness_threadgroup_memory_is_shared_and_barriers_order():
    body = """
    threadgroup float buf[64];
    uint i = thread_index_in_threadgroup;
    buf[i] = inp[thread_position_in_grid.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[thread_position_in_grid.x] = buf[63 - i] + simd_sum(1.0f);
    """
    y = _run_tiny(body, n=128, tg=64)
    want = np.concatenate([np.arange(63, -1, -1), np.arange(127, 63, -1)]) + 32
    np.testing.assert_array_equal(y, want)


def test_harness_simdgroup_matrix_matches_numpy():
    body = """
    threadgroup float a[64];
    threadgroup float b[64];
    threadgroup float c[64];
    uint i = thread_index_in_simdgroup;
    a[i] = inp[i]; a[i + 32] = inp[i + 32];
    b[i] = inp[63 - i]; b[i + 32] = inp[31 - i];
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_matrix<float, 8, 8> am, bm, cm;
    cm = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);
    simdgroup_load(am, a, 8);
    simdgroup_load(bm, b, 8);
    simdgroup_multiply_accumulate(cm, am, bm, cm);
    simdgroup_store(cm, c, 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    out[i] = c[i]; out[i + 32] = c[i + 32];
    """
    y = _run_tiny(body, n=64, tg=32, header="#include <metal_simdgroup_matrix>\n").reshape(8, 8)
    a = np.arange(64, dtype=np.float64).reshape(8, 8)
    b = np.arange(63, -1, -1, dtype=np.float64).reshape(8, 8)
    np.testing.assert_array_equal(y, a @ b + 1)


@pytest.mark.parametrize(
    "body",
    [
        "float2 v = float2(1.0f, 2.0f); out[0] = v.x;",  # vector constructor
        "out[thread_position_in_grid.x] = inp[0]; float4 q; out[0] = q.xy.x;",  # swizzle
        "atomic_fetch_add_explicit((device atomic_float*)out, 1.0f, memory_order_relaxed);",
        "threadgroup float t = 1.0f; out[thread_position_in_grid.x] = t;",  # threadgroup scalar w/ init
        "out[thread_position_in_grid.x] = simd_prefix_exclusive_sum(inp[0]);",
        "out[thread_position_in_grid.x] = quad_sum(inp[0]);",
        "packed_float3 p; out[thread_position_in_grid.x] = p[0];",
        "out[thread_position_in_grid.x] = undefined_metal_builtin(inp[0]);",  # fails to compile
    ],
)
def test_harness_rejects_unsupported_msl(body):
    with pytest.raises(harness.UnsupportedMSL):
        _run_tiny(body)


def test_harness_rejects_unknown_includes():
    with pytest.raises(harness.UnsupportedMSL):
        _run_tiny(ADD_ONE, header="#include <metal_raytracing>\n")


def test_harness_rejects_partial_threadgroups():
    x = mx.zeros((48,))
    with pytest.raises(harness.UnsupportedMSL):
        harness.run("tiny", ["inp"], ["out"], ADD_ONE, "", [x], [(48,)], [mx.float32], (48, 1, 1), (32, 1, 1))


def test_harness_fails_loudly_on_divergent_barrier():
    body = """
    if (thread_index_in_threadgroup < 16) threadgroup_barrier(mem_flags::mem_threadgroup);
    out[thread_position_in_grid.x] = inp[thread_position_in_grid.x];
    """
    with pytest.raises(RuntimeError, match="timed out|divergent"):
        _run_tiny(body, n=32, tg=32, barrier_timeout_s=1.0)


def test_harness_fails_on_non_uniform_simdgroup_matrix():
    body = """
    threadgroup float a[64 + 32];
    uint i = thread_index_in_simdgroup;
    a[i] = 0; a[i + 32] = 0; a[i + 64] = 0;
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_matrix<float, 8, 8> m;
    simdgroup_load(m, a + (i % 2), 8);  // lane-dependent pointer: not allowed
    out[thread_position_in_grid.x] = inp[i];
    """
    with pytest.raises(RuntimeError, match="non-uniform"):
        _run_tiny(body, n=32, tg=32, header="#include <metal_simdgroup_matrix>\n")


def test_harness_poisons_threadgroup_memory():
    body = """
    threadgroup float buf[64];
    out[thread_position_in_grid.x] = buf[thread_index_in_threadgroup];  // never written
    """
    assert np.isnan(_run_tiny(body)).all()


# ----------------------------------------------------------------------------- CUDA twin text

def test_cuda_twin_is_generated_from_the_metal_source():
    for kernel in ("binary_gemm", "ternary_gemm", "binary_gemv", "ternary_gemv", "binary_gemv_fp32",
                   "ternary_gemv_fp32", "binary_decode", "ternary_decode", kernels.MOMENTS, kernels.BLOCK_MOMENTS):
        m_header, m_body = kernels.metal_source(kernel)
        header, body = kernels.cuda_source(kernel)
        assert "threadgroup_barrier" not in body and not re.search(r"\bsimd_sum\(", body)
        assert not re.search(r"\bthreadgroup\s+\w+\s+\w+\s*\[", body)
        if "threadgroup_barrier" in m_body:
            assert "__syncthreads()" in body
        if "threadgroup float" in m_body:
            assert "__shared__" in body
        if "simd_sum" in m_body:
            assert "bonsai_simd_sum(" in body
        assert "simdgroup_matrix<" not in header and "simdgroup_load(" not in header and "#include <metal" not in header
        if kernel in kernels.HEADERLESS:  # no shared header: the uint typedef and Metal's as_type
            assert m_header == "" and header.startswith("typedef unsigned int uint;\n")
            assert header.count("__device__") == ("as_type<" in m_body) and len(header) < 300
        # Everything of the body except the rewritten spots survives verbatim.
        rewritten = re.compile(r"threadgroup|simd_sum|\b(device|constant|thread)\s+\w+\s*[*&]")
        kept = [ln for ln in m_body.splitlines() if not rewritten.search(ln)]
        assert len(kept) > (20 if kernel not in kernels.HEADERLESS else 15)
        for ln in kept:
            assert ln in body


def test_cuda_tile_twin_has_the_metal_tile_api():
    common = (kernels.metal_dir() / "common.metal").read_text()
    metal_only = common.split("// @@metal-only-begin")[1].split("// @@metal-only-end")[0]
    twin = (kernels.metal_dir() / "tile_mma.cuh").read_text()
    for name in ("BONSAI_TILE_PAD", "struct BonsaiTileType", "struct BonsaiSimdTile", "bonsai_stage_x(",
                 "bonsai_stage_commit()", "bonsai_stage_wait()", "bonsai_tile_scratch()", "void zero()",
                 "void mma_planes(", "void mma_binary(", "void mma_ternary(", "void store(",
                 "bonsai_skinny_scratch()", "struct BonsaiSkinnyTile", "void mma_words_planes(",
                 "void store_partial(", "bonsai_load_trit_bytes("):
        assert name in metal_only and name in twin, name


MLX_CUDA_STUB = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cooperative_groups.h>
namespace mlx::core::cu { using Shape = cuda::std::array<int32_t, 8>; }
"""


def _cuda_translation_unit(kernel, dtype_name, template):
    """The text mlx/backend/cuda/custom_kernel.cpp:build_kernel would compile (a `<name>_shape`
    parameter for each input whose name the body uses, as MLX does)."""
    header, body = kernels.cuda_source(kernel)
    cu = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
    types = {"x": cu[dtype_name], "w": "uint32_t" if kernel.startswith("binary") else "uint8_t", "scales": "__half",
             "mean": "float", "out": "float", "sums": "float", "m2s": "float"}
    inputs, outputs = kernels.io_names(kernel)
    params = []
    for n in inputs:
        params.append(f"const {types[n]}* {n}")
        if f"{n}_shape" in body:
            params.append(f"const __grid_constant__ Shape {n}_shape")
    params += [f"{types.get(n, cu[dtype_name])}* {n}" for n in outputs]
    consts = []
    for name, v in template:
        consts.append(f"  using {name} = {cu[dtype_name]};" if name == "T" else f"  constexpr int {name} = {v};")
    return (
        f"{MLX_CUDA_STUB}{header}\nnamespace mlx::core::cu {{\nnamespace cg = cooperative_groups;\n"
        f"__global__ void custom_kernel_{kernel}_{dtype_name}(\n    " + ",\n    ".join(params) + ") {\n"
        + "\n".join(consts) + "\n" + body + "\n}\n}\n"
    )


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_twin_compiles_with_nvcc(tmp_path):
    units = []
    for fmt in kernels.FORMATS:
        # decode (slab path) fp16 / bf16, GEMM, GEMV, float32 GEMV
        for M, dt in ((4608, mx.float16), (1536, mx.bfloat16), (512, mx.bfloat16), (1, mx.float16), (16, mx.float32)):
            L = kernels.plan(fmt, M, 3072, 3072, dt, "cuda")
            dname = str(dt).replace("mlx.core.", "")
            src = _cuda_translation_unit(L.kernel, dname, L.template)
            src = src.replace(f"custom_kernel_{L.kernel}_{dname}", f"custom_kernel_{L.kernel}_{dname}_{M}")
            units.append(src)
        assert {kernels.plan(fmt, M, 3072, 3072, mx.float16, "cuda").kernel for M in (4608, 512, 1, 16)} == {
            f"{fmt}_decode", f"{fmt}_gemm", f"{fmt}_gemv"}
    for dt, squared in ((mx.float16, False), (mx.bfloat16, True)):  # the VAE's column moments
        L = kernels.moments_plan(1, 1 << 20, 128, dt, squared)
        dname = str(dt).replace("mlx.core.", "")
        units.append(_cuda_translation_unit(L.kernel, dname, L.template).replace(
            f"custom_kernel_{L.kernel}_{dname}", f"custom_kernel_{L.kernel}_{dname}_{int(squared)}"))
    for dt in (mx.float16, mx.bfloat16):  # a strip's moments in one launch
        L = kernels.block_moments_plan(1, 32 * 1024, 128, dt)
        units.append(_cuda_translation_unit(L.kernel, str(dt).replace("mlx.core.", ""), L.template))
    # Headers repeat across units: compile them one file each, in one nvcc call per file.
    for i, src in enumerate(units):
        (tmp_path / f"k{i}.cu").write_text(src)
    files = [str(tmp_path / f"k{i}.cu") for i in range(len(units))]
    r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "--ptx", "-odir", str(tmp_path), *files],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


# ----------------------------------------------------------------------------- column moments

# (B, rows R, channels C, dtype, threads the plan aims at): one row block; ragged blocks (R not
# a multiple of their count); C under, at and past a threadgroup (past: threads beyond C return);
# more blocks than rows would fill (the plan caps them at R).
MOMENTS_CASES = [
    (1, 1, 32, "float16", 64),
    (2, 1000, 96, "bfloat16", 4096),
    (1, 4097, 160, "float16", 2048),
    (1, 5000, 32, "float16", 64),  # 2,500 rows a thread, more than a 1024 px decode's 2,048
    (3, 20, 128, "bfloat16", None),
]


@pytest.mark.parametrize("B,R,C,dtype,threads", MOMENTS_CASES)
def test_column_moments_kernel_accumulates_in_float32(B, R, C, dtype, threads):
    """Sums, and sums of squared deviations from a given mean, over the rows of 16-bit x with
    channel means far apart and far from zero (a float16 running sum would lose them): equal
    to float64 sums of the values the kernel reads within 1e-5 (a thread sums its block's rows
    in float32, 64 at a time)."""
    rng = np.random.default_rng(B * 1000 + R + C)
    x = rng.standard_normal((B, R, C)) * 3 + rng.uniform(-200, 200, (B, 1, C))
    xm = mx.array(x.astype(np.float32)).astype(DTYPES[dtype])
    xs = np.array(xm.astype(mx.float32)).astype(np.float64)
    launch = kernels.moments_plan(B, R, C, xm.dtype, False, threads or kernels.MOMENTS_THREADS)
    assert launch.grid[0] % launch.threadgroup[0] == 0 and launch.grid[0] >= C and 1 <= launch.grid[1] <= R
    np.testing.assert_allclose(run_moments(xm, threads=threads), xs.sum(axis=1), rtol=1e-5, atol=1e-3)
    mean = xs.mean(axis=1).astype(np.float32)
    want = ((xs - mean[:, None].astype(np.float64)) ** 2).sum(axis=1)
    np.testing.assert_allclose(run_moments(xm, mx.array(mean), threads), want, rtol=1e-5)


@pytest.mark.parametrize("B,R,C,dtype,values", [(1, 4096, 128, "float16", 1024), (2, 301, 96, "bfloat16", 512),
                                                 (1, 5, 32, "float16", 128), (1, 7, 160, "float16", 0),
                                                 (1, 1000, 40, "float16", 256)])
def test_block_moments_kernel_gives_each_blocks_sum_and_deviations(B, R, C, dtype, values):
    """block_moments (Metal source in the CPU harness): each row block's float64 sum within
    1e-5 and its squared deviations around its own mean within 1e-4, channel means far from
    zero and apart (a pass that took E[x^2] - E[x]^2 in float32 would miss by far more);
    blocks past the rows (R = 5 over 4 blocks of 2) hold no rows and write zeros, and so do
    the slices past a block's rows (its 2 rows over 8 slices); C = 40 leaves lanes of its
    second threadgroup past the channels."""
    from kernel_helpers import check_block_moments, far_apart_columns, run_block_moments

    xm = far_apart_columns(B, R, C, getattr(mx, dtype))
    counts, sums, m2s = run_block_moments(xm, values or None)
    check_block_moments(xm, counts, sums, m2s)
    if R == 5 and values == 128:
        assert counts == (2, 2, 1, 0)


def test_block_moments_plan_keeps_a_strips_partial_sums_small():
    """A 1024 px strip (32 rows of 128 channels, or of 256) launches threadgroups of 32
    channels x BLOCK_MOMENTS_SLICES slices of a row block's rows, 1 << 17 threads, and its two
    partial-sum outputs, which wait for the stage's merge, hold 64 KB each: 4 MB for the 32
    strips of a stage."""
    S = kernels.BLOCK_MOMENTS_SLICES
    for C, blocks in ((128, 128), (256, 64)):
        L = kernels.block_moments_plan(1, 32 * 1024, C, mx.float16)
        assert L.kernel == "block_moments" and L.template == (("T", mx.float16), ("S", S))
        assert L.grid == (C, blocks * S, 1) and L.threadgroup == (32, S, 1)
        assert L.grid[0] * L.grid[1] == 1 << 17
        assert blocks * C * 4 == 64 << 10
    assert kernels.block_counts(32 * 1024, 128) == (256,) * 128


def test_column_moments_plan_at_the_vae_shapes():
    """About MOMENTS_THREADS threads: a 1024 px stage of 128 channels in 512 row blocks of
    2,048 pixels, the 128 px mid block's 512 channels in 128 blocks of 128."""
    L = kernels.moments_plan(1, 1 << 20, 128, mx.float16, False)
    assert (L.kernel, L.template, L.grid, L.threadgroup) == (
        "column_moments", (("T", mx.float16), ("SQ", 0)), (128, 512, 1), (128, 1, 1))
    assert kernels.moments_plan(1, 128 * 128, 512, mx.bfloat16, True).grid == (512, 128, 1)
    assert kernels.io_names(kernels.MOMENTS) == (("x", "mean"), ("out",))
    assert kernels.moments_backend(mx.float32) is None  # float32 needs no copy to reduce
