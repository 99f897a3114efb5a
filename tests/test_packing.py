"""Bit layouts, official-pack and GGUF import, and PTQ rules of bonsai_mlx.packing.

The reference packers here are written independently of the module (shift-and-add
loops instead of np.packbits / base-3 dot products) so a layout bug cannot cancel out.
"""

import struct

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx.errors import BonsaiError, WeightsError
from bonsai_mlx.packing import (
    PackedWeight,
    dequantize,
    dequantize_columns,
    from_gguf_q1_0,
    from_mlx_affine,
    pack_binary,
    pack_ternary,
    quantize,
    quantize_binary,
    quantize_ternary,
    to_gguf_q1_0,
    to_mlx_affine,
    unpack_binary,
    unpack_ternary,
    values_mx,
)

RNG = np.random.default_rng(0)


# ----------------------------------------------------------- independent reference layouts

def ref_words(codes, bits_per_code):
    """Pack small unsigned codes [N, K] LSB-first into uint32 words, one element at a time."""
    n, k = codes.shape
    per_word = 32 // bits_per_code
    out = np.zeros((n, k // per_word), np.uint32)
    for r in range(n):
        for c in range(k):
            out[r, c // per_word] |= np.uint32(int(codes[r, c]) << (bits_per_code * (c % per_word)))
    return out


def ref_ternary_bytes(t):
    n, k = t.shape
    out = np.zeros((n, (k + 4) // 5), np.uint8)
    for r in range(n):
        for i in range(out.shape[1]):
            v = 0
            for j in range(5):
                c = 5 * i + j
                v += (int(t[r, c]) + 1 if c < k else 1) * 3**j
            out[r, i] = v
    return out


def rand_signs(n, k):
    return RNG.choice(np.array([-1, 1], np.int8), size=(n, k))


def rand_trits(n, k):
    return RNG.integers(-1, 2, size=(n, k)).astype(np.int8)


def rand_scales(n, k, dtype=np.float16, negative=False):
    s = RNG.uniform(0.001, 0.1, size=(n, k // 128))
    if negative:
        s *= RNG.choice([-1, 1], size=s.shape)
    return s.astype(dtype)


def u16(a: mx.array) -> np.ndarray:
    """Raw bits of a 16-bit MLX array (bf16 has no numpy dtype, so go through a view)."""
    return np.array(a.view(mx.uint16))


# -------------------------------------------------------------------------------- layouts

def test_binary_layout_matches_reference_bit_twiddle():
    signs = rand_signs(3, 256)
    pw = pack_binary(signs, rand_scales(3, 256))
    np.testing.assert_array_equal(np.array(pw.data), ref_words((signs > 0).astype(np.uint8), 1))
    assert pw.data.dtype == mx.uint32 and pw.data.shape == (3, 8)


def test_binary_layout_hand_example():
    signs = -np.ones((1, 128), np.int8)
    signs[0, 0] = signs[0, 33] = signs[0, 127] = 1
    data = np.array(pack_binary(signs, np.ones((1, 1))).data)
    assert data.tolist() == [[1, 2, 0, 1 << 31]]


def test_ternary_layout_matches_reference_and_hand_example():
    t = rand_trits(2, 128)
    t[0, :5] = [1, 0, -1, 1, 0]
    pw = pack_ternary(t, rand_scales(2, 128))
    data = np.array(pw.data)
    assert data.dtype == np.uint8 and data.shape == (2, 26)  # ceil(128 / 5)
    np.testing.assert_array_equal(data, ref_ternary_bytes(t))
    assert data[0, 0] == 2 + 1 * 3 + 0 * 9 + 2 * 27 + 1 * 81
    # bytes 25 holds trits 125..127 plus two padding codes of 1 (t = 0)
    c = t[1, 125:] + 1
    assert data[1, 25] == c[0] + 3 * c[1] + 9 * c[2] + 27 + 81


def test_ternary2_layout_matches_reference():
    t = rand_trits(3, 256)
    pw = pack_ternary(t, rand_scales(3, 256), fmt="ternary2")
    np.testing.assert_array_equal(np.array(pw.data), ref_words((t + 1).astype(np.uint8), 2))
    assert pw.data.dtype == mx.uint32 and pw.data.shape == (3, 16)


@pytest.mark.parametrize("fmt", ["binary", "ternary", "ternary2"])
def test_round_trip_and_dequantize(fmt):
    n, k = 5, 384
    vals = rand_signs(n, k) if fmt == "binary" else rand_trits(n, k)
    s = rand_scales(n, k, negative=True)
    pw = pack_binary(vals, s) if fmt == "binary" else pack_ternary(vals, s, fmt)
    back, s_back = unpack_binary(pw) if fmt == "binary" else unpack_ternary(pw)
    np.testing.assert_array_equal(back, vals)
    np.testing.assert_array_equal(s_back, s)
    dense = vals.astype(np.float32) * np.repeat(s.astype(np.float32), 128, axis=1) + 0  # +0: no -0
    for dtype in (mx.float32, mx.float16):
        w = dequantize(pw, dtype)
        assert w.dtype == dtype and w.shape == (n, k)
        np.testing.assert_array_equal(np.array(w.astype(mx.float32)).view(np.uint32), dense.view(np.uint32))


def test_values_mx_on_unaligned_ternary_columns():
    t = rand_trits(4, 640)
    pw = pack_ternary(t, rand_scales(4, 640))
    for k0, k1 in [(0, 128), (128, 384), (256, 640), (3, 7), (129, 631)]:
        np.testing.assert_array_equal(np.array(values_mx(pw, k0, k1, mx.int32)), t[:, k0:k1])
    w = np.array(dequantize_columns(pw, 128, 384))
    np.testing.assert_array_equal(w, np.array(dequantize(pw, mx.float32))[:, 128:384])


def test_pack_binary_input_kinds():
    w = RNG.normal(size=(2, 128)).astype(np.float32)
    w[0, 0], w[0, 1] = 0.0, -0.0  # both zeros pack as +1
    s = np.ones((2, 1))
    from_float = unpack_binary(pack_binary(w, s))[0]
    assert from_float[0, 0] == 1 and from_float[0, 1] == 1
    np.testing.assert_array_equal(from_float, np.where(w >= 0, 1, -1))
    np.testing.assert_array_equal(unpack_binary(pack_binary(w >= 0, s))[0], from_float)
    np.testing.assert_array_equal(unpack_binary(pack_binary(mx.array(w), s))[0], from_float)
    with pytest.raises(BonsaiError, match="bool"):
        pack_binary((w >= 0).astype(np.int32), s)  # 0/1 ints are ambiguous


def test_bits_per_weight():
    n = 4
    assert pack_binary(rand_signs(n, 3072), rand_scales(n, 3072)).bits_per_weight == 1.125
    assert pack_ternary(rand_trits(n, 3072), rand_scales(n, 3072), "ternary2").bits_per_weight == 2.125
    pw = pack_ternary(rand_trits(n, 640), rand_scales(n, 640))
    assert pw.bits_per_weight == pytest.approx(1.725, abs=1e-12)  # 128 bytes / 640 + 16 / 128
    assert pw.nbytes == n * 128 + n * 5 * 2
    # K = 3072 (klein hidden): 615 bytes per row -> 4920 / 3072 + 0.125
    assert pack_ternary(rand_trits(n, 3072), rand_scales(n, 3072)).bits_per_weight == 4920 / 3072 + 0.125


# --------------------------------------------------------------------------------- errors

def test_k_must_be_multiple_of_128():
    with pytest.raises(BonsaiError, match="multiple of the group size 128"):
        pack_binary(rand_signs(2, 96), np.ones((2, 1)))
    with pytest.raises(BonsaiError, match="multiple of the group size 128"):
        pack_ternary(rand_trits(2, 200), np.ones((2, 1)))
    with pytest.raises(BonsaiError, match="multiple of the group size 128"):
        quantize(np.ones((2, 130), np.float32), "binary")
    with pytest.raises(BonsaiError, match="multiple of the group size 128"):
        PackedWeight("binary", mx.zeros((2, 3), mx.uint32), mx.zeros((2, 1), mx.float16), (2, 96))


def test_packed_weight_validation_messages():
    good_s = mx.zeros((2, 2), mx.float16)
    PackedWeight("binary", mx.zeros((2, 8), mx.uint32), good_s, (2, 256))
    with pytest.raises(BonsaiError, match=r"must be mlx.core.uint32 \[2, 8\], got mlx.core.int32 \[2, 8\]"):
        PackedWeight("binary", mx.zeros((2, 8), mx.int32), good_s, (2, 256))
    with pytest.raises(BonsaiError, match=r"uint8 \[2, 52\]"):
        PackedWeight("ternary", mx.zeros((2, 51), mx.uint8), good_s, (2, 256))
    with pytest.raises(BonsaiError, match=r"scales .* must be float16 \[2, 2\], got mlx.core.float32"):
        PackedWeight("ternary2", mx.zeros((2, 16), mx.uint32), mx.zeros((2, 2), mx.float32), (2, 256))
    with pytest.raises(BonsaiError, match=r"got mlx.core.float16 \[2, 1\]"):
        PackedWeight("binary", mx.zeros((2, 8), mx.uint32), mx.zeros((2, 1), mx.float16), (2, 256))
    with pytest.raises(BonsaiError, match="Unknown packed format"):
        PackedWeight("int4", mx.zeros((2, 8), mx.uint32), good_s, (2, 256))


def test_pack_input_errors():
    with pytest.raises(BonsaiError, match=r"scales .* must have shape \[2, 2\], got \[2, 1\]"):
        pack_binary(rand_signs(2, 256), np.ones((2, 1)))
    with pytest.raises(BonsaiError, match="-1, 0 or"):
        pack_ternary(np.full((1, 128), 2), np.ones((1, 1)))
    with pytest.raises(BonsaiError, match="overflow float16"):
        pack_binary(rand_signs(1, 128), np.full((1, 1), 1e6))
    with pytest.raises(BonsaiError, match="'ternary' or 'ternary2'"):
        pack_ternary(rand_trits(1, 128), np.ones((1, 1)), fmt="binary")


# ------------------------------------------------------------------- official MLX packs

def official_binary_pack(n, k, dtype):
    """PrismML's bits=1 layout built by hand: q = sign bit, scales = 2s, biases = -s."""
    bits = RNG.integers(0, 2, size=(n, k)).astype(np.uint8)
    s = mx.array(rand_scales(n, k, np.float32, negative=True)).astype(dtype)
    return bits, s, mx.array(ref_words(bits, 1)), 2 * s, -s


def official_ternary_pack(n, k, dtype):
    """PrismML's bits=2 layout built by hand: code = t + 1, scales = s, biases = -s."""
    t = rand_trits(n, k)
    s = mx.array(rand_scales(n, k, np.float32, negative=True)).astype(dtype)
    return t, s, mx.array(ref_words((t + 1).astype(np.uint8), 2)), s, -s


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_official_binary_pack_is_bit_exact(dtype):
    bits, s, w, scales, biases = official_binary_pack(6, 384, dtype)
    pw = from_mlx_affine(w, scales, biases, bits=1, group_size=128)
    assert pw.fmt == "binary" and pw.scales.dtype == mx.float16 and pw.shape == (6, 384)
    np.testing.assert_array_equal(unpack_binary(pw)[0], bits.astype(np.int8) * 2 - 1)
    theirs = mx.dequantize(w, scales, biases, group_size=128, bits=1)
    assert theirs.dtype == dtype
    np.testing.assert_array_equal(u16(dequantize(pw, dtype)), u16(theirs))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("fmt", ["ternary", "ternary2"])
def test_official_ternary_pack_is_bit_exact(dtype, fmt):
    t, s, w, scales, biases = official_ternary_pack(6, 384, dtype)
    pw = from_mlx_affine(w, scales, biases, bits=2, fmt=fmt)
    assert pw.fmt == fmt
    np.testing.assert_array_equal(unpack_ternary(pw)[0], t)
    theirs = mx.dequantize(w, scales, biases, group_size=128, bits=2)
    # negative scales make s*0 = -0 in a naive dequant; MLX gives +0 and so must we
    assert (u16(theirs) == 0x8000).sum() == 0 and (t == 0).any()
    np.testing.assert_array_equal(u16(dequantize(pw, dtype)), u16(theirs))


def test_official_pack_round_trips_through_to_mlx_affine():
    _, _, w, scales, biases = official_ternary_pack(3, 256, mx.float16)
    pw = from_mlx_affine(w, scales, biases, bits=2)
    w2, s2, b2, bits = to_mlx_affine(pw)
    assert bits == 2
    np.testing.assert_array_equal(np.array(w2), np.array(w))
    np.testing.assert_array_equal(u16(s2), u16(scales))
    np.testing.assert_array_equal(u16(b2), u16(biases))


def test_bf16_scale_not_representable_in_fp16():
    _, s, w, scales, biases = official_binary_pack(2, 256, mx.bfloat16)
    tiny = mx.array([[-3.0e-7]], mx.bfloat16)  # fp16 subnormal: loses bf16 mantissa bits
    biases[0, 0] = tiny[0, 0]
    scales[0, 0] = (-2 * tiny)[0, 0]
    with pytest.raises(WeightsError, match=r"1 of 4 bfloat16 scales are not exactly representable in float16.*scale_dtype=None"):
        from_mlx_affine(w, scales, biases, bits=1)
    pw = from_mlx_affine(w, scales, biases, bits=1, scale_dtype=None)
    assert pw.scales.dtype == mx.bfloat16
    theirs = mx.dequantize(w, scales, biases, group_size=128, bits=1)
    np.testing.assert_array_equal(u16(dequantize(pw, mx.bfloat16)), u16(theirs))


def test_official_pack_errors():
    _, _, w1, s1, b1 = official_binary_pack(2, 256, mx.bfloat16)
    _, _, w2, s2, b2 = official_ternary_pack(2, 256, mx.bfloat16)
    with pytest.raises(WeightsError, match="look like a bits=1 pack"):
        from_mlx_affine(w1, s1, b1, bits=2)
    with pytest.raises(WeightsError, match="look like a bits=2 pack"):
        from_mlx_affine(w2, s2, b2, bits=1)
    with pytest.raises(WeightsError, match="group_size=128, config says group_size=64"):
        from_mlx_affine(w1, s1, b1, bits=1, group_size=64)
    with pytest.raises(WeightsError, match="bits=4"):
        from_mlx_affine(w1, s1, b1, bits=4)
    with pytest.raises(WeightsError, match="not a binary pack"):
        from_mlx_affine(w1, s1, b1 * 1.5, bits=1)
    with pytest.raises(WeightsError, match="not a ternary pack: 2 groups have biases != -scales"):
        b_bad = mx.array(b2)
        b_bad[0, 1] = 0.5
        b_bad[1, 0] = 0.0
        from_mlx_affine(w2, s2, b_bad, bits=2)
    w3 = np.array(w2)
    w3[1, 2] |= np.uint32(3 << 6)  # code 3 at row 1, column 16*2 + 3
    with pytest.raises(WeightsError, match="1 weights use code 3 .first at row 1, column 35"):
        from_mlx_affine(mx.array(w3), s2, b2, bits=2)
    with pytest.raises(WeightsError, match="scales and biases"):
        from_mlx_affine(w1, s1, b1[:, :1], bits=1)
    with pytest.raises(WeightsError, match="uint32"):
        from_mlx_affine(w1.astype(mx.int32), s1, b1, bits=1)
    with pytest.raises(BonsaiError, match="converts to 'binary'"):
        from_mlx_affine(w1, s1, b1, bits=1, fmt="ternary")


def test_mlx_quantize_bits1_uses_our_binary_bit_order():
    # mx.quantize(bits=1) maps w >= mid to q = 1; its words must equal ours for the same bits.
    w = mx.array(RNG.normal(size=(4, 256)).astype(np.float32))
    q, _, _ = mx.quantize(w, group_size=128, bits=1)
    bits = np.array(mx.dequantize(q, mx.ones((4, 2)), mx.zeros((4, 2)), group_size=128, bits=1)).astype(np.uint8)
    np.testing.assert_array_equal(np.array(q), ref_words(bits, 1))


# -------------------------------------------------------------------------------- GGUF

def q1_0_bytes(d, bits):
    """GGUF Q1_0 blocks built byte by byte: fp16 d, then 16 bytes, element j = bit j%8 of byte j/8."""
    out = bytearray()
    n, g = d.shape
    for r in range(n):
        for b in range(g):
            out += struct.pack("<e", float(d[r, b]))
            sign = bytearray(16)
            for j in range(128):
                if bits[r, 128 * b + j]:
                    sign[j // 8] |= 1 << (j % 8)
            out += sign
    return bytes(out)


def test_gguf_q1_0_import():
    n, k = 3, 384
    bits = RNG.integers(0, 2, size=(n, k))
    d = rand_scales(n, k, negative=True)
    raw = q1_0_bytes(d, bits)
    assert len(raw) == n * 3 * 18
    pw = from_gguf_q1_0(raw, (n, k))
    expect = np.where(bits == 1, 1.0, -1.0) * np.repeat(d.astype(np.float32), 128, axis=1)
    np.testing.assert_array_equal(np.array(dequantize(pw, mx.float32)), expect)
    np.testing.assert_array_equal(np.array(pw.data), ref_words(bits.astype(np.uint8), 1))
    assert to_gguf_q1_0(pw) == raw
    np.testing.assert_array_equal(np.array(from_gguf_q1_0(np.frombuffer(raw, np.uint8), (n, k)).data), np.array(pw.data))


def test_gguf_q1_0_errors():
    raw = q1_0_bytes(np.ones((2, 1), np.float16), np.ones((2, 128), np.uint8))
    with pytest.raises(WeightsError, match="needs 2 blocks x 18 bytes = 36 bytes, got 35"):
        from_gguf_q1_0(raw[:-1], (2, 128))
    with pytest.raises(BonsaiError, match="multiple of the group size"):
        from_gguf_q1_0(raw, (3, 96))
    with pytest.raises(BonsaiError, match="binary weights only"):
        to_gguf_q1_0(pack_ternary(rand_trits(1, 128), np.ones((1, 1))))


# ---------------------------------------------------------------------------------- PTQ

def test_binary_ptq_hand_example():
    j = np.arange(128)
    w = (j % 4 - 1.5).astype(np.float32)  # -1.5, -0.5, 0.5, 1.5: mean |w| = 1
    w2 = w.copy()
    w2[0] = 0.0  # zero goes to +1; mean |w| = 126.5 / 128 = 0.98828125 (exact in fp16)
    pw = quantize_binary(np.stack([w, w2]))
    signs, s = unpack_binary(pw)
    np.testing.assert_array_equal(signs[0], np.where(j % 4 >= 2, 1, -1))
    assert signs[1, 0] == 1 and (signs[1, 1:] == signs[0, 1:]).all()
    assert s.tolist() == [[1.0], [0.98828125]]


def test_ternary_ptq_hand_example():
    g1 = np.r_[np.full(32, 1.0), np.full(32, -1.0), np.full(64, 0.1)]  # mean .55, delta .385
    g2 = np.zeros(128)  # all zero: t = 0, s = 0
    g3 = np.r_[np.full(32, 3.0), np.full(32, 1.0), np.zeros(64)]  # mean 1.0
    w = np.stack([np.r_[g1, g2], np.r_[g3, -g3]])
    t, s = unpack_ternary(quantize_ternary(w))
    np.testing.assert_array_equal(t[0, :128], np.r_[np.ones(32), -np.ones(32), np.zeros(64)])
    assert (t[0, 128:] == 0).all()
    assert s[0].tolist() == [1.0, 0.0]
    # delta = 0.7: both 3.0 and 1.0 are kept, s = (96 + 32) / 64 = 2
    np.testing.assert_array_equal(t[1, :64], np.ones(64))
    assert s[1].tolist() == [2.0, 2.0]
    # threshold 1.0 puts delta exactly on the 1.0 entries: |w| > delta is strict, so they drop
    t, s = unpack_ternary(quantize_ternary(w, threshold=1.0))
    np.testing.assert_array_equal(t[1, :128], np.r_[np.ones(32), np.zeros(96)])
    assert s[1].tolist() == [3.0, 3.0]


def sq_err(w, v, s):
    return ((w - v * s) ** 2).sum(axis=-1)


def test_binary_ptq_scale_is_l2_optimal_for_its_signs():
    w = RNG.normal(scale=0.02, size=(16, 512))
    signs, s = unpack_binary(quantize_binary(w))
    np.testing.assert_array_equal(signs, np.where(w >= 0, 1, -1))
    g = w.reshape(16, 4, 128)
    v = signs.reshape(16, 4, 128)
    s = s.astype(np.float64)[..., None]
    best = (g * v).sum(-1, keepdims=True) / 128  # argmin_s ||g - s v||^2
    np.testing.assert_allclose(s, best, rtol=2**-11)  # only fp16 rounding
    for f in (0.99, 1.01):
        assert (sq_err(g, v, s * f) > sq_err(g, v, s)).all()
    # Gaussian weights: relative L2 error of sign * mean|w| is sqrt(1 - 2/pi) = 0.603
    rel = np.sqrt(sq_err(g, v, s).sum() / (g**2).sum())
    assert 0.58 < rel < 0.63


def test_ternary_ptq_follows_twn_rule_and_scale_is_l2_optimal():
    w = RNG.normal(scale=0.02, size=(16, 512))
    for fmt in ("ternary", "ternary2"):
        t, s = unpack_ternary(quantize_ternary(w, fmt=fmt))
        g = w.reshape(16, 4, 128)
        v = t.reshape(16, 4, 128)
        delta = 0.7 * np.abs(g).mean(-1, keepdims=True)
        np.testing.assert_array_equal(v, np.sign(g) * (np.abs(g) > delta))
        s = s.astype(np.float64)[..., None]
        best = (g * v).sum(-1, keepdims=True) / (v * v).sum(-1, keepdims=True)
        np.testing.assert_allclose(s, best, rtol=2**-11)
        for f in (0.99, 1.01):
            assert (sq_err(g, v, s * f) > sq_err(g, v, s)).all()


def test_ptq_accepts_mlx_dtypes_and_rejects_nan():
    w = RNG.normal(size=(2, 128)).astype(np.float32)
    ref = np.array(quantize(w, "ternary").data)
    np.testing.assert_array_equal(np.array(quantize(mx.array(w), "ternary").data), ref)
    wb = mx.array(w).astype(mx.bfloat16)
    np.testing.assert_array_equal(
        np.array(quantize(wb, "binary").data), np.array(quantize(np.array(wb.astype(mx.float32)), "binary").data)
    )
    w[1, 5] = np.nan
    with pytest.raises(BonsaiError, match="inf or nan"):
        quantize(w, "binary")
    with pytest.raises(BonsaiError, match="Unknown packed format"):
        quantize(w, "int2")


def test_official_ternary_import_of_a_layer_taller_than_one_row_block():
    # the importer repacks 1024 rows at a time; cross a block boundary
    t, s, w, scales, biases = official_ternary_pack(1100, 128, mx.float16)
    pw = from_mlx_affine(w, scales, biases, bits=2)
    np.testing.assert_array_equal(np.array(pw.data), ref_ternary_bytes(t))
