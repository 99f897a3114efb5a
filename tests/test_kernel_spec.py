"""The exported kernel description against the Python launcher, and the kernels run from the
exported files alone through the CPU Metal harness."""

import json

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx import kernel_spec, kernels
from bonsai_mlx.errors import BonsaiError
from kernel_helpers import dense, exported_moments, random_weight, rel_err, to_numpy
from metal_harness import harness

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def spec_launch(spec, fmt, M, N, K, dtype):
    """(kernel key, template, grid, threadgroup, slab rows) read from the spec alone."""
    d = spec["dispatch"]
    if dtype in ("float16", "bfloat16") and M >= d["slab_min_m"][fmt]:
        names = kernel_spec.evaluate_lets(d["slab"]["let"], {"M": M, "N": N, "K": K})
        path, extra = "decode", {"rows": names["rows"]}
    elif M >= 32:
        path, extra = "gemm", {}
    elif dtype == "float32":
        path, extra = "gemv_fp32", {}
    else:
        path, extra = "gemv", {}
    e = spec["kernels"][f"{fmt}_{path}"]
    names = kernel_spec.evaluate_lets(e["let"], {"M": M, "N": N, "K": K, **extra})
    template = tuple((k, DTYPES[dtype] if v == "dtype" else kernel_spec.evaluate(v, names)) for k, v in e["template"])
    grid = tuple(kernel_spec.evaluate(g, names) for g in e["grid"])
    return f"{fmt}_{path}", template, grid, tuple(e["threadgroup"]), extra.get("rows", 0)


def test_spec_equals_the_launcher_for_many_shapes():
    _, spec = kernel_spec.metal_kernels()
    rng = np.random.default_rng(0)
    shapes = [(3072, 3072), (18432, 3072), (3072, 9216), (27648, 3072), (3072, 12288), (100, 128), (7, 640),
              (5462, 3072), (5463, 3072)]
    checked = 0
    for fmt in kernels.FORMATS:
        for N, K in shapes:
            for M in [1, 3, 8, 9, 16, 31, 32, 33, 1023, 1024, 1535, 1536, 4608] + list(rng.integers(1, 6000, 5)):
                for dtype in DTYPES:
                    want = kernels.plan(fmt, int(M), N, K, DTYPES[dtype], "metal")
                    key, template, grid, tg, rows = spec_launch(spec, fmt, int(M), N, K, dtype)
                    assert spec["kernels"][key]["name"] == f"bonsai_{want.kernel}"
                    assert (template, grid, tg, rows) == (want.template, want.grid, want.threadgroup, want.slab_rows)
                    if rows:  # the last, shorter slab has its own decode launch
                        last = N - (len(kernels.slab_ranges(N, rows)) - 1) * rows
                        e = spec["kernels"][key]
                        g = tuple(kernel_spec.evaluate(x, {"rows": last, "K": K}) for x in e["grid"])
                        assert g == kernels.decode_plan(fmt, last, K, DTYPES[dtype], "metal").grid
                    checked += 1
    assert checked == 2 * 9 * 18 * 3


def test_formula_language_refuses_everything_else():
    assert kernel_spec.evaluate("ceil_div(N, 8) * 32 if N >= 8 else 1", {"N": 9}) == 64
    for bad in ("__import__('os')", "N ** 2", "open('x')", "N.bit_length()", "[N]"):
        with pytest.raises(BonsaiError, match="formula"):
            kernel_spec.evaluate(bad, {"N": 3})


CASES = [("binary", 5, 72, 384, "float16"), ("binary", 40, 72, 640, "bfloat16"), ("binary", 3, 40, 256, "float32"),
         ("ternary", 7, 72, 640, "bfloat16"), ("ternary", 33, 40, 384, "float16"), ("ternary", 2, 24, 128, "float32")]


@pytest.mark.parametrize("fmt,M,N,K,dtype", CASES)
def test_exported_kernels_run_from_their_files(tmp_path, fmt, M, N, K, dtype):
    """Reads only what an app reads: kernels.json and the source files; runs the launch the
    spec describes on the CPU harness; compares with the dense weights."""
    kernel_spec.write_kernels(tmp_path)
    spec = json.loads((tmp_path / "kernels.json").read_text())
    rng = np.random.default_rng(M * N + K)
    t, s, pw = random_weight(rng, fmt, N, K)
    x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(DTYPES[dtype])
    key, template, grid, tg, _ = spec_launch(spec, fmt, M, N, K, dtype)
    e = spec["kernels"][key]
    header = (tmp_path / e["header"]).read_text() if e["header"] else ""
    (y,) = harness.run(e["name"], e["inputs"], e["outputs"], (tmp_path / e["source"]).read_text(), header,
                       [x, pw.data, pw.scales], [(M, N)], [DTYPES[dtype]], grid, tg, template)
    assert harness.unwritten(y) == 0
    y = y.view(np.uint16).astype(np.uint32) << 16 if dtype == "bfloat16" else y
    y = y.view(np.float32) if dtype == "bfloat16" else y.astype(np.float32)
    ref = to_numpy(x).astype(np.float64) @ dense(t, s).T
    assert rel_err(y, ref) < {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}[dtype]


@pytest.mark.parametrize("fmt,dtype", [("binary", "float16"), ("ternary", "bfloat16")])
def test_exported_decode_runs_from_its_files(tmp_path, fmt, dtype):
    kernel_spec.write_kernels(tmp_path)
    spec = json.loads((tmp_path / "kernels.json").read_text())
    rng = np.random.default_rng(7)
    N, K, n0, n1 = 40, 640, 5, 37
    t, s, pw = random_weight(rng, fmt, N, K)
    e = spec["kernels"][f"{fmt}_decode"]
    names = {"rows": n1 - n0, "K": K}
    template = [(k, DTYPES[dtype] if v == "dtype" else v) for k, v in e["template"]]
    (slab,) = harness.run(e["name"], e["inputs"], e["outputs"], (tmp_path / e["source"]).read_text(), "",
                          [pw.data[n0:n1], pw.scales[n0:n1]], [(n1 - n0, K)], [DTYPES[dtype]],
                          [kernel_spec.evaluate(g, names) for g in e["grid"]], e["threadgroup"], template)
    assert harness.unwritten(slab) == 0
    got = mx.array(slab.view(np.uint16)).view(DTYPES[dtype]).astype(mx.float32)
    want = mx.array(dense(t, s)[n0:n1].astype(np.float32)).astype(DTYPES[dtype]).astype(mx.float32)
    np.testing.assert_array_equal(np.array(got), np.array(want))  # decoding is exact


def test_the_moments_spec_equals_the_launcher_and_runs_from_its_files(tmp_path):
    """The column-moments entry: the launch `kernels.moments_plan` makes for many shapes, and the
    kernel run from the exported file alone sums as float64 does."""
    kernel_spec.write_kernels(tmp_path)
    spec = json.loads((tmp_path / "kernels.json").read_text())
    e = spec["kernels"][kernels.MOMENTS]
    for B, R, C in [(1, 1 << 20, 128), (1, 16384, 512), (2, 4097, 96), (3, 5, 160), (1, 1, 32), (2, 262144, 256)]:
        for sq in (0, 1):
            names = kernel_spec.evaluate_lets(e["let"], {"B": B, "R": R, "C": C})
            want = kernels.moments_plan(B, R, C, mx.float16, bool(sq))
            template = tuple((k, mx.float16 if v == "dtype" else sq) for k, v in e["template"])
            assert template == want.template
            assert tuple(kernel_spec.evaluate(g, names) for g in e["grid"]) == want.grid
            assert tuple(kernel_spec.evaluate(t, names) for t in e["threadgroup"]) == want.threadgroup
    rng = np.random.default_rng(2)
    x = mx.array((rng.standard_normal((2, 300, 96)) * 2 + 50).astype(np.float32)).astype(mx.float16)
    np.testing.assert_allclose(exported_moments(tmp_path, x), np.array(x.astype(mx.float32)).sum(axis=1), rtol=1e-5)
