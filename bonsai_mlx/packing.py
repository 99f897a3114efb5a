"""Bit layouts for binary and ternary weights, and conversions into and out of them.

A weight W [N, K] (out, in; y = x @ W.T) is stored as integer codes plus one scale per
group of 128 consecutive weights along K. Three formats (docs/formats.md is the spec
the Metal/CUDA kernels are written against):

  binary   data uint32 [N, K/32]       bit k%32 of word k//32 (LSB first); 1 -> +s, 0 -> -s
  ternary  data uint8  [N, ceil(K/5)]  byte i = sum_j (t[5i+j] + 1) * 3**j, j = 0..4;
                                       trits past K are code 1 (t = 0)
  ternary2 data uint32 [N, K/16]       bits 2*(k%16)..+1 of word k//16 hold t + 1 (3 unused)
  scales   float16 [N, K/128]          W[n, k] = scales[n, k//128] * t[n, k]

Packing, import and post-training quantization are offline work and use numpy; the
runtime path (dequantizing a column range) is MLX so it can run on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import BonsaiError, WeightsError

GROUP_SIZE = 128
FORMATS = ("binary", "ternary", "ternary2")
# Default ternary threshold of Ternary Weight Networks (Li et al. 2016): delta = 0.7 * mean|w|.
TWN_THRESHOLD = 0.7

_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
_SCALE_DTYPES = (mx.float16, mx.bfloat16)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise BonsaiError(f"Unknown packed format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _check_k(k: int, what: str = "weight") -> None:
    if k <= 0 or k % GROUP_SIZE:
        raise BonsaiError(
            f"{what} has K = {k} input features; packed formats need K to be a positive "
            f"multiple of the group size {GROUP_SIZE}"
        )


def data_shape(fmt: str, shape: tuple[int, int]) -> tuple[tuple[int, int], mx.Dtype]:
    """Shape and dtype of the packed `data` array for a logical weight shape (N, K)."""
    _check_format(fmt)
    n, k = shape
    if fmt == "binary":
        return (n, k // 32), mx.uint32
    if fmt == "ternary":
        return (n, -(-k // 5)), mx.uint8
    return (n, k // 16), mx.uint32


@dataclass
class PackedWeight:
    """A binary or ternary weight: `fmt` codes in `data` and one scale per 128 along K.

    `scales` are float16 (the format). bfloat16 is accepted only so that an official pack
    whose bf16 scales are not exactly representable in fp16 can still be held losslessly
    (see `from_mlx_affine(scale_dtype=None)`); kernels may refuse it.
    """

    fmt: str
    data: mx.array
    scales: mx.array
    shape: tuple[int, int]  # (N, K) = (out, in)

    def __post_init__(self):
        _check_format(self.fmt)
        if len(self.shape) != 2:
            raise BonsaiError(f"PackedWeight shape must be (N, K), got {self.shape!r}")
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        n, k = self.shape
        if n <= 0:
            raise BonsaiError(f"PackedWeight needs N > 0 output features, got shape {self.shape}")
        _check_k(k, "PackedWeight")
        want_shape, want_dtype = data_shape(self.fmt, self.shape)
        if tuple(self.data.shape) != want_shape or self.data.dtype != want_dtype:
            raise BonsaiError(
                f"{self.fmt} data for weight shape {self.shape} must be {want_dtype} "
                f"{list(want_shape)}, got {self.data.dtype} {list(self.data.shape)}"
            )
        want_scales = (n, k // GROUP_SIZE)
        if tuple(self.scales.shape) != want_scales or self.scales.dtype not in _SCALE_DTYPES:
            raise BonsaiError(
                f"scales for weight shape {self.shape} must be float16 {list(want_scales)}, "
                f"got {self.scales.dtype} {list(self.scales.shape)}"
            )

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per logical weight, scales included."""
        n, k = self.shape
        return 8 * self.nbytes / (n * k)


# ---------------------------------------------------------------------------- packing (numpy)

def _as_numpy(a, what: str) -> np.ndarray:
    if isinstance(a, mx.array):
        # numpy has no bfloat16; float32 holds every bf16/fp16 value exactly.
        if a.dtype == mx.bfloat16:
            a = a.astype(mx.float32)
        return np.array(a)
    try:
        return np.asarray(a)
    except Exception as e:  # pragma: no cover - odd inputs
        raise BonsaiError(f"{what} must be an array, got {type(a).__name__}") from e


def _scales_fp16(scales, n: int, k: int) -> mx.array:
    s = _as_numpy(scales, "scales")
    want = (n, k // GROUP_SIZE)
    if s.shape != want:
        raise BonsaiError(f"scales for a weight of shape ({n}, {k}) must have shape {list(want)}, got {list(s.shape)}")
    if not np.issubdtype(s.dtype, np.floating):
        raise BonsaiError(f"scales must be floating point, got {s.dtype}")
    if not np.all(np.isfinite(s)):
        raise BonsaiError("scales contain inf or nan")
    # values within half an ulp of 65504 still round down to it
    if np.abs(s.astype(np.float64)).max(initial=0) >= 65520:
        raise BonsaiError(f"scales overflow float16 (largest |scale| = {np.abs(s).max():g}; float16 max is 65504)")
    return mx.array(s.astype(np.float16))


def _weight_2d(w, what: str) -> np.ndarray:
    a = _as_numpy(w, what)
    if a.ndim != 2:
        raise BonsaiError(f"{what} must be 2-D [N, K], got shape {list(a.shape)}")
    _check_k(a.shape[1], what)
    return a


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    """bool [N, K] -> uint32 [N, K/32]; element k is bit k%32 of word k//32."""
    # packbits(little) puts element j at bit j%8 of byte j//8; little-endian words of
    # those bytes then hold element k at bit k%32.
    b = np.packbits(bits, axis=-1, bitorder="little")
    return np.ascontiguousarray(b).view("<u4").astype(np.uint32)


def pack_binary(signs_or_w, scales) -> PackedWeight:
    """Pack signs [N, K] with scales [N, K/128] into the `binary` format.

    `signs_or_w`: bool (True = +1), integers in {-1, +1}, or floats (bit = w >= 0, so a
    zero weight packs as +1). Integer 0/1 arrays are rejected on purpose: 0 is not a sign.
    """
    a = _weight_2d(signs_or_w, "signs")
    n, k = a.shape
    if a.dtype == np.bool_:
        bits = a
    elif np.issubdtype(a.dtype, np.integer):
        if not np.all((a == 1) | (a == -1)):
            raise BonsaiError("integer signs must be -1 or +1 (pass a bool array for 0/1 bits)")
        bits = a > 0
    elif np.issubdtype(a.dtype, np.floating):
        if np.isnan(a).any():
            raise BonsaiError("weights contain nan")
        bits = a >= 0
    else:
        raise BonsaiError(f"signs must be bool, integer or float, got {a.dtype}")
    return PackedWeight("binary", mx.array(_pack_bits(bits)), _scales_fp16(scales, n, k), (n, k))


def _pack_trits(t: np.ndarray, fmt: str) -> np.ndarray:
    n, k = t.shape
    codes = (t + 1).astype(np.uint8)
    if fmt == "ternary":
        pad = -k % 5
        if pad:
            codes = np.concatenate([codes, np.ones((n, pad), np.uint8)], axis=1)
        # max code is 2*(1+3+9+27+81) = 242, so the sum fits in uint8 without wrapping
        return (codes.reshape(n, -1, 5) * _POW3).sum(axis=-1, dtype=np.uint8)
    shifts = (2 * np.arange(16, dtype=np.uint32))
    return (codes.reshape(n, -1, 16).astype(np.uint32) << shifts).sum(axis=-1, dtype=np.uint32)


def pack_ternary(t, scales, fmt: str = "ternary") -> PackedWeight:
    """Pack trits t [N, K] in {-1, 0, +1} with scales [N, K/128] into `ternary` or `ternary2`."""
    if fmt not in ("ternary", "ternary2"):
        raise BonsaiError(f"pack_ternary packs 'ternary' or 'ternary2', got {fmt!r}")
    a = _weight_2d(t, "trits")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise BonsaiError(f"trits must be numbers in {{-1, 0, 1}}, got dtype {a.dtype}")
    if not np.all((a == -1) | (a == 0) | (a == 1)):
        raise BonsaiError("trits must be -1, 0 or +1")
    n, k = a.shape
    data = _pack_trits(a.astype(np.int8), fmt)
    return PackedWeight(fmt, mx.array(data), _scales_fp16(scales, n, k), (n, k))


# ------------------------------------------------------------------------- unpacking (numpy)

def unpack_binary(pw: PackedWeight) -> tuple[np.ndarray, np.ndarray]:
    """-> (signs int8 [N, K] in {-1, +1}, scales float16 [N, K/128]), in numpy."""
    if pw.fmt != "binary":
        raise BonsaiError(f"unpack_binary needs a binary weight, got {pw.fmt!r}")
    words = np.array(pw.data).astype("<u4")
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    return bits.astype(np.int8) * 2 - 1, _as_numpy(pw.scales, "scales").astype(np.float16)


def unpack_ternary(pw: PackedWeight) -> tuple[np.ndarray, np.ndarray]:
    """-> (trits int8 [N, K] in {-1, 0, +1}, scales float16 [N, K/128]), in numpy."""
    n, k = pw.shape
    data = np.array(pw.data)
    if pw.fmt == "ternary":
        codes = (data[..., None] // _POW3) % 3
    elif pw.fmt == "ternary2":
        codes = (data[..., None] >> (2 * np.arange(16, dtype=np.uint32))) & 3
        if (codes == 3).any():
            raise WeightsError("ternary2 data contains the unused code 3")
    else:
        raise BonsaiError(f"unpack_ternary needs a ternary weight, got {pw.fmt!r}")
    t = codes.reshape(n, -1)[:, :k].astype(np.int8) - 1
    return t, _as_numpy(pw.scales, "scales").astype(np.float16)


# --------------------------------------------------------------------- runtime dequant (MLX)

def values_mx(pw: PackedWeight, k0: int, k1: int, dtype=mx.float32) -> mx.array:
    """Unscaled values (+-1 or -1/0/+1) of columns [k0, k1) as `dtype` [N, k1 - k0].

    k0 and k1 must be multiples of 32 (binary) / 16 (ternary2); any k0 works for ternary.
    """
    data = pw.data
    if pw.fmt == "binary":
        w = data[:, k0 // 32 : k1 // 32, None] >> mx.arange(32, dtype=mx.uint32)
        v = (w & 1).astype(dtype) * 2 - 1
    elif pw.fmt == "ternary2":
        w = data[:, k0 // 16 : k1 // 16, None] >> (2 * mx.arange(16, dtype=mx.uint32))
        v = (w & 3).astype(dtype) - 1
    else:
        b0, b1 = k0 // 5, -(-k1 // 5)
        pow3 = mx.array(_POW3.astype(np.uint8))
        codes = (data[:, b0:b1, None] // pow3) % 3
        v = codes.reshape(data.shape[0], -1)[:, k0 - 5 * b0 : k1 - 5 * b0].astype(dtype) - 1
        return v
    return v.reshape(data.shape[0], k1 - k0)


def dequantize_columns(pw: PackedWeight, k0: int, k1: int, dtype=mx.float32) -> mx.array:
    """Dense W[:, k0:k1] as `dtype`; k0 and k1 must be multiples of 128."""
    n = pw.shape[0]
    g0, g1 = k0 // GROUP_SIZE, k1 // GROUP_SIZE
    v = values_mx(pw, k0, k1, dtype).reshape(n, g1 - g0, GROUP_SIZE)
    w = v * pw.scales[:, g0:g1, None].astype(dtype)
    # s * 0 is -0 for a negative s; MLX's affine dequantize gives +0 there, and the
    # official-pack import promises bit-exact equality, so fold -0 into +0.
    return (w + 0).reshape(n, k1 - k0)


def dequantize(pw: PackedWeight, dtype=mx.float16) -> mx.array:
    """Dense W [N, K] = scales * values, rounded once to `dtype` (exact for float16/float32)."""
    return dequantize_columns(pw, 0, pw.shape[1], dtype)


# ------------------------------------------------------------------------------- importers

def _fmt_dtype(d) -> str:
    return str(d).replace("mlx.core.", "")


def _scale_dtype_checked(s: mx.array, scale_dtype, what: str):
    if scale_dtype is None:
        if s.dtype not in _SCALE_DTYPES:
            raise WeightsError(f"{what} scales are {_fmt_dtype(s.dtype)}; only float16/bfloat16 can be kept as is")
    elif scale_dtype != mx.float16:
        raise BonsaiError(f"scale_dtype must be mx.float16 or None (keep the pack's dtype), got {scale_dtype}")


def _inexact_scales(s: mx.array, scale_dtype) -> mx.array:
    """How many of `s` float16 does not hold exactly (lazy; 0 when they are kept as they are).
    A float16 cast keeps the sign, so equal values are equal bit for bit, -0 included."""
    if scale_dtype is None or s.dtype == mx.float16:
        return mx.array(0)
    src = s.astype(mx.float32)
    return mx.sum(s.astype(mx.float16).astype(mx.float32) != src)


def _explain_inexact_scales(s: mx.array, scale_dtype, what: str) -> None:
    """Raise, naming one, when float16 does not hold some of the scales `s` exactly."""
    if not int(_inexact_scales(s, scale_dtype)):
        return
    src = np.array(s.astype(mx.float32))
    back = np.array(s.astype(mx.float16).astype(mx.float32))
    bad = src != back
    i = np.argwhere(bad)[0]
    raise WeightsError(
        f"{what}: {int(bad.sum())} of {bad.size} {_fmt_dtype(s.dtype)} scales are not exactly "
        f"representable in float16 (e.g. scales[{i[0]}, {i[1]}] = {src[tuple(i)]!r} -> "
        f"{back[tuple(i)]!r}); pass scale_dtype=None to keep them as {_fmt_dtype(s.dtype)}"
    )


def _check_affine_shapes(weight, scales, biases, bits: int, group_size: int, fmt: str | None, name: str) -> str:
    """The checks that need no tensor data; returns the target format."""
    if bits not in (1, 2):
        raise WeightsError(f"{name}: Bonsai packs use bits=1 (binary) or bits=2 (ternary), config says bits={bits}")
    if group_size != GROUP_SIZE:
        raise WeightsError(f"{name}: Bonsai packs use group_size={GROUP_SIZE}, config says group_size={group_size}")
    want_fmt = "binary" if bits == 1 else "ternary"
    fmt = fmt or want_fmt
    if (bits == 1) != (fmt == "binary"):
        raise BonsaiError(f"{name}: a bits={bits} pack converts to {want_fmt!r}, not {fmt!r}")
    _check_format(fmt)
    if weight.dtype != mx.uint32 or weight.ndim != 2:
        raise WeightsError(f"{name}: packed weight must be uint32 [N, K*bits/32], got {_fmt_dtype(weight.dtype)} {list(weight.shape)}")
    if scales.ndim != 2 or biases.ndim != 2 or scales.shape != biases.shape:
        raise WeightsError(
            f"{name}: scales and biases must both be [N, K/{group_size}], got {list(scales.shape)} and {list(biases.shape)}"
        )
    if not all(mx.issubdtype(a.dtype, mx.floating) for a in (scales, biases)):
        raise WeightsError(f"{name}: scales/biases must be floating point, got {_fmt_dtype(scales.dtype)}/{_fmt_dtype(biases.dtype)}")
    n, k = scales.shape[0], scales.shape[1] * group_size
    if weight.shape[0] != n or weight.shape[1] * 32 != k * bits:
        hint = ""
        other = 3 - bits
        if weight.shape[0] == n and weight.shape[1] * 32 == k * other:
            hint = f"; the tensors look like a bits={other} pack: does quantization_config.json match the file?"
        raise WeightsError(
            f"{name}: with bits={bits}, group_size={group_size} and scales {list(scales.shape)} the packed "
            f"weight must be uint32 [{n}, {k * bits // 32}], got {list(weight.shape)}{hint}"
        )
    return fmt


def _threes(weight: mx.array) -> mx.array:
    # a 2-bit field is 3 iff both its bits are set: test all 16 fields of a word at once
    # instead of expanding the codes (4 bytes per weight on a 27648 x 3072 layer)
    return weight & (weight >> 1) & 0x55555555


def _explain_affine(weight, scales, biases, bits: int, scale_dtype, name: str) -> None:
    """Raise the WeightsError that says which check a pack fails, and where."""
    s_np = np.array(scales.astype(mx.float32))
    b_np = np.array(biases.astype(mx.float32))
    if not (np.isfinite(s_np).all() and np.isfinite(b_np).all()):
        raise WeightsError(f"{name}: scales or biases contain inf or nan")
    bad = s_np != (-2 * b_np if bits == 1 else -b_np)  # float32 holds -2*b exactly for any fp16/bf16 b
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        what = "binary pack" if bits == 1 else "ternary pack"
        rule = "scales != -2 * biases" if bits == 1 else "biases != -scales"
        raise WeightsError(
            f"{name}: not a {what}: {int(bad.sum())} groups have {rule} "
            f"(e.g. group {i}: scale {s_np[i]!r}, bias {b_np[i]!r})"
        )
    _explain_inexact_scales(-biases if bits == 1 else scales, scale_dtype, name)
    if bits == 2:
        t = np.array(_threes(weight))
        if t.any():
            r, c = np.argwhere(t)[0]
            v = int(t[r, c])
            count = int(np.unpackbits(t.view(np.uint8)).sum())
            raise WeightsError(
                f"{name}: not a ternary pack: {count} weights use code 3 (first at row {r}, column "
                f"{16 * c + ((v & -v).bit_length() - 1) // 2}); ternary uses codes 0, 1, 2 only"
            )


def _base3(weight: mx.array, n: int, k: int) -> mx.array:
    """2-bit codes (MLX bits=2 words) -> the ternary format's 5 trits per byte, in MLX ops so
    that on a GPU the load-time repack of a 4B transformer (1.2 G weights) runs there (in
    numpy it took ~20 s of a cold start on the H200 machine's CPU). Lazy: 2048-row parts,
    so a large layer's uint8 codes exist a part at a time."""
    shifts = 2 * mx.arange(16, dtype=mx.uint32)
    pad = -k % 5
    parts = []
    for r0 in range(0, n, 2048):
        rows = weight[r0:r0 + 2048]
        codes = ((rows[:, :, None] >> shifts) & 3).astype(mx.uint8).reshape(rows.shape[0], k)
        if pad:
            codes = mx.concatenate([codes, mx.ones((rows.shape[0], pad), mx.uint8)], axis=1)
        c = codes.reshape(rows.shape[0], -1, 5)
        acc = c[..., 4]
        for j in (3, 2, 1, 0):  # c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4 <= 242 (Horner, in uint8)
            acc = acc * 3 + c[..., j]
        parts.append(acc)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def mlx_affine_lazy(
    weight: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    bits: int,
    group_size: int = GROUP_SIZE,
    fmt: str | None = None,
    scale_dtype=mx.float16,
    name: str = "weight",
) -> tuple[PackedWeight, mx.array]:
    """`from_mlx_affine` without reading any data: (the converted weight, a lazy count of the
    pack's faults). Evaluate both together; a nonzero count means `affine_faults` raises.
    A loader converts every layer this way and waits once per layer, instead of once
    per check (each a device sync that waits for that tensor's read)."""
    fmt = _check_affine_shapes(weight, scales, biases, bits, group_size, fmt, name)
    _scale_dtype_checked(-biases if bits == 1 else scales, scale_dtype, name)
    n, k = scales.shape[0], scales.shape[1] * group_size
    s32, b32 = scales.astype(mx.float32), biases.astype(mx.float32)
    faults = (mx.sum(~(mx.isfinite(s32) & mx.isfinite(b32)))
              + mx.sum(s32 != (-2 * b32 if bits == 1 else -b32)))
    s = -biases if bits == 1 else scales
    faults = faults + _inexact_scales(s, scale_dtype)
    s = s if scale_dtype is None else s.astype(mx.float16)
    if bits == 1:
        return PackedWeight("binary", weight, s, (n, k)), faults
    faults = faults + mx.sum(_threes(weight) != 0)
    data = weight if fmt == "ternary2" else _base3(weight, n, k)
    return PackedWeight(fmt, data, s, (n, k)), faults


def affine_faults(faults: mx.array, weight, scales, biases, *, bits: int, scale_dtype=mx.float16,
                  name: str = "weight") -> None:
    """Raise the error that `mlx_affine_lazy`'s evaluated fault count stands for, if any."""
    if int(faults):
        _explain_affine(weight, scales, biases, bits, scale_dtype, name)
        raise WeightsError(f"{name}: the pack fails a check that could not be located")  # defensive


def from_mlx_affine(
    weight: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    bits: int,
    group_size: int = GROUP_SIZE,
    fmt: str | None = None,
    scale_dtype=mx.float16,
    name: str = "weight",
) -> PackedWeight:
    """Losslessly convert one of PrismML's MLX affine packs (`bits`/`group_size` from the
    pack's quantization_config.json) into a native format.

    bits=1 (binary, scales = 2s, biases = -s) -> "binary" with s = -biases.
    bits=2 (ternary, code = t + 1, scales = s, biases = -s) -> "ternary" (or fmt="ternary2").
    Raises WeightsError if the tensors do not fit the config or are not binary/ternary, so
    that `dequantize(result)` equals `mx.dequantize(weight, scales, biases, ...)` bit for bit.
    """
    pw, faults = mlx_affine_lazy(weight, scales, biases, bits=bits, group_size=group_size, fmt=fmt,
                                 scale_dtype=scale_dtype, name=name)
    mx.eval(pw.data, pw.scales, faults)
    affine_faults(faults, weight, scales, biases, bits=bits, scale_dtype=scale_dtype, name=name)
    return pw


def to_mlx_affine(pw: PackedWeight) -> tuple[mx.array, mx.array, mx.array, int]:
    """-> (weight, scales, biases, bits) for `mx.dequantize`/`mx.quantized_matmul` (group 128).

    Binary maps to bits=1 and ternary to bits=2 with the same words; 2s is exact in fp16
    unless it overflows, which raises.
    """
    s = pw.scales
    if pw.fmt == "binary":
        if not np.isfinite(np.array((2 * s).astype(mx.float32))).all():
            raise BonsaiError("2 * scale overflows; this weight cannot be an MLX bits=1 affine pack")
        return pw.data, 2 * s, -s, 1
    if pw.fmt == "ternary2":
        return pw.data, s, -s, 2
    t, _ = unpack_ternary(pw)
    return mx.array(_pack_trits(t, "ternary2")), s, -s, 2


Q1_0_BLOCK_BYTES = 2 + GROUP_SIZE // 8  # fp16 d, then 128 sign bits


def from_gguf_q1_0(raw, shape: tuple[int, int]) -> PackedWeight:
    """GGUF/ggml `Q1_0` (type 41) tensor data -> binary.

    `raw`: the tensor's bytes (bytes, memoryview or a uint8 array). `shape` = (N, K) in
    numpy order, i.e. GGUF's ne reversed (ne[0] = K is the contiguous dim). Each block of
    128 weights along K is 18 bytes: little-endian fp16 d, then 16 bytes where element j is
    bit j%8 of byte j/8 and 1 means +d.
    """
    n, k = (int(x) for x in shape)
    _check_k(k, "Q1_0 tensor")
    buf = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.reshape(-1)
    if buf.dtype != np.uint8:
        raise WeightsError(f"Q1_0 data must be raw bytes (uint8), got {buf.dtype}")
    groups = k // GROUP_SIZE
    want = n * groups * Q1_0_BLOCK_BYTES
    if buf.size != want:
        raise WeightsError(
            f"Q1_0 tensor of shape ({n}, {k}) needs {n * groups} blocks x {Q1_0_BLOCK_BYTES} bytes = "
            f"{want} bytes, got {buf.size}"
        )
    blocks = buf.reshape(n, groups, Q1_0_BLOCK_BYTES)
    d = np.ascontiguousarray(blocks[..., :2]).view("<f2").reshape(n, groups)
    if not np.isfinite(d).all():
        raise WeightsError("Q1_0 tensor has inf or nan scales")
    # same little-endian bit order as ours, so the sign bytes are the words
    words = np.ascontiguousarray(blocks[..., 2:]).reshape(n, k // 8).view("<u4")
    return PackedWeight("binary", mx.array(words.astype(np.uint32)), mx.array(d.astype(np.float16)), (n, k))


def to_gguf_q1_0(pw: PackedWeight) -> bytes:
    """binary -> GGUF `Q1_0` tensor bytes (the inverse of `from_gguf_q1_0`)."""
    if pw.fmt != "binary":
        raise BonsaiError(f"Q1_0 holds binary weights only, got {pw.fmt!r}")
    if pw.scales.dtype != mx.float16:
        raise BonsaiError("Q1_0 stores float16 scales; this weight has bfloat16 scales")
    n, k = pw.shape
    groups = k // GROUP_SIZE
    d = np.array(pw.scales).astype("<f2").view(np.uint8).reshape(n, groups, 2)
    signs = np.array(pw.data).astype("<u4").view(np.uint8).reshape(n, groups, 16)
    return np.concatenate([d, signs], axis=-1).tobytes()


# ------------------------------------------------------------- post-training quantization

def _ptq_input(w) -> np.ndarray:
    a = _weight_2d(w, "weight").astype(np.float64)
    if not np.isfinite(a).all():
        raise BonsaiError("weight contains inf or nan")
    return a


def quantize_binary(w) -> PackedWeight:
    """Binary PTQ of W [N, K]: b = +1 where w >= 0 (zeros go to +1), s = mean|w| per group.

    For fixed signs b = sign(w), s = <w, b> / 128 = mean|w| minimises ||w - s b||^2.
    The mean is taken in float64 and rounded once to float16.
    """
    a = _ptq_input(w)
    n, k = a.shape
    s = np.abs(a).reshape(n, -1, GROUP_SIZE).mean(axis=-1)
    return pack_binary(a >= 0, s)


def quantize_ternary(w, fmt: str = "ternary", threshold: float = TWN_THRESHOLD) -> PackedWeight:
    """Ternary PTQ of W [N, K] (TWN): per group of 128, delta = threshold * mean|w|,
    t = sign(w) where |w| > delta (strictly) else 0, s = mean of |w| over t != 0
    (0 when the group is all zero).

    For fixed t, s = <w, t> / <t, t> is exactly that mean, the L2-optimal scale.
    """
    a = _ptq_input(w)
    n, k = a.shape
    g = a.reshape(n, -1, GROUP_SIZE)
    mag = np.abs(g)
    delta = threshold * mag.mean(axis=-1, keepdims=True)
    keep = mag > delta
    t = np.where(keep, np.sign(g), 0).astype(np.int8)
    count = keep.sum(axis=-1)
    s = np.where(count > 0, (mag * keep).sum(axis=-1) / np.maximum(count, 1), 0.0)
    return pack_ternary(t.reshape(n, k), s, fmt)


def quantize(w, fmt: str) -> PackedWeight:
    """Post-training quantize W [N, K] into `fmt` (see quantize_binary / quantize_ternary)."""
    _check_format(fmt)
    return quantize_binary(w) if fmt == "binary" else quantize_ternary(w, fmt)
