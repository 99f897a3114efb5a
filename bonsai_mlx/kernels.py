"""Packed binary/ternary matmul kernels and their launchers, and the VAE's column moments.

The Metal sources in metal/ are the product: each `<fmt>_<path>.metal` is a
kernel body for `mx.fast.metal_kernel`, and metal/common.metal is the header
they share. The CUDA twins for `mx.fast.cuda_kernel` are generated from the
same text by `metal_to_cuda` (plus metal/tile_mma.cuh, the hand-written
tensor-core stand-in for the 8x8 simdgroup_matrix block). The kernels read the
packed codes and scales directly; W is staged only as packed bit planes, and
each simdgroup decodes its own 8 x WN (Metal) or fragment-sized (CUDA) piece
right before multiplying.

Three paths per format, chosen by M (`choose_path`):
  slab  M >= slab_min_m[fmt], 16-bit x: `<fmt>_decode` writes a slab of at most
        slab_max_elements weights (whole rows) dense in x's dtype, MLX's own
        matmul computes x @ slab.T, next slab; the slabs' outputs are
        concatenated along N. Our fused GEMM is bound by mma.sync (MLX's JIT
        targets sm_90, not sm_90a, so no wgmma), MLX's matmul is not; the slab
        keeps the dense copy to a bounded, reused scratch.
  gemm  32 <= M < slab_min_m[fmt] (any M >= 32 for float32 x on Metal): BM x BN
        output tile per threadgroup, simdgroup matrices (Metal) / mma.sync
        tensor cores (CUDA).
  gemv  M < 32, 16-bit x: 8 NJ weight rows x 16 rows of x per threadgroup,
        simdgroups split K, lanes read their packed words straight into the
        matrix units (CUDA) / simdgroup scratch (Metal); W read once per 16
        rows of x.
  gemv_fp32  float32 x (and, on CUDA, float32 at any M): one simdgroup per R
        weight rows, lanes stream the packed rows, simd_sum reduces.

Every launch is described by a `Launch` (kernel, template, grid, threadgroup;
plus the slab height for the slab path), so the CPU harness in
tests/metal_harness runs exactly what MLX would. The tuning values named above
(slab_min_m, slab_max_elements, tiles) are fields of a frozen `KernelConfig`;
planning and launching functions take one, `DEFAULT_CONFIG` unless given. The
launchers that packed_linear calls take none: they use the config of the
innermost `tuned` block around the call (how a memory plan sets its slab cap for
a forward without a flag on any module), `DEFAULT_CONFIG` outside one.

packed_linear resolves its "metal" and "cuda" backends here (`launcher`); this
module imports nothing from packed_linear.

`column_moments` (metal/column_moments.metal) gives the VAE's GroupNorm its statistics
from 16-bit activations without a float32 copy of them, on the same back-ends;
`block_moments` (metal/block_moments.metal) gives a strip's share of them in one launch.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import mlx.core as mx

from .errors import BonsaiError

FORMATS = ("binary", "ternary")
PATHS = ("gemv", "gemm", "slab")
GEMM_MIN_M = 32
INPUT_NAMES = ("x", "w", "scales")
OUTPUT_NAMES = ("y",)
# The decode kernels (slab path) take the packed rows only and write the slab.
DECODE_INPUT_NAMES = ("w", "scales")
DECODE_OUTPUT_NAMES = ("slab",)
MOMENTS = "column_moments"
MOMENTS_INPUT_NAMES = ("x", "mean")
MOMENTS_OUTPUT_NAMES = ("out",)
BLOCK_MOMENTS = "block_moments"
BLOCK_MOMENTS_INPUT_NAMES = ("x",)
BLOCK_MOMENTS_OUTPUT_NAMES = ("sums", "m2s")
# Threads a moments launch aims at (channels x row blocks x samples): enough to fill a GPU,
# few enough that the float32 partial sums stay small (256 KB).
MOMENTS_THREADS = 1 << 16
MOMENTS_GROUP = 128  # threads per threadgroup, along the channels
# Values of each block_moments output (row blocks x channels x samples) a launch aims at: its
# partial sums wait for the stage's merge, so a strip's stay at two outputs of 64 KB (128
# blocks of 128 channels, 64 of 256) and a 1024 px stage's 32 strips hold 4 MB of them.
BLOCK_MOMENTS_VALUES = 1 << 14
# Threads per block_moments value, each reading a slice of the block's rows: 1 << 17 threads
# for a strip, enough to keep a GPU's loads in flight where one thread a value leaves most of
# it idle and waiting on memory.
BLOCK_MOMENTS_SLICES = 8


# ---------------------------------------------------------------------------- tuning

# Tile fields are spelled as the kernels' template parameters they become.

@dataclass(frozen=True)
class GemmTile:
    """BM x BN output tile per threadgroup, BK of K per step, SGM x SGN simdgroups."""
    BM: int
    BN: int
    BK: int
    SGM: int
    SGN: int


@dataclass(frozen=True)
class GemvTile:
    """16-bit GEMV: 8 NJ weight rows per threadgroup, lanes read KL words, NSG simdgroups
    splitting K (0: chosen from K, see KernelConfig.gemv_steps_per_sg)."""
    NJ: int
    KL: int
    NSG: int


@dataclass(frozen=True)
class Fp32GemvTile:
    """float32 GEMV: R weight rows per simdgroup, NSG simdgroups, at most MT_MAX rows of x."""
    R: int
    NSG: int
    MT_MAX: int


@dataclass(frozen=True)
class DecodeTile:
    """Slab decode: CPT 16-byte chunks per lane, NSG simdgroups per threadgroup."""
    CPT: int
    NSG: int


@dataclass(frozen=True)
class ByFormat:
    """One value per packed format, read as `value[fmt]`."""
    binary: int
    ternary: int

    def __getitem__(self, fmt: str) -> int:
        if fmt not in FORMATS:
            raise BonsaiError(f"no kernel for packed format {fmt!r} (have {', '.join(FORMATS)})")
        return getattr(self, fmt)


@dataclass(frozen=True)
class KernelConfig:
    """Every tuning value of the kernels and their launch plans, frozen and hashable.

    Functions that plan or launch take one (`DEFAULT_CONFIG` unless given); the plan and
    kernel caches key on it. A tuning experiment builds its own with `dataclasses.replace`
    and passes it along, so it never changes what other callers get."""

    # Slab path (M >= slab_min_m[fmt], float16 / bfloat16 x). Below it the fused GEMM
    # (32 <= M) or the GEMV. Set from examples/bench_kernels.py's gemm and slab columns on an
    # H200 (docs/results/h200-kernels-slab-first.json, decode kernels of before the 16-byte-store
    # rewrite): the slab beat the fused GEMM from M = 1024 for ternary on all five klein
    # shapes; for binary from M = 1536 on three and from 4608 on 3072x3072 and 3072x12288.
    slab_min_m: ByFormat = ByFormat(binary=1536, ternary=1024)
    # Slab cap: at most 16M weights (32 MB at 2 bytes). A matrix within the cap is one slab,
    # so its product needs no concatenation; a larger one is split into slabs of whole
    # slab_row_multiple rows. The slab is a bounded scratch, reused slab after slab, never a
    # dense 16-bit copy of a large matrix (for klein's 27648 x 3072 that copy would be 170 MB).
    # Why 16M: fewer, larger slabs mean fewer launches (MLX's per-call floor is ~10 us), larger
    # matmuls and fewer concatenated parts; on an H200 the ternary DiT steps that run on the
    # slab path take 0.63-0.96x the time they take with 8M-weight slabs of at most half a
    # matrix, and binary ones about the same (docs/benchmarks.md, c23, c24). Why 128 rows: the
    # slab is the matmul's N, and 128 keeps its tiles whole.
    slab_max_elements: int = 16 << 20
    slab_row_multiple: int = 128
    # Decode launch: a lane writes CPT chunks of 8 weights, one 16-byte store each; a
    # simdgroup owns a segment of 32 CPT chunks (256 CPT weights) of one row, NSG simdgroups
    # per threadgroup. CPT = 4: a klein row (K = 3072, 9216, 12288) is 3, 9, 12 whole
    # segments, and a 27648x3072 slab of 4608 rows is 3456 threadgroups of 128 threads.
    decode: DecodeTile = DecodeTile(CPT=4, NSG=4)
    # GEMM tiles. Metal: 64x64 float tiles, two x buffers (20 KB of the 32 KB threadgroup
    # memory), 4 simdgroups of 32x32. CUDA: 128x128 tiles, two half x buffers (36 KB), 4 warps
    # of 128x32 (m16n8k16 fragments; each decoded B fragment feeds 8 mma). Chosen on an H200
    # among 128x256/2x4, 128x128/2x2, 128x64/1x2, 256x128/2x4 and others
    # (examples/bench_kernels.py --tune).
    gemm_metal: GemmTile = GemmTile(BM=64, BN=64, BK=32, SGM=2, SGN=2)
    gemm_cuda: GemmTile = GemmTile(BM=128, BN=128, BK=64, SGM=1, SGN=4)
    # GEMV (M < 32, 16-bit x): 8 NJ weight rows and 16 rows of x per threadgroup, NSG
    # simdgroups splitting K in steps of 128 KL (lane reads KL words). NSG = 0: about
    # gemv_steps_per_sg steps per simdgroup, at most gemv_nsg_max simdgroups (few steps per
    # simdgroup = all of W's loads in flight at once, which is what small matrices need).
    # Metal's scratch (x 16 x 128 KL floats + weights 128 KL x 8 per simdgroup) must fit its
    # 32 KB with the reduction buffer. The "_small" tile, when set, is used for M <= 8 (there x
    # is cheap and the time is latency: short simdgroups, 8-byte words per lane). Chosen on an
    # H200 (examples/bench_kernels.py --tune).
    gemv_metal: GemvTile = GemvTile(NJ=1, KL=1, NSG=2)
    gemv_cuda: GemvTile = GemvTile(NJ=4, KL=1, NSG=4)
    gemv_metal_small: GemvTile | None = None
    gemv_cuda_small: GemvTile | None = GemvTile(NJ=4, KL=2, NSG=0)
    gemv_steps_per_sg: int = 1
    gemv_nsg_max: int = 8
    # float32 GEMV (exact float arithmetic, no matrix units): R weight rows per simdgroup, NSG
    # simdgroups per threadgroup, and at most MT_MAX rows of x per threadgroup (the staged x
    # chunk, MT x 1056 floats, must fit Metal's 32 KB).
    gemv_fp32: Fp32GemvTile = Fp32GemvTile(R=8, NSG=4, MT_MAX=4)
    # Text replacements (file name, old, new) applied to the sources as read, for trying
    # kernel variants (examples/bench_kernels.py --tune-patches). Empty in production.
    source_patches: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self):
        try:
            # Kept: every packed matmul keys the plan and kernel caches on the config, and
            # hashing its nested fields each time cost more host time than the lookup.
            object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in fields(self))))
        except TypeError as e:  # a list or dict somewhere: the caches could not key on it
            raise BonsaiError(f"KernelConfig values must be hashable (tuples, not lists or dicts): {e}") from None

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):
        # Rebuilt from its fields, so an unpickled config hashes in its new process.
        return (type(self), tuple(getattr(self, f.name) for f in fields(self)))

    def gemm(self, backend: str) -> GemmTile:
        return self.gemm_metal if backend == "metal" else self.gemm_cuda

    def gemv(self, backend: str, M: int) -> GemvTile:
        """The 16-bit GEMV tile for M rows of x: the "_small" one at M <= 8 when set."""
        small = self.gemv_metal_small if backend == "metal" else self.gemv_cuda_small
        if M <= 8 and small is not None:
            return small
        return self.gemv_metal if backend == "metal" else self.gemv_cuda

    @property
    def name_suffix(self) -> str:
        """Appended to the kernel names when sources are patched: MLX keeps a compiled custom
        kernel by its name, so a patched source under the plain name could run the old code."""
        if not self.source_patches:
            return ""
        return "_p" + hashlib.sha1(repr(self.source_patches).encode()).hexdigest()[:10]


DEFAULT_CONFIG = KernelConfig()
# The config of the innermost `tuned` block (context-local: each thread and task sees its own).
_TUNED: ContextVar[KernelConfig] = ContextVar("bonsai_kernel_config", default=DEFAULT_CONFIG)


@contextmanager
def tuned(config: KernelConfig):
    """Launches inside the block that are given no config (those of packed_linear's layers)
    use `config`; the config before is back on exit, whatever happens inside. MLX builds a
    graph when a forward is called, so a block around the forward's call is enough: the slab
    path's slabs are chosen then, not when the graph is evaluated."""
    token = _TUNED.set(config)
    try:
        yield config
    finally:
        _TUNED.reset(token)


def current_config() -> KernelConfig:
    """The config that a launch given none uses here (`tuned`)."""
    return _TUNED.get()


# Each matrix decoded as one slab (a memory plan's whole slabs), the slab path costs one
# decode and one matmul per product and wins from fewer rows: whole-block binary steps at
# 512 px took 27.2-27.3 ms from 1024 rows against 28.2-28.4 ms from 1536, at the same peak
# (H200, docs/results/h200-slab-variants-c49-binary.json). From 512 rows both formats stepped
# faster still but peaked 0.5 GB higher there.
WHOLE_SLAB_MIN_M = ByFormat(binary=1024, ternary=1024)


def whole_slabs(largest: int, config: KernelConfig = DEFAULT_CONFIG) -> KernelConfig:
    """`config` with every matrix of at most `largest` weights (the largest a model multiplies
    by) decoded as one slab, and the slab path from WHOLE_SLAB_MIN_M rows."""
    if largest < 1:
        raise BonsaiError(f"whole slabs need the largest matrix's weight count, got {largest}")
    return replace(config, slab_max_elements=largest, slab_min_m=WHOLE_SLAB_MIN_M)


# ---------------------------------------------------------------------------- sources

def metal_dir() -> Path:
    """The wheel force-includes metal/ as bonsai_mlx/metal; a checkout has it at the root."""
    here = Path(__file__).parent
    for d in (here / "metal", here.parent / "metal"):
        if (d / "common.metal").is_file():
            return d
    raise BonsaiError(f"metal sources not found in {here / 'metal'} or in the repository root {here.parent}")


def _read(name: str, config: KernelConfig = DEFAULT_CONFIG) -> str:
    text = (metal_dir() / name).read_text()
    for fname, old, new in config.source_patches:
        if fname == name:
            if old not in text:
                raise BonsaiError(f"source patch target not found in {name}: {old!r}")
            text = text.replace(old, new)
    return text


def compact(src: str) -> str:
    """The source without comments, indentation or blank lines (line structure kept).

    MLX assembles and hashes the whole kernel text on every call, so its length is per-call
    time: on the CUDA back-end an empty kernel with our 17.6 KB header took 12.4 us a call
    against 7.6 us without it. Our sources have no string literals containing '//' or '/*'.
    """
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    lines = (re.sub(r"//.*$", "", ln).strip() for ln in src.splitlines())
    out = "\n".join(ln for ln in lines if ln)
    return out + "\n" if out else ""


# Kernels that use nothing of metal/common.metal get no header: MLX re-assembles
# header + body on every call, the decode runs once per slab (up to 11 calls
# per matmul at klein's shapes), and the compacted shared header is ~7.5 KB
# (Metal) / ~12 KB (CUDA) of per-call text.
HEADERLESS = ("binary_decode", "ternary_decode", MOMENTS, BLOCK_MOMENTS)


def io_names(kernel: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names, output names) of a kernel, as its body spells them."""
    if kernel.endswith("_decode"):
        return DECODE_INPUT_NAMES, DECODE_OUTPUT_NAMES
    if kernel == MOMENTS:
        return MOMENTS_INPUT_NAMES, MOMENTS_OUTPUT_NAMES
    if kernel == BLOCK_MOMENTS:
        return BLOCK_MOMENTS_INPUT_NAMES, BLOCK_MOMENTS_OUTPUT_NAMES
    return INPUT_NAMES, OUTPUT_NAMES


def _header(kernel: str, config: KernelConfig) -> str:
    return "" if kernel in HEADERLESS else _read("common.metal", config)


def metal_source(kernel: str, config: KernelConfig = DEFAULT_CONFIG) -> tuple[str, str]:
    """(header, body) exactly as passed to mx.fast.metal_kernel (comments stripped by `compact`),
    with `config.source_patches` applied."""
    return compact(_header(kernel, config)), compact(_read(f"{kernel}.metal", config))


# ---------------------------------------------------------------------------- CUDA twin

# CUDA spelling of the Metal attribute parameters the bodies may name.
_CUDA_ATTRIBUTES = {
    "thread_index_in_threadgroup": "const uint thread_index_in_threadgroup = bonsai_lid;",
    "simdgroup_index_in_threadgroup": "const uint simdgroup_index_in_threadgroup = bonsai_lid / 32u;",
    "thread_index_in_simdgroup": "const uint thread_index_in_simdgroup = bonsai_lid % 32u;",
    "threadgroup_position_in_grid": "const uint3 threadgroup_position_in_grid = blockIdx;",
    "thread_position_in_threadgroup": "const uint3 thread_position_in_threadgroup = threadIdx;",
    "thread_position_in_grid": (
        "const uint3 thread_position_in_grid = make_uint3(blockIdx.x * blockDim.x + threadIdx.x, "
        "blockIdx.y * blockDim.y + threadIdx.y, blockIdx.z * blockDim.z + threadIdx.z);"
    ),
    "threads_per_threadgroup": "const uint3 threads_per_threadgroup = make_uint3(blockDim.x, blockDim.y, blockDim.z);",
    "threadgroups_per_grid": "const uint3 threadgroups_per_grid = make_uint3(gridDim.x, gridDim.y, gridDim.z);",
    "simdgroups_per_threadgroup": (
        "const uint simdgroups_per_threadgroup = (blockDim.x * blockDim.y * blockDim.z + 31u) / 32u;"
    ),
    "threads_per_simdgroup": "const uint threads_per_simdgroup = 32u;",
    "thread_execution_width": "const uint thread_execution_width = 32u;",
}

_CUDA_UINT = "typedef unsigned int uint;\n"
# Metal's as_type<To>(v) (same-size bit reinterpretation), added to the CUDA header when the
# Metal text uses it (the decode kernels read the 16-bit patterns of T values).
_CUDA_AS_TYPE = """\
template <typename To, typename From>
__device__ __forceinline__ To as_type(From v) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  return *reinterpret_cast<const To*>(&v);
}
"""
_CUDA_PRELUDE = """\
// Generated from the Metal header by bonsai_mlx/kernels.py:metal_to_cuda.
typedef unsigned int uint;
// A Metal simdgroup is a CUDA warp: 32 lanes.
template <typename U>
__device__ __forceinline__ U bonsai_simd_sum(U v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename U>
__device__ __forceinline__ U bonsai_simd_max(U v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) { U u = __shfl_xor_sync(0xffffffffu, v, o); v = u > v ? u : v; }
  return v;
}
template <typename U>
__device__ __forceinline__ U bonsai_simd_min(U v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) { U u = __shfl_xor_sync(0xffffffffu, v, o); v = u < v ? u : v; }
  return v;
}
"""

# Metal address-space qualifiers: plain pointers on CUDA (threadgroup arrays
# are rewritten to __shared__ first). Erased as tokens, not #defined away:
# CUDA's own __device__/__constant__ expand to __location__(device) etc.
_ADDRESS_SPACE = re.compile(r"\b(?:device|constant|thread|threadgroup)\s+((?:const\s+)?[A-Za-z_][\w:<>]*\s*[*&])")
_METAL_ONLY = re.compile(r"// @@metal-only-begin.*?// @@metal-only-end\n?", re.S)
_TG_ARRAY = re.compile(r"\bthreadgroup\s+([A-Za-z_][\w:<>, ]*?)\s+([A-Za-z_]\w*)\s*((?:\[[^\]\[]+\])+)\s*;")
_SIMD_CALLS = {
    "simd_sum": "bonsai_simd_sum",
    "simd_max": "bonsai_simd_max",
    "simd_min": "bonsai_simd_min",
    "simd_shuffle_xor": "__shfl_xor_sync(0xffffffffu, ",
    "simd_shuffle_down": "__shfl_down_sync(0xffffffffu, ",
    "simd_shuffle": "__shfl_sync(0xffffffffu, ",
    "simd_broadcast": "__shfl_sync(0xffffffffu, ",
}


def metal_to_cuda(header: str, body: str, config: KernelConfig = DEFAULT_CONFIG) -> tuple[str, str]:
    """Rewrite a Metal (header, body) pair into a (header, body) for mx.fast.cuda_kernel.

    An empty Metal header (HEADERLESS kernels) gets only the `uint` typedef the body needs, plus
    an `as_type` (Metal's bit reinterpretation) when the Metal text calls it. A non-empty one gets
    metal/tile_mma.cuh appended (with `config.source_patches` applied)."""
    if header.strip():
        h = _METAL_ONLY.sub("", header)
        h = re.sub(r"^\s*#include\s*<metal_\w+>\s*\n", "", h, flags=re.M)
        h = re.sub(r"^inline\b", "__device__ __forceinline__", h, flags=re.M)
        h = _CUDA_PRELUDE + _ADDRESS_SPACE.sub(r"\1", h) + "\n" + _read("tile_mma.cuh", config)
    else:
        h = _CUDA_UINT
    if re.search(r"\bas_type\s*<", _strip_comments(header) + _strip_comments(body)):
        h += _CUDA_AS_TYPE

    b = _TG_ARRAY.sub(lambda m: f"__shared__ __align__(32) {m.group(1)} {m.group(2)}{m.group(3)};", body)
    b = re.sub(r"\bthreadgroup_barrier\s*\([^)]*\)", "__syncthreads()", b)
    b = re.sub(r"\bsimdgroup_barrier\s*\([^)]*\)", "__syncwarp()", b)
    b = _ADDRESS_SPACE.sub(r"\1", b)
    for metal_name, cuda_call in _SIMD_CALLS.items():
        if cuda_call.endswith("("):
            b = re.sub(rf"\b{metal_name}\s*\(", cuda_call, b)
        else:
            b = re.sub(rf"\b{metal_name}\s*\(", cuda_call + "(", b)
    if re.search(r"\bsimdgroup_matrix\b|\bsimdgroup_(load|store|multiply)", b):
        raise BonsaiError("simdgroup_matrix ops must live in the header's metal-only block")
    used = [decl for name, decl in _CUDA_ATTRIBUTES.items() if re.search(rf"\b{name}\b", body)]
    prologue = ["// Metal attribute parameters, from CUDA's built-ins."]
    if used:
        prologue.append(
            "const uint bonsai_lid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);"
        )
    prologue += used
    return h, "\n".join(prologue) + "\n" + b


def _strip_comments(src: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", " ", src, flags=re.S))


def cuda_source(kernel: str, config: KernelConfig = DEFAULT_CONFIG) -> tuple[str, str]:
    """(header, body) as passed to mx.fast.cuda_kernel: rewritten from the commented Metal text
    (the metal-only markers are comments), then compacted."""
    header, body = metal_to_cuda(_header(kernel, config), _read(f"{kernel}.metal", config), config)
    return compact(header), compact(body)


# ---------------------------------------------------------------------------- launch plans

@dataclass(frozen=True)
class Launch:
    kernel: str  # e.g. "binary_gemm": metal/binary_gemm.metal
    template: tuple  # ((name, dtype | int), ...)
    grid: tuple[int, int, int]  # in threads, as both metal_kernel and cuda_kernel take it
    threadgroup: tuple[int, int, int]
    # Slab path only: weight rows per slab. The launch above then decodes one full slab
    # (`decode_plan(fmt, slab_rows, ...)`); a shorter last slab has its own decode_plan.
    slab_rows: int = 0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise BonsaiError(f"no kernel for packed format {fmt!r} (have {', '.join(FORMATS)})")


def choose_path(M: int, dtype: mx.Dtype, backend: str, fmt: str, config: KernelConfig = DEFAULT_CONFIG) -> str:
    """"slab" for M >= config.slab_min_m[fmt] with 16-bit x, "gemm" for M >= GEMM_MIN_M, else "gemv".
    The CUDA tiles are tensor-core half/bf16, so float32 x takes the GEMV there at any M."""
    if M >= config.slab_min_m[fmt] and dtype in (mx.float16, mx.bfloat16):
        return "slab"
    if M >= GEMM_MIN_M and not (backend == "cuda" and dtype == mx.float32):
        return "gemm"
    return "gemv"


def slab_rows(N: int, K: int, config: KernelConfig = DEFAULT_CONFIG) -> int:
    """Weight rows per slab for W [N, K]: all N when W has at most config.slab_max_elements
    weights (one slab); otherwise at most that many weights (a multiple of
    config.slab_row_multiple rows when that leaves any, at least 1 row), evened out over the
    slabs that takes.
    klein 4B: 3072x3072 -> 3072 (1 slab), 18432x3072 -> 4608 (4), 3072x9216 -> 1536 (2),
    27648x3072 -> 4608 (6), 3072x12288 -> 1024 (3)."""
    cap = min(config.slab_max_elements // K, N)
    if cap == N:
        return N
    mult = config.slab_row_multiple if cap >= config.slab_row_multiple else 1
    cap = max(1, cap - cap % mult)
    rows = _ceil_div(N, _ceil_div(N, cap))
    return _ceil_div(rows, mult) * mult  # <= cap: cap is a multiple of mult


def slab_ranges(N: int, rows: int) -> list[tuple[int, int]]:
    """The weight-row ranges [n0, n1) the slab launcher decodes, in order."""
    return [(n0, min(n0 + rows, N)) for n0 in range(0, N, rows)]


def decode_plan(fmt: str, rows: int, K: int, dtype: mx.Dtype, backend: str,
                config: KernelConfig = DEFAULT_CONFIG) -> Launch:
    """The `<fmt>_decode` launch writing slab [rows, K] in `dtype` from `rows` packed weight rows:
    one simdgroup per segment of 32 CPT chunks (8 weights, one 16-byte store each) of a row,
    NSG simdgroups per threadgroup, one dimension. 27648x3072 (6 slabs of 4608 rows):
    rows * ceil(384 / 128) = 13824 simdgroups, grid (442368, 1, 1), threadgroup (128, 1, 1);
    a slab of 2048 rows: grid (196608, 1, 1)."""
    _check_format(fmt)
    if dtype not in (mx.float16, mx.bfloat16):
        raise BonsaiError(f"the slab is float16 or bfloat16 (x's dtype), got {dtype}")
    if K % 128 or K <= 0 or rows <= 0:
        raise BonsaiError(f"need rows > 0 and K a positive multiple of 128, got rows={rows}, K={K}")
    t = config.decode
    items = rows * _ceil_div(K // 8, 32 * t.CPT)  # simdgroups with work
    template = (("T", dtype), ("CPT", t.CPT), ("NSG", t.NSG))
    grid = (_ceil_div(items, t.NSG) * 32 * t.NSG, 1, 1)
    return Launch(f"{fmt}_decode", template, grid, (32 * t.NSG, 1, 1))


def plan(fmt: str, M: int, N: int, K: int, dtype: mx.Dtype, backend: str, path: str | None = None,
         config: KernelConfig = DEFAULT_CONFIG) -> Launch:
    """Which kernel, template and grid computes y[M, N] = x[M, K] @ W.T for W in `fmt`.

    `path` forces "gemv", "gemm" or "slab" (benchmarks, tests); None picks by M (`choose_path`)."""
    _check_format(fmt)
    if backend not in ("metal", "cuda"):
        raise BonsaiError(f"backend must be 'metal' or 'cuda', got {backend!r}")
    if K % 128 or K <= 0:
        raise BonsaiError(f"K must be a positive multiple of 128, got {K}")
    if path is None:
        path = choose_path(M, dtype, backend, fmt, config)
    elif path not in PATHS:
        raise BonsaiError(f"path must be one of {', '.join(PATHS)} or None, got {path!r}")
    if path == "slab":
        rows = slab_rows(N, K, config)
        return replace(decode_plan(fmt, rows, K, dtype, backend, config), slab_rows=rows)
    if path == "gemm":
        if backend == "cuda" and dtype == mx.float32:
            raise BonsaiError("the CUDA GEMM takes float16/bfloat16 x; float32 runs the GEMV")
        t = config.gemm(backend)
        nt = 32 * t.SGM * t.SGN
        template = (("T", dtype), ("BM", t.BM), ("BN", t.BN), ("BK", t.BK), ("SGM", t.SGM), ("SGN", t.SGN))
        grid = (_ceil_div(N, t.BN) * nt, _ceil_div(M, t.BM), 1)
        return Launch(f"{fmt}_gemm", template, grid, (nt, 1, 1))
    if dtype != mx.float32:
        t = config.gemv(backend, M)
        nsg = t.NSG or max(1, min(config.gemv_nsg_max, _ceil_div(K, 128 * t.KL) // config.gemv_steps_per_sg))
        template = (("T", dtype), ("NJ", t.NJ), ("KL", t.KL), ("NSG", nsg))
        grid = (_ceil_div(N, 8 * t.NJ) * 32 * nsg, _ceil_div(M, 16), 1)
        return Launch(f"{fmt}_gemv", template, grid, (32 * nsg, 1, 1))
    f = config.gemv_fp32
    mt = 1
    while mt < min(M, f.MT_MAX):
        mt *= 2
    template = (("T", dtype), ("MT", mt), ("R", f.R), ("NSG", f.NSG))
    grid = (_ceil_div(N, f.R * f.NSG) * 32 * f.NSG, _ceil_div(M, mt), 1)
    return Launch(f"{fmt}_gemv_fp32", template, grid, (32 * f.NSG, 1, 1))


# The launchers plan every call; the plans depend only on these arguments (the config included,
# which is hashable), so they are computed once per shape.
_plan_cached = lru_cache(maxsize=4096)(plan)
_decode_plan_cached = lru_cache(maxsize=4096)(decode_plan)


# ---------------------------------------------------------------------------- launchers

@lru_cache(maxsize=None)
def _kernel_object(backend: str, kernel: str, config: KernelConfig = DEFAULT_CONFIG):
    """Built on first use: constructing needs the Metal/CUDA back-end. The sources depend on
    `config.source_patches` only; configs differing in tiles alone build equal objects."""
    _check_available(backend)
    inputs, outputs = io_names(kernel)
    name = f"bonsai_{kernel}{config.name_suffix}"
    if backend == "metal":
        header, body = metal_source(kernel, config)
        return mx.fast.metal_kernel(
            name=name, input_names=list(inputs), output_names=list(outputs), source=body, header=header,
        )
    header, body = cuda_source(kernel, config)
    return mx.fast.cuda_kernel(
        name=name, input_names=list(inputs), output_names=list(outputs), source=body, header=header,
    )


def backend_available(backend: str) -> bool:
    """Whether MLX was built with, and found, the GPU back-end that `backend` launches on."""
    if backend == "metal":
        return mx.metal.is_available()
    if backend == "cuda":
        return mx.cuda.is_available()
    return False


def _check_available(backend: str) -> None:
    if not backend_available(backend):
        gpu = {"metal": "Metal", "cuda": "CUDA"}.get(backend)
        if gpu is None:
            raise BonsaiError(f"backend must be 'metal' or 'cuda', got {backend!r}")
        raise BonsaiError(f"backend {backend!r} is not available: this MLX has no {gpu} back-end here; "
                          "use backend='reference' or 'auto'")


def default_backend() -> str:
    for backend in ("metal", "cuda"):
        if backend_available(backend):
            return backend
    raise BonsaiError("packed kernels need MLX's Metal or CUDA back-end; use the reference backend")


def packed_matmul(x: mx.array, pw, backend: str | None = None, path: str | None = None,
                  config: KernelConfig | None = None) -> mx.array:
    """y [..., N] = x [..., K] @ W.T for a PackedWeight-like `pw` (fmt, data, scales, shape).

    `path` ("gemv", "gemm", "slab") overrides the choice by M, for benchmarks and tests;
    `config` the tuning (by default `current_config()`)."""
    backend = backend or default_backend()
    config = current_config() if config is None else config
    N, K = pw.shape
    if x.shape[-1] != K:
        raise BonsaiError(f"input has {x.shape[-1]} features but the packed weight {pw.shape} expects K = {K}")
    if x.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        raise BonsaiError(f"input must be float16, bfloat16 or float32, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x if x.ndim == 2 else x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return mx.zeros((*lead, N), dtype=x.dtype)
    launch = _plan_cached(pw.fmt, M, N, K, x.dtype, backend, path, config)
    if launch.slab_rows:
        parts = slab_parts(x2, pw, backend, launch.slab_rows, config)
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
    else:
        kern = _kernel_object(backend, launch.kernel, config)
        (y,) = kern(
            inputs=[x2, pw.data, pw.scales],
            template=list(launch.template),
            grid=launch.grid,
            threadgroup=launch.threadgroup,
            output_shapes=[(M, N)],
            output_dtypes=[x.dtype],
        )
    return y if x.ndim == 2 else y.reshape(*lead, N)


def decode_rows(w: mx.array, scales: mx.array, fmt: str, K: int, dtype: mx.Dtype, backend: str,
                config: KernelConfig = DEFAULT_CONFIG) -> mx.array:
    """slab [S, K] in `dtype` = W's rows given as packed rows w [S, ...] and scales [S, K/128]
    (row slices of a packed weight; a row slice of a row-contiguous array is a view, no copy)."""
    S = w.shape[0]
    launch = _decode_plan_cached(fmt, S, K, dtype, backend, config)
    kern = _kernel_object(backend, launch.kernel, config)
    (slab,) = kern(
        inputs=[w, scales],
        template=list(launch.template),
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=[(S, K)],
        output_dtypes=[dtype],
    )
    return slab


def decode_slab(pw, n0: int, n1: int, dtype: mx.Dtype, backend: str | None = None,
                config: KernelConfig = DEFAULT_CONFIG) -> mx.array:
    """Dense W[n0:n1] [n1 - n0, K] in `dtype` (float16 / bfloat16) through the decode kernel."""
    backend = backend or default_backend()
    return decode_rows(pw.data[n0:n1], pw.scales[n0:n1], pw.fmt, pw.shape[1], dtype, backend, config)


def slab_parts(x2: mx.array, pw, backend: str, rows: int, config: KernelConfig = DEFAULT_CONFIG) -> list[mx.array]:
    """[x2 @ W[n0:n1].T for each slab_ranges(N, rows)]: x2 [M, K] (16-bit), parts [M, n1 - n0].

    Each slab is decoded only after the previous part is computed (mx.depends): the decodes are
    independent, so MLX could otherwise run them all first and hold every slab at once, i.e. the
    whole dense matrix. Chained, one slab is live at a time and the next reuses its buffer."""
    N, K = pw.shape
    parts: list[mx.array] = []
    for n0, n1 in slab_ranges(N, rows):
        w = pw.data[n0:n1]
        if parts:
            w = mx.depends(w, parts[-1])
        slab = decode_rows(w, pw.scales[n0:n1], pw.fmt, K, x2.dtype, backend, config)  # [n1 - n0, K]
        parts.append(x2 @ slab.T)  # MLX's own matmul; .T is a view
    return parts


def metal_matmul(x: mx.array, pw) -> mx.array:
    """The "metal" launcher of packed_linear: packed_matmul on Metal with the tuning of `tuned`."""
    return packed_matmul(x, pw, "metal")


def cuda_matmul(x: mx.array, pw) -> mx.array:
    """The "cuda" launcher of packed_linear: packed_matmul on CUDA with the tuning of `tuned`."""
    return packed_matmul(x, pw, "cuda")


def launcher(backend: str):
    """The launcher `(x, pw) -> y` for "metal" or "cuda"; BonsaiError when MLX lacks that back-end."""
    _check_available(backend)
    return metal_matmul if backend == "metal" else cuda_matmul


# ---------------------------------------------------------------------------- column moments

def moments_plan(B: int, R: int, C: int, dtype: mx.Dtype, squared: bool, threads: int = MOMENTS_THREADS) -> Launch:
    """The column_moments launch for x [B, R, C] of `dtype`: one thread per channel, row block
    and sample, about `threads` of them."""
    group = min(MOMENTS_GROUP, 32 * _ceil_div(C, 32))
    width = group * _ceil_div(C, group)
    blocks = max(1, min(R, threads // (width * B)))
    return Launch(MOMENTS, (("T", dtype), ("SQ", int(squared))), (width, blocks, B), (group, 1, 1))


def moments_backend(dtype: mx.Dtype) -> str | None:
    """The back-end that runs column_moments for activations of `dtype`, or None: 16-bit only
    (a float32 tensor needs no copy to be reduced in float32) and a GPU back-end."""
    if dtype not in (mx.float16, mx.bfloat16):
        return None
    return next((b for b in ("metal", "cuda") if backend_available(b)), None)


def column_moments(x: mx.array, mean: mx.array | None = None, backend: str | None = None) -> mx.array:
    """[B, C] float32: the sums over the rows of x [B, R, C] (16-bit), or with `mean` [B, C]
    the sums of squared deviations from it, accumulated in float32 as x is read."""
    backend = backend or moments_backend(x.dtype) or default_backend()
    B, R, C = x.shape
    launch = moments_plan(B, R, C, x.dtype, mean is not None)
    mean = mx.zeros((B, C), dtype=mx.float32) if mean is None else mean.astype(mx.float32).reshape(B, C)
    (out,) = _kernel_object(backend, MOMENTS)(
        inputs=[x, mean],
        template=list(launch.template),
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=[(B, launch.grid[1], C)],
        output_dtypes=[mx.float32],
    )
    return mx.sum(out, axis=1)


def block_moments_plan(B: int, R: int, C: int, dtype: mx.Dtype, values: int = BLOCK_MOMENTS_VALUES) -> Launch:
    """The block_moments launch for x [B, R, C] of `dtype`: about `values` (block, channel,
    sample) outputs, each from BLOCK_MOMENTS_SLICES threads; threadgroups of 32 channels x
    the slices, one row block each."""
    S, width = BLOCK_MOMENTS_SLICES, 32 * _ceil_div(C, 32)
    blocks = max(1, min(R, values // (width * B)))
    return Launch(BLOCK_MOMENTS, (("T", dtype), ("S", S)), (width, blocks * S, B), (32, S, 1))


_block_moments_plan_cached = lru_cache(maxsize=1024)(block_moments_plan)


@lru_cache(maxsize=1024)
def block_counts(R: int, blocks: int) -> tuple[int, ...]:
    """Rows in each of block_moments' `blocks` row blocks over R rows (trailing blocks may hold
    none). Cached: a decode asks for the same few hundreds of times, and building the tuple
    costs more host time than launching the kernel."""
    rb = _ceil_div(R, blocks)
    return tuple(max(0, min(rb, R - j * rb)) for j in range(blocks))


def block_moments(x: mx.array, backend: str | None = None) -> tuple[tuple[int, ...], mx.array, mx.array]:
    """(rows of each block, sums [B, blocks, C], squared deviations around each block's own
    mean [B, blocks, C]) of x [B, R, C] (16-bit), float32, in one launch: a part's moments
    for the parallel-variance merge (vae_strips._merged)."""
    backend = backend or moments_backend(x.dtype) or default_backend()
    B, R, C = x.shape
    launch = _block_moments_plan_cached(B, R, C, x.dtype)
    nb = launch.grid[1] // launch.threadgroup[1]
    sums, m2s = _kernel_object(backend, BLOCK_MOMENTS)(
        inputs=[x],
        template=list(launch.template),
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=[(B, nb, C), (B, nb, C)],
        output_dtypes=[mx.float32, mx.float32],
    )
    return block_counts(R, nb), sums, m2s
