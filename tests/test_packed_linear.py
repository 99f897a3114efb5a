"""The reference packed matmul (the kernels' oracle) and PackedLinear."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from bonsai_mlx import kernels
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.packed_linear import PackedLinear, auto_backend, get_backend, packed_matmul_reference
from bonsai_mlx.packing import dequantize, pack_binary, pack_ternary, quantize, to_mlx_affine

RNG = np.random.default_rng(1)
FORMATS = ["binary", "ternary", "ternary2"]

# ||y - y64|| / ||y64|| against a float64 matmul of the same dequantized W.
# float32 out: the reference accumulates in fp32, error ~ sqrt(K) * 2^-24 << 1e-5 for K <= 1280.
# fp16/bf16 out: dominated by the final rounding, <= 2^-11 / 2^-8 per element.
# MLX's CUDA back-end multiplies float32 matrices in TF32 (10-bit mantissa: a 64x128 binary
# case measured 2.2e-4 on an H200); the CPU and Metal back-ends in full float32.
TF32 = mx.cuda.is_available() and mx.default_device() == mx.gpu
REL_BOUND = {mx.float32: 1e-3 if TF32 else 1e-5, mx.float16: 1e-3, mx.bfloat16: 4e-3}


def random_weight(fmt, n, k):
    s = RNG.uniform(0.005, 0.05, size=(n, k // 128)) * RNG.choice([-1, 1], size=(n, k // 128))
    if fmt == "binary":
        return pack_binary(RNG.choice([-1, 1], size=(n, k)), s)
    return pack_ternary(RNG.integers(-1, 2, size=(n, k)), s, fmt)


def rel_err(y, ref):
    y = np.array(y.astype(mx.float32), dtype=np.float64)
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k", [(64, 128), (96, 640), (200, 1280)])
def test_reference_matches_dense_matmul(fmt, n, k):
    pw = random_weight(fmt, n, k)
    w64 = np.array(dequantize(pw, mx.float32), dtype=np.float64)
    for m in (1, 7, 33):
        x32 = RNG.normal(size=(m, k)).astype(np.float32)
        for dtype, bound in REL_BOUND.items():
            x = mx.array(x32).astype(dtype)
            ref = np.array(x.astype(mx.float32), dtype=np.float64) @ w64.T
            y = packed_matmul_reference(x, pw)
            assert y.dtype == dtype and y.shape == (m, n)
            assert rel_err(y, ref) <= bound, (fmt, m, dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunk_size_and_leading_dims(fmt):
    pw = random_weight(fmt, 48, 1280)
    x = mx.array(RNG.normal(size=(2, 3, 1280)).astype(np.float32))
    ref = np.array(x, dtype=np.float64) @ np.array(dequantize(pw, mx.float32), dtype=np.float64).T
    for chunk in (128, 384, 640, 1280, 4096):
        y = packed_matmul_reference(x, pw, chunk=chunk)
        assert y.shape == (2, 3, 48)
        assert rel_err(y, ref) <= 1e-5, chunk


def test_reference_memory_is_bounded_by_chunk():
    # dense fp32 W would be 1024 * 4096 * 4 = 16 MiB; a 256-column slab is 1 MiB.
    pw = random_weight("binary", 1024, 4096)
    x = mx.array(RNG.normal(size=(4, 4096)).astype(np.float32))
    mx.eval(pw.data, pw.scales, x)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(packed_matmul_reference(x, pw, chunk=256))
    extra = mx.get_peak_memory() - base
    assert extra < 16 * 2**20 / 2, f"peak extra {extra / 2**20:.1f} MiB"


def test_reference_errors():
    pw = random_weight("ternary", 8, 256)
    with pytest.raises(BonsaiError, match="input has 128 features but the packed weight .* expects K = 256"):
        packed_matmul_reference(mx.zeros((2, 128)), pw)
    with pytest.raises(BonsaiError, match="positive multiple of 128"):
        packed_matmul_reference(mx.zeros((2, 256)), pw, chunk=100)
    with pytest.raises(BonsaiError, match="floating point"):
        packed_matmul_reference(mx.zeros((2, 256), mx.int32), pw)


def test_mlx_quantized_matmul_bits1_agrees_with_reference():
    # MLX 0.32.4 runs affine bits=1 on CPU; with scales = 2s, biases = -s it is our binary.
    pw = random_weight("binary", 256, 1024)
    w, scales, biases, bits = to_mlx_affine(pw)
    assert bits == 1
    # Bounds on MLX's side: fp32 1e-5; fp16 1e-2 because MLX's CPU kernel accumulates in the
    # input dtype (measured 4.7e-3 at K = 1024, 8.2e-3 at K = 3072; bf16 reaches 3.8e-2 / 6.5e-2,
    # too loose to be worth asserting). Our reference accumulates in fp32 (REL_BOUND).
    for dtype, bound in ((mx.float32, 1e-5), (mx.float16, 1e-2)):
        x = mx.array(RNG.normal(size=(33, 1024)).astype(np.float32)).astype(dtype)
        theirs = mx.quantized_matmul(x, w, scales.astype(dtype), biases.astype(dtype), transpose=True, group_size=128, bits=1)
        ours = packed_matmul_reference(x, pw)
        ref = np.array(x.astype(mx.float32), dtype=np.float64) @ np.array(dequantize(pw, mx.float32), dtype=np.float64).T
        assert rel_err(ours, ref) <= REL_BOUND[dtype]
        assert rel_err(theirs, ref) <= bound
        assert rel_err(theirs, np.array(ours.astype(mx.float32), dtype=np.float64)) <= bound


def test_mlx_quantized_matmul_bits2_agrees_for_ternary():
    pw = random_weight("ternary", 128, 512)
    w, scales, biases, bits = to_mlx_affine(pw)
    x = mx.array(RNG.normal(size=(7, 512)).astype(np.float32))
    theirs = mx.quantized_matmul(x, w, scales.astype(mx.float32), biases.astype(mx.float32), transpose=True, group_size=128, bits=2)
    assert rel_err(theirs, np.array(packed_matmul_reference(x, pw), dtype=np.float64)) <= 1e-5


# ------------------------------------------------------------------------------ PackedLinear

@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_linear_from_dense_and_call(fmt):
    w = RNG.normal(scale=0.02, size=(64, 256)).astype(np.float32)
    layer = PackedLinear.from_dense(mx.array(w), fmt)
    pw = quantize(w, fmt)
    assert (layer.out_features, layer.in_features, layer.fmt) == (64, 256, fmt)
    np.testing.assert_array_equal(np.array(layer.weight), np.array(pw.data))
    np.testing.assert_array_equal(np.array(layer.scales), np.array(pw.scales))
    assert sorted(layer.parameters()) == ["scales", "weight"]
    assert layer.trainable_parameters() == {}
    x = mx.array(RNG.normal(size=(5, 256)).astype(np.float16))
    y = layer(x)
    assert y.dtype == mx.float16
    np.testing.assert_array_equal(np.array(y), np.array(packed_matmul_reference(x, pw)))
    # PTQ keeps most of the signal: cosine between dense and quantized outputs
    y64 = np.array(x, dtype=np.float64) @ w.T
    cos = (np.array(y, dtype=np.float64) * y64).sum() / np.linalg.norm(y) / np.linalg.norm(y64)
    assert cos > 0.75


def test_packed_linear_from_packed_bias_and_compile():
    pw = random_weight("ternary", 32, 384)
    bias = mx.array(RNG.normal(size=(32,)).astype(np.float32))
    layer = PackedLinear.from_packed(pw, bias=bias)
    x = mx.array(RNG.normal(size=(3, 384)).astype(np.float32))
    expect = packed_matmul_reference(x, pw) + bias
    np.testing.assert_allclose(np.array(layer(x)), np.array(expect), rtol=0, atol=0)
    np.testing.assert_allclose(np.array(mx.compile(layer)(x)), np.array(expect), rtol=1e-6, atol=1e-6)
    with pytest.raises(BonsaiError, match=r"bias must have shape \[32\]"):
        PackedLinear.from_packed(pw, bias=mx.zeros((31,)))


def test_a_layer_follows_its_new_arrays():
    """A packed layer keeps what it derives from its arrays (its PackedWeight, launcher and
    row layers) only while they are the same arrays: a new bias, weight or scales after
    `update` gives new outputs, whole and by rows."""
    pw = random_weight("binary", 32, 256)
    layer = PackedLinear.from_packed(pw, bias=mx.zeros((32,)))
    x = mx.array(RNG.normal(size=(3, 256)).astype(np.float32))
    before = np.array(layer.rows(8, 16)(x))
    other = random_weight("binary", 32, 256)
    for new in ({"bias": mx.full((32,), 100.0)}, {"weight": other.data, "scales": other.scales}):
        layer.update(new)
        whole = np.array(layer(x))
        np.testing.assert_array_equal(np.array(layer.rows(8, 16)(x)), whole[:, 8:16])
        assert not np.array_equal(whole[:, 8:16], before)


def test_packed_linear_validates_like_packed_weight():
    with pytest.raises(BonsaiError, match="multiple of the group size"):
        PackedLinear(mx.zeros((4, 3), mx.uint32), mx.zeros((4, 1), mx.float16), "binary", (4, 96))
    with pytest.raises(BonsaiError, match=r"scales .* must be float16 \[4, 1\]"):
        PackedLinear(mx.zeros((4, 4), mx.uint32), mx.zeros((4, 1), mx.float32), "binary", (4, 128))


def _expected_auto():
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "reference"


def test_auto_picks_the_device_backend():
    # Whatever this machine has: Metal on a Mac, CUDA on NVIDIA, the reference elsewhere.
    want = _expected_auto()
    assert auto_backend() == want
    assert get_backend("auto") is get_backend(want)
    assert get_backend("reference") is packed_matmul_reference
    if want == "metal":
        assert get_backend("auto") is kernels.metal_matmul
    elif want == "cuda":
        assert get_backend("auto") is kernels.cuda_matmul


@pytest.mark.parametrize("gpu", ["metal", "cuda"])
def test_auto_follows_the_available_back_end(monkeypatch, gpu):
    # The choice itself, for each back-end MLX may report (Metal is checked first).
    monkeypatch.setattr(mx.metal, "is_available", lambda: gpu == "metal")
    monkeypatch.setattr(mx.cuda, "is_available", lambda: gpu == "cuda")
    assert auto_backend() == gpu
    assert get_backend("auto") is getattr(kernels, f"{gpu}_matmul")
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    assert auto_backend() == "reference" and get_backend("auto") is packed_matmul_reference


def test_backend_errors(monkeypatch):
    pw = random_weight("binary", 16, 128)
    with pytest.raises(BonsaiError, match="unknown backend 'tpu'"):
        PackedLinear.from_packed(pw, backend="tpu")
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    for gpu in ("metal", "cuda"):
        with pytest.raises(BonsaiError, match=f"backend '{gpu}' is not available"):
            PackedLinear.from_packed(pw, backend=gpu)
    with pytest.raises(BonsaiError, match="Metal or CUDA back-end"):
        kernels.packed_matmul(mx.zeros((1, 128), mx.float16), pw)


def test_packed_linear_calls_the_backend_launcher(monkeypatch):
    # A GPU backend resolves to its kernels launcher; stand one in (and the back-end it needs)
    # and check the layer hands it x and the packed weight, then adds nothing else.
    pw = random_weight("binary", 16, 128)
    x = mx.array(RNG.normal(size=(2, 128)).astype(np.float32))
    calls = []

    def fake(x, got):
        calls.append(got)
        return packed_matmul_reference(x, got) * 2

    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "metal_matmul", fake)
    layer = PackedLinear.from_packed(pw, backend="metal")
    y = layer(x)
    assert len(calls) == 1 and calls[0].fmt == "binary" and calls[0].shape == (16, 128)
    np.testing.assert_array_equal(np.array(y), 2 * np.array(packed_matmul_reference(x, pw)))
    assert PackedLinear.from_packed(pw, backend="reference")(x).shape == (2, 16)
    assert len(calls) == 1
    assert isinstance(layer, nn.Module)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_computes_the_slice_of_the_full_output(fmt):
    pw = random_weight(fmt, 40, 384)
    x = mx.array(RNG.normal(size=(2, 3, 384)).astype(np.float32))
    for bias in (None, mx.array(RNG.normal(size=(40,)).astype(np.float32))):
        layer = PackedLinear.from_packed(pw, bias=bias, backend="reference")
        full = np.array(layer(x))
        for r0, r1 in ((0, 40), (0, 13), (13, 29), (39, 40)):
            part = layer.rows(r0, r1)
            assert (part.out_features, part.in_features, part.fmt, part.backend) == (r1 - r0, 384, fmt, "reference")
            assert ("bias" in part) == (bias is not None)
            y = part(x)
            assert y.shape == (2, 3, r1 - r0)
            np.testing.assert_allclose(np.array(y), full[..., r0:r1], rtol=1e-6, atol=1e-6)


def test_rows_slices_views_and_checks_the_range():
    pw = random_weight("ternary", 24, 256)
    layer = PackedLinear.from_packed(pw, bias=mx.zeros((24,)), backend="reference")
    part = layer.rows(8, 16)
    np.testing.assert_array_equal(np.array(part.weight), np.array(pw.data)[8:16])
    np.testing.assert_array_equal(np.array(part.scales), np.array(pw.scales)[8:16])
    assert part.trainable_parameters() == {}
    for r0, r1 in ((-1, 4), (4, 4), (5, 3), (0, 25)):
        with pytest.raises(BonsaiError, match=r"0 <= r0 < r1 <= 24"):
            layer.rows(r0, r1)


# ---- formats without GPU kernels (ternary2) ---------------------------------------------------

def test_ternary2_on_the_cpu_runs_the_reference_without_a_warning():
    import warnings

    from bonsai_mlx.errors import BackendFallbackWarning
    if auto_backend() != "reference":
        pytest.skip("checks the CPU's choice")
    pw = random_weight("ternary2", 64, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        lin = PackedLinear.from_packed(pw)
    x = mx.array(RNG.standard_normal((3, 256)).astype(np.float32))
    np.testing.assert_array_equal(np.array(lin(x)), np.array(packed_matmul_reference(x, pw)))


@pytest.mark.parametrize("gpu", ["metal", "cuda"])
def test_ternary2_on_a_gpu_falls_back_under_auto_and_is_refused_by_name(monkeypatch, gpu):
    """What a GPU machine decides, with MLX's availability answers faked on this one."""
    from bonsai_mlx.errors import BackendFallbackWarning
    monkeypatch.setattr(mx.metal, "is_available", lambda: gpu == "metal")
    monkeypatch.setattr(mx.cuda, "is_available", lambda: gpu == "cuda")
    assert auto_backend() == gpu
    pw = random_weight("ternary2", 64, 256)
    with pytest.warns(BackendFallbackWarning, match=f"ternary2 weights have no {gpu} kernels: they run on the "
                                                    "reference matmul"):
        lin = PackedLinear.from_packed(pw)
    assert lin.backend == "reference" and get_backend(lin.backend) is packed_matmul_reference
    x = mx.array(RNG.standard_normal((3, 256)).astype(np.float32))
    np.testing.assert_array_equal(np.array(lin(x)), np.array(packed_matmul_reference(x, pw)))
    with pytest.raises(BonsaiError, match=f"the {gpu} backend has no kernels for ternary2 weights"):
        PackedLinear.from_packed(pw, backend=gpu)
    # Formats with kernels keep them.
    binary = PackedLinear.from_packed(random_weight("binary", 64, 256))
    assert binary.backend == "auto" and get_backend(binary.backend) is kernels.launcher(gpu)
