"""Linear layers over packed binary/ternary weights, and the plain-MLX reference matmul.

`packed_matmul_reference` is the oracle that the Metal/CUDA kernels are tested against,
so it favours obviously-right over fast: unpack a slab of columns, scale, matmul in
float32, accumulate. The "metal" and "cuda" backends are the launchers of
bonsai_mlx.kernels, imported when first asked for (`get_backend`): this module never
needs the kernel sources, and kernels never imports it.
"""

from __future__ import annotations

import warnings
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from .errors import BackendFallbackWarning, BonsaiError
from .packing import GROUP_SIZE, PackedWeight, dequantize_columns, quantize

# A launcher computes y = x @ W.T for x [..., K] and returns y [..., N] in x.dtype.
Launcher = Callable[[mx.array, PackedWeight], mx.array]

BACKENDS = ("auto", "reference", "metal", "cuda")

DEFAULT_CHUNK = 512  # columns of K per slab: 4 groups of 128


def packed_matmul_reference(x: mx.array, pw: PackedWeight, chunk: int = DEFAULT_CHUNK) -> mx.array:
    """y [..., N] = x [..., K] @ W.T, never holding more than `chunk` dense columns of W.

    Each slab W[:, k0:k1] is dequantized in float32 (exact: values are +-s or 0) and
    multiplied with x[..., k0:k1] in float32; partial sums accumulate in float32 and the
    result is cast to x.dtype once. Extra memory is about N * chunk * 4 bytes per slab
    (MLX may schedule two slabs at once), not N * K.
    """
    n, k = pw.shape
    if x.shape[-1] != k:
        raise BonsaiError(f"input has {x.shape[-1]} features but the packed weight {pw.shape} expects K = {k}")
    if not mx.issubdtype(x.dtype, mx.floating):
        raise BonsaiError(f"input must be floating point, got {x.dtype}")
    if chunk <= 0 or chunk % GROUP_SIZE:
        raise BonsaiError(f"chunk must be a positive multiple of {GROUP_SIZE}, got {chunk}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(mx.float32)  # [M, K]
    y = None
    for k0 in range(0, k, chunk):
        k1 = min(k0 + chunk, k)
        slab = pw if y is None else _after(pw, y)
        w = dequantize_columns(slab, k0, k1, mx.float32)  # [N, k1 - k0]
        part = x2[:, k0:k1] @ w.T  # [M, N]
        y = part if y is None else y + part
    return y.astype(x.dtype).reshape(*lead, n)


def _after(pw: PackedWeight, y: mx.array) -> PackedWeight:
    # MLX would otherwise unpack every slab up front (they are independent), holding
    # them all at once; making slab i+1 wait for the partial sum bounds the memory.
    data = mx.depends(pw.data, y)
    return PackedWeight(pw.fmt, data, pw.scales, pw.shape)


def auto_backend() -> str:
    """Our Metal kernels on Apple GPUs, their CUDA twins on NVIDIA, plain MLX elsewhere."""
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "reference"


def resolve_backend(backend: str, fmt: str) -> str:
    """The backend a layer of packed format `fmt` runs on when asked for `backend`.

    The GPU kernels cover binary and ternary only. "auto" on a GPU falls back to the
    reference matmul for other formats (ternary2), with a BackendFallbackWarning; asking
    for "metal" or "cuda" by name for them is refused: a run that picked a kernel
    backend explicitly would otherwise get the slow path silently."""
    if backend not in BACKENDS:
        raise BonsaiError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    name = auto_backend() if backend == "auto" else backend
    if name in ("metal", "cuda"):
        from .kernels import FORMATS as KERNEL_FORMATS  # GPU only: reference-only callers never load it

        if fmt not in KERNEL_FORMATS:
            if backend == "auto":
                warnings.warn(BackendFallbackWarning(
                    f"{fmt} weights have no {name} kernels: they run on the reference matmul (slower). "
                    f"Pack as {' or '.join(KERNEL_FORMATS)} to use the kernels."), stacklevel=3)
                return "reference"
            raise BonsaiError(f"the {name} backend has no kernels for {fmt} weights; use backend 'auto' (it runs "
                              f"{fmt} on the reference matmul) or 'reference', or pack as "
                              f"{' or '.join(KERNEL_FORMATS)}")
    return backend


def get_backend(name: str) -> Launcher:
    """The launcher that `PackedLinear(backend=name)` would call; BonsaiError for an unknown
    name or a GPU backend that this MLX lacks."""
    if name not in BACKENDS:
        raise BonsaiError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = auto_backend()
    if name == "reference":
        return packed_matmul_reference
    from . import kernels  # on first use: reference-only callers never load the kernel module

    return kernels.launcher(name)


class _Derived:
    """What a PackedLinear derives from its arrays for every call (its PackedWeight, its
    launcher, the layers of its row ranges), kept while those arrays are the same objects:
    a step in token chunks makes about a thousand packed matmuls, and rebuilding these
    for each was a measurable share of the host's time per step."""

    __slots__ = ("weight", "scales", "bias", "backend", "packed", "launch", "rows")

    def __init__(self, layer: "PackedLinear"):
        self.weight, self.scales, self.bias, self.backend = layer.weight, layer.scales, layer.get("bias"), layer.backend
        self.packed = PackedWeight(layer.fmt, layer.weight, layer.scales, (layer.out_features, layer.in_features))
        self.launch = get_backend(layer.backend)
        self.rows: dict[tuple[int, int], PackedLinear] = {}

    def fits(self, layer: "PackedLinear") -> bool:
        """Whether `layer` still holds the arrays these came from. A new array (update,
        load_weights, set_dtype) is followed; an array edited in place (`w[...] = v`) is not,
        and nothing in this package edits a packed layer's arrays in place."""
        return (self.weight is layer.weight and self.scales is layer.scales and self.bias is layer.get("bias")
                and self.backend == layer.backend)


class PackedLinear(nn.Module):
    """y = x @ W.T (+ bias) with W stored packed: `weight` holds the codes, `scales` the
    per-128 scales, as in `PackedWeight`."""

    def __init__(
        self,
        weight: mx.array,
        scales: mx.array,
        fmt: str,
        shape: tuple[int, int],
        bias: mx.array | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        pw = PackedWeight(fmt, weight, scales, shape)  # validates
        self.weight = pw.data
        self.scales = pw.scales
        self.fmt = fmt
        self.out_features, self.in_features = pw.shape
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise BonsaiError(f"bias must have shape [{self.out_features}], got {list(bias.shape)}")
            self.bias = bias
        backend = resolve_backend(backend, fmt)
        get_backend(backend)  # fail at construction on an unknown or unavailable backend
        self.backend = backend
        self.freeze()  # packed codes are not trainable

    def _derived(self) -> _Derived:
        d = self.__dict__.get("_cache")
        if d is None or not d.fits(self):
            d = self._cache = _Derived(self)  # not an array: a plain attribute, never a parameter
        return d

    @property
    def packed(self) -> PackedWeight:
        return self._derived().packed

    @classmethod
    def from_packed(cls, pw: PackedWeight, bias: mx.array | None = None, backend: str = "auto") -> "PackedLinear":
        return cls(pw.data, pw.scales, pw.fmt, pw.shape, bias=bias, backend=backend)

    @classmethod
    def from_dense(cls, linear_weight, fmt: str, bias: mx.array | None = None, backend: str = "auto") -> "PackedLinear":
        """Post-training quantize a dense [N, K] weight (rules in packing.quantize_*)."""
        return cls.from_packed(quantize(linear_weight, fmt), bias=bias, backend=backend)

    def rows(self, r0: int, r1: int) -> "PackedLinear":
        """The layer computing output rows [r0, r1) of this one (same format, backend, bias rows).

        Output rows of a linear are independent, so a fused projection can compute one part
        without the others. The packed codes, scales and bias are row-contiguous, so their row
        slices are views: nothing is copied."""
        if not 0 <= r0 < r1 <= self.out_features:
            raise BonsaiError(f"rows must satisfy 0 <= r0 < r1 <= {self.out_features}, got [{r0}, {r1})")
        rows = self._derived().rows
        if (r0, r1) not in rows:
            bias = self.bias[r0:r1] if "bias" in self else None
            rows[r0, r1] = PackedLinear(self.weight[r0:r1], self.scales[r0:r1], self.fmt, (r1 - r0, self.in_features),
                                        bias=bias, backend=self.backend)
        return rows[r0, r1]

    def __call__(self, x: mx.array) -> mx.array:
        d = self._derived()
        y = d.launch(x, d.packed)
        if "bias" in self:
            y = y + self.bias.astype(y.dtype)
        return y

    def _extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt}, backend={self.backend}"
