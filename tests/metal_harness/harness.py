"""Runs the exact Metal source strings of an mx.fast.metal_kernel on the CPU.

How: the header and body are compiled as C++ (g++) against shim.h, inside a
kernel signature generated the way MLX generates it (inputs, `<name>_shape`
when the body names it, outputs, then the attribute parameters the body
names). Each threadgroup runs with one OS thread per GPU thread (barriers and
SIMD collectives need them concurrent); threadgroups run one after another.
Threadgroup arrays become one shared, poisoned allocation per threadgroup.
Outputs are poisoned with NaN bytes and every element must be written.
Constructs outside the supported subset are rejected before compiling.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SHIM = Path(__file__).with_name("shim.h")

# mlx/fast.cpp: (attribute, type) in the order MLX appends them.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

# How each attribute is computed from (group id gx/gy/gz, local id lx/ly/lz).
ATTRIBUTE_VALUES = {
    "dispatch_simdgroups_per_threadgroup": "uint((nt + 31) / 32)",
    "dispatch_threads_per_threadgroup": "uint3{uint(tx), uint(ty), uint(tz)}",
    "grid_origin": "uint3{0u, 0u, 0u}",
    "grid_size": "uint3{uint(GX), uint(GY), uint(GZ)}",
    "simdgroup_index_in_threadgroup": "uint(lid / 32)",
    "simdgroups_per_threadgroup": "uint((nt + 31) / 32)",
    "thread_execution_width": "32u",
    "thread_index_in_simdgroup": "uint(lid % 32)",
    "thread_index_in_threadgroup": "uint(lid)",
    "thread_position_in_grid": "uint3{uint(gx * tx + lx), uint(gy * ty + ly), uint(gz * tz + lz)}",
    "thread_position_in_threadgroup": "uint3{uint(lx), uint(ly), uint(lz)}",
    "threadgroup_position_in_grid": "uint3{uint(gx), uint(gy), uint(gz)}",
    "threadgroups_per_grid": "uint3{uint(GX / tx), uint(GY / ty), uint(GZ / tz)}",
    "threads_per_grid": "uint3{uint(GX), uint(GY), uint(GZ)}",
    "threads_per_simdgroup": "32u",
    "threads_per_threadgroup": "uint3{uint(tx), uint(ty), uint(tz)}",
}

# MLX's get_type_string for the dtypes we use.
TYPE_NAMES = {
    "float32": "float",
    "float16": "float16_t",
    "bfloat16": "bfloat16_t",
    "uint32": "uint32_t",
    "uint8": "uint8_t",
    "int32": "int32_t",
    "uint16": "uint16_t",
}
NUMPY_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,  # raw bits
    "uint32": np.uint32,
    "uint8": np.uint8,
    "int32": np.int32,
    "uint16": np.uint16,
}

SUPPORTED_INCLUDES = {"<metal_stdlib>", "<metal_simdgroup>", "<metal_simdgroup_matrix>"}
SUPPORTED_SIMD = {
    "simd_sum", "simd_max", "simd_min", "simd_shuffle", "simd_shuffle_xor", "simd_shuffle_down",
    "simd_broadcast", "simdgroup_barrier", "simdgroup_matrix", "simdgroup_load", "simdgroup_store",
    "simdgroup_multiply_accumulate", "simdgroup_index_in_threadgroup", "simdgroups_per_threadgroup",
}
REJECT = [
    (r"\.(?:[xyzw]{2,4}|[rgba]{2,4})\b", "vector swizzles"),
    (r"\bpacked_\w+", "packed_ vector types"),
    (r"\batomic\w*", "atomics"),
    (r"\b(?:texture\w*|sampler|imageblock\w*)\b", "textures/samplers/imageblocks"),
    (r"\bquad\w*", "quadgroup functions/attributes"),
    (r"\b(?:dispatch_quadgroups_per_threadgroup|grid_origin)\b", "unsupported attributes"),
    (r"\bthreadgroup_imageblock\b", "imageblocks"),
    (r"\bvec<", "vec<T, N> types"),
    (r"\[\[", "[[attributes]] inside the kernel strings"),
    (r"\b(?:half|float|uint|int|short|ushort|uchar|char|bool|bfloat)[2-4]\s*\(", "vector constructors"),
]


class UnsupportedMSL(ValueError):
    """The kernel uses a Metal construct the harness does not emulate."""


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


_TG_ARRAY = re.compile(r"\bthreadgroup\s+([A-Za-z_][\w:<>, ]*?)\s+([A-Za-z_]\w*)\s*((?:\[[^\]\[]+\])+)\s*;")
_TG_QUALIFIER = re.compile(r"\bthreadgroup\s+(?:const\s+)?[A-Za-z_][\w:<>]*\s*[*&]")


def check_supported(header: str, body: str) -> None:
    text = _strip_comments(header) + "\n" + _strip_comments(body)
    for pat, what in REJECT:
        m = re.search(pat, text)
        if m:
            raise UnsupportedMSL(f"unsupported MSL construct ({what}): {m.group(0)!r}")
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#include"):
            inc = s[len("#include"):].strip()
            if inc not in SUPPORTED_INCLUDES:
                raise UnsupportedMSL(f"unsupported include {inc}")
        elif s.startswith("#") and not re.match(r"#\s*(define|undef|if|ifdef|ifndef|else|elif|endif|pragma\s+unroll)\b", s):
            raise UnsupportedMSL(f"unsupported preprocessor line {s!r}")
    for name in set(re.findall(r"\bsimd\w*", text)):
        if name not in SUPPORTED_SIMD:
            raise UnsupportedMSL(f"unsupported SIMD construct {name}")
    # `threadgroup` is only allowed as an array declaration in the body or as a
    # pointer/reference qualifier.
    body_wo_arrays = _TG_ARRAY.sub("", _strip_comments(body))
    rest = _TG_QUALIFIER.sub("", _strip_comments(header) + "\n" + body_wo_arrays)
    m = re.search(r"\bthreadgroup\b(?!_)", rest)
    if m:
        i = m.start()
        raise UnsupportedMSL(f"unsupported use of `threadgroup`: {rest[i:i + 60]!r}")
    if _TG_ARRAY.search(_strip_comments(header)):
        raise UnsupportedMSL("threadgroup arrays must be declared in the kernel body")


def rewrite_threadgroup_arrays(body: str) -> str:
    """`threadgroup T a[N][M];` -> a reference to the group's one shared array."""
    counter = iter(range(1 << 30))

    def sub(m):
        ty, name, dims = m.group(1), m.group(2), m.group(3)
        return f"auto& {name} = *bonsai_emu::tg_array<{ty}{dims}>({next(counter)});"

    return _TG_ARRAY.sub(sub, body)


def _template_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    name = str(v).replace("mlx.core.", "")
    if name not in TYPE_NAMES:
        raise UnsupportedMSL(f"template dtype {v}")
    return TYPE_NAMES[name]


def _template_param(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    return "typename"


def build_source(name, input_names, output_names, source, header, in_dtypes, in_ndims, out_dtypes, template):
    """The C++ translation unit: shim, header, MLX-style signature, body, runner."""
    check_supported(header, source)
    params = []
    args = []
    for i, (n, dt, nd) in enumerate(zip(input_names, in_dtypes, in_ndims)):
        params.append(f"const device {TYPE_NAMES[dt]}* {n}")
        args.append(f"(const {TYPE_NAMES[dt]}*)bufs[{len(args)}]")
        if nd > 0:
            if f"{n}_shape" in source:
                params.append(f"const constant int* {n}_shape")
                args.append(f"(const int*)bufs[{len(args)}]")
            if f"{n}_strides" in source:
                params.append(f"const constant int64_t* {n}_strides")
                args.append(f"(const int64_t*)bufs[{len(args)}]")
            if f"{n}_ndim" in source:
                params.append(f"const constant int& {n}_ndim")
                args.append(f"*(const int*)bufs[{len(args)}]")
    for n, dt in zip(output_names, out_dtypes):
        params.append(f"device {TYPE_NAMES[dt]}* {n}")
        args.append(f"({TYPE_NAMES[dt]}*)bufs[{len(args)}]")
    for attr, ty in METAL_ATTRIBUTES:
        if attr in source:
            if attr not in ATTRIBUTE_VALUES:
                raise UnsupportedMSL(f"attribute {attr}")
            params.append(f"{ty} {attr}")
            args.append(ATTRIBUTE_VALUES[attr])
    tmpl = ""
    inst = f"custom_kernel_{name}"
    if template:
        tmpl = "template <" + ", ".join(f"{_template_param(v)} {k}" for k, v in template) + ">\n"
        inst += "<" + ", ".join(_template_value(v) for _, v in template) + ">"
    body = rewrite_threadgroup_arrays(source)
    # The supported <metal_*> includes are what shim.h provides.
    header = re.sub(r"^\s*#include\s*<metal_\w+>", "// (provided by shim.h)", header, flags=re.M)
    param_text = ",\n    ".join(params)
    arg_text = ", ".join(args)
    return f"""#include "{SHIM}"
{header}
{tmpl}void custom_kernel_{name}(
    {param_text}) {{
{body}
}}

#undef thread  // the Metal address-space macro; the runner needs std::thread
extern "C" int bonsai_run(void** bufs, const int* grid, const int* group, char* err, int errlen, int timeout_ms) {{
  using namespace bonsai_emu;
  barrier_timeout_ms = timeout_ms;
  const long GX = grid[0], GY = grid[1], GZ = grid[2];
  const long tx = group[0], ty = group[1], tz = group[2];
  const long nt = tx * ty * tz;
  std::string first_error;
  for (long gz = 0; gz < GZ / tz; ++gz)
  for (long gy = 0; gy < GY / ty; ++gy)
  for (long gx = 0; gx < GX / tx; ++gx) {{
    Group g;
    g.nthreads = int(nt);
    g.tg_bar.n = int(nt);
    g.tg_bar.failed = &g.failed;
    g.tg_bar.what = "threadgroup_barrier";
    std::vector<SimdState> simd((nt + 31) / 32);
    for (auto& s : simd) {{
      s.bar.n = 32;
      s.bar.failed = &g.failed;
      s.bar.what = "simd collective/simdgroup_barrier";
      g.simd.push_back(&s);
    }}
    std::vector<size_t> nops(nt);
    std::mutex em;
    std::vector<std::thread> threads;
    for (long lid = 0; lid < nt; ++lid) {{
      threads.emplace_back([&, lid]() {{
        const long lx = lid % tx, ly = (lid / tx) % ty, lz = lid / (tx * ty);
        lane_ctx = Lane{{&g, uint(lid / 32), uint(lid % 32), 0}};
        try {{
          {inst}({arg_text});
        }} catch (const Abort&) {{
        }} catch (const std::exception& e) {{
          g.failed = true;
          std::lock_guard<std::mutex> lk(em);
          if (first_error.empty()) first_error = e.what();
        }}
        nops[lid] = lane_ctx.nmatops;
      }});
    }}
    for (auto& t : threads) t.join();
    for (long lid = 0; lid < nt && first_error.empty(); ++lid)
      if (nops[lid] != nops[lid - lid % 32])
        first_error = "lanes of a simdgroup issued different numbers of simdgroup_matrix ops";
    if (!first_error.empty()) {{
      std::snprintf(err, errlen, "group (%ld,%ld,%ld): %s", gx, gy, gz, first_error.c_str());
      return 1;
    }}
  }}
  return 0;
}}
"""


def _cache_dir() -> Path:
    d = Path(os.environ.get("BONSAI_HARNESS_CACHE", Path(tempfile.gettempdir()) / "bonsai_metal_harness"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def compile_source(cpp: str) -> ctypes.CDLL:
    key = hashlib.sha256((cpp + SHIM.read_text()).encode()).hexdigest()[:24]
    so = _cache_dir() / f"k_{key}.so"
    if not so.exists():
        src = so.with_suffix(f".{os.getpid()}.cpp")  # per process: parallel test workers share the cache
        src.write_text(cpp)
        tmp = so.with_suffix(f".{os.getpid()}.tmp.so")
        cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-attributes",
               "-Werror=return-type", "-o", str(tmp), str(src)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise UnsupportedMSL(f"kernel does not compile against the shim:\n{r.stderr[-4000:]}")
        os.replace(tmp, so)
    lib = ctypes.CDLL(str(so))
    lib.bonsai_run.restype = ctypes.c_int
    return lib


def _dtype_name(a) -> str:
    return str(a.dtype).replace("mlx.core.", "")


def run(name, input_names, output_names, source, header, inputs, output_shapes, output_dtypes,
        grid, threadgroup, template=(), poison=True, barrier_timeout_s=20.0):
    """Same arguments as an mx.fast.metal_kernel call; inputs are mx arrays.

    Returns numpy arrays (bfloat16 outputs as their raw uint16 bits).
    """
    import mlx.core as mx

    in_dtypes = [_dtype_name(a) for a in inputs]
    out_dtypes = [str(d).replace("mlx.core.", "") for d in output_dtypes]
    cpp = build_source(name, input_names, output_names, source, header, in_dtypes,
                       [a.ndim for a in inputs], out_dtypes, list(template))
    lib = compile_source(cpp)

    # MLX: group = min(threadgroup, grid) per dim; dispatchThreads grid.
    group = [min(t, g) for t, g in zip(threadgroup, grid)]
    if any(g % t for g, t in zip(grid, group)):
        raise UnsupportedMSL(f"grid {grid} is not a multiple of threadgroup {group}: partial threadgroups "
                             "are not emulated (launch full groups and bounds-check)")
    if (group[0] * group[1] * group[2]) % 32:
        raise UnsupportedMSL("threadgroup size must be a multiple of the SIMD width 32")
    if group[0] * group[1] * group[2] > 1024:
        raise UnsupportedMSL("threadgroup larger than 1024 threads")

    keep = []
    ptrs = []
    for n, a in zip(input_names, inputs):
        arr = np.ascontiguousarray(np.array(a.view(mx.uint16) if _dtype_name(a) == "bfloat16" else a))
        keep.append(arr)
        ptrs.append(arr.ctypes.data)
        if a.ndim > 0:
            if f"{n}_shape" in source:
                s = np.array(a.shape, dtype=np.int32)
                keep.append(s)
                ptrs.append(s.ctypes.data)
            if f"{n}_strides" in source:
                st = np.array([int(np.prod(a.shape[i + 1:])) for i in range(a.ndim)], dtype=np.int64)
                keep.append(st)
                ptrs.append(st.ctypes.data)
            if f"{n}_ndim" in source:
                nd = np.array([a.ndim], dtype=np.int32)
                keep.append(nd)
                ptrs.append(nd.ctypes.data)
    outs = []
    for shape, dt in zip(output_shapes, out_dtypes):
        o = np.empty(shape, dtype=NUMPY_DTYPES[dt])
        if poison:
            o.view(np.uint8)[...] = 0xFF  # NaN in every float format
        outs.append(o)
        ptrs.append(o.ctypes.data)
    bufs = (ctypes.c_void_p * len(ptrs))(*ptrs)
    g = (ctypes.c_int * 3)(*grid)
    t = (ctypes.c_int * 3)(*group)
    err = ctypes.create_string_buffer(2048)
    rc = lib.bonsai_run(bufs, g, t, err, len(err), int(barrier_timeout_s * 1000))
    if rc != 0:
        raise RuntimeError(f"kernel {name} failed in the harness: {err.value.decode()}")
    return outs


def unwritten(out: np.ndarray) -> int:
    """Number of output elements still holding the poison pattern."""
    b = out.view(np.uint8).reshape(out.size, out.itemsize)
    return int(np.all(b == 0xFF, axis=1).sum())
