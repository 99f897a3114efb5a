"""Benchmark the packed binary/ternary kernels against MLX baselines.

On the device machine (MLX CUDA back-end):
    python examples/bench_kernels.py --out $OUT/bench.json
    python examples/bench_kernels.py --slab-only --out $OUT/bench_slab.json   (short)
Prints markdown tables: time per call, throughput, ratios against fp16
mx.matmul and mx.quantized_matmul (2/4-bit, group 128) measured in the same
run, device copy bandwidth and M=1 bandwidth on packed bytes. Every kernel
output is first checked against a float64-exact reference on the device.
Besides the launcher's own choice (`binary`, `ternary`), every shape and M
also times the slab path forced (`<fmt>_slab`, even below the config's
slab_min_m, to set it from data), the fused GEMM forced where the launcher picked the slab
(`<fmt>_gemm`), and, at M = 1, the launcher under mx.compile
(`<fmt>_compiled`: does compiling cut MLX's per-call floor?). At M >= 1024 the
slab path is also timed under mx.compile, without the concatenation and as
its decodes alone. `--slab-only`: the checks, the baselines and the slab
columns for M in 1536, 4608 only. A failed measurement is printed and
recorded as null; the JSON is rewritten after every row.
`--sizes` prints the resident-size figure for the full 4B transformer (CPU).
`--tune` times tuning variants instead: each is a `kernels.KernelConfig` built
from the default with `dataclasses.replace` and passed to the launcher.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np

SHAPES = [(3072, 3072), (18432, 3072), (3072, 9216), (27648, 3072), (3072, 12288)]
MS = [1, 16, 256, 1024, 1536, 4608]
SLAB_MS = [1536, 4608]  # --slab-only
CHECK_SHAPES = [(3072, 3072), (3072, 9216)]  # correctness checks before timing
L2_BYTES = 200 << 20  # rotate weights until one pass exceeds caches by far


# ---------------------------------------------------------------------------- sizes (no GPU)

def block_linear_shapes():
    """The 100 binary/ternary linears of FLUX.2 klein 4B, as (N, K)."""
    D, F = 3072, 9216
    shapes = []
    for _ in range(5):  # double blocks
        shapes += [(D, D)] * 8  # to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out
        shapes += [(2 * F, D), (D, F)] * 2  # ff, ff_context: linear_in, linear_out
    for _ in range(20):  # single blocks
        shapes += [(3 * D + 2 * F, D), (D, D + F)]  # to_qkv_mlp_proj, to_out
    assert len(shapes) == 100
    return shapes


def aux_params():
    """16-bit parameters outside the block linears (docs: flux2-klein.md)."""
    D = 3072
    mats = [(D, 128), (D, 7680), (D, 256), (D, D), (6 * D, D), (6 * D, D), (3 * D, D), (2 * D, D), (128, D)]
    norms = 5 * 4 * 128 + 20 * 2 * 128
    return sum(n * k for n, k in mats) + norms


def packed_bytes(fmt, n, k):
    scales = n * (k // 128) * 2
    if fmt == "binary":
        return n * k // 8 + scales
    return n * -(-k // 5) + scales


def sizes_table():
    shapes = block_linear_shapes()
    aux = aux_params()
    weights = sum(n * k for n, k in shapes)
    rows = ["| part | binary | ternary (5 trits/byte) |", "|---|---|---|"]
    b = sum(packed_bytes("binary", n, k) for n, k in shapes)
    t = sum(packed_bytes("ternary", n, k) for n, k in shapes)
    rows.append(f"| 100 block linears ({weights:,} weights), codes + fp16 scales | {b:,} B | {t:,} B |")
    rows.append(f"| 16-bit auxiliaries ({aux:,} params) | {2 * aux:,} B | {2 * aux:,} B |")
    rows.append(f"| **transformer total** | **{b + 2 * aux:,} B = {(b + 2 * aux) / 1e9:.3f} GB** | "
                f"**{t + 2 * aux:,} B = {(t + 2 * aux) / 1e9:.3f} GB** |")
    rows.append(f"| ceiling (PrismML) | 0.93 GB | 1.21 GB |")
    rows.append(f"| bits/weight of the block linears | {8 * b / weights:.4f} | {8 * t / weights:.4f} |")
    return "\n".join(rows), dict(binary=b + 2 * aux, ternary=t + 2 * aux, aux_params=aux, block_weights=weights)


# ---------------------------------------------------------------------------- device

def make_packed(rng, fmt, n, k, mx):
    """Random codes packed per the format spec, plus the exact dense W (fp32)."""
    if fmt == "binary":
        data = rng.integers(0, 2**32, size=(n, k // 32), dtype=np.uint32)
        t = ((data[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(n, k).astype(np.int8) * 2 - 1
    else:
        t = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
        kb = -(-k // 5)
        codes = np.ones((n, kb * 5), dtype=np.uint8)
        codes[:, :k] = t + 1
        data = (codes.reshape(n, kb, 5).astype(np.uint16) * np.array([1, 3, 9, 27, 81], np.uint16)).sum(-1)
        data = data.astype(np.uint8)
    s = rng.uniform(0.005, 0.05, size=(n, k // 128)).astype(np.float16)
    pw = SimpleNamespace(fmt=fmt, data=mx.array(data), scales=mx.array(s), shape=(n, k))
    return pw, t, s


def timeit(mx, fn, rotations, iters):
    """Median seconds per call; each timed batch runs fn over all rotations once."""
    for r in rotations[:2]:
        mx.eval(fn(*r))
    mx.synchronize()
    samples = []
    per_batch = max(1, iters // len(rotations))
    for _ in range(max(3, min(iters, 15))):
        t0 = time.perf_counter()
        outs = []
        for _ in range(per_batch):
            outs += [fn(*r) for r in rotations]
        mx.eval(outs)
        mx.synchronize()
        samples.append((time.perf_counter() - t0) / (per_batch * len(rotations)))
    return float(np.median(samples))


def device_name():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"


def copy_bandwidth(mx):
    a = mx.random.uniform(shape=(1 << 29,)).astype(mx.float16)  # 1 GiB
    mx.eval(a)
    t = timeit(mx, lambda v: v + 1, [(a,)], 10)
    return 2 * a.nbytes / t  # bytes read + written


def probe(label, fn, mx):
    """fn(mx), or nan when it fails: the probes are context, not results; never lose the run to one."""
    try:
        return fn(mx)
    except Exception as e:
        print(f"{label} failed: {type(e).__name__}: {e}", flush=True)
        return float("nan")


def call_floor(mx):
    """Seconds per call of an empty custom kernel, timed the same way as the kernels (MLX dispatch floor)."""
    noop = mx.fast.cuda_kernel(name="bonsai_noop", input_names=["x"], output_names=["y"],
                               source="if (threadIdx.x == 0 && blockIdx.x == 0) y[0] = x[0];")
    xs = [(mx.random.normal((1, 3072)).astype(mx.float16),) for _ in range(8)]
    return timeit(mx, lambda a: noop(inputs=[a], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
                                     output_dtypes=[mx.float16])[0], xs, 64)


MMA_PROBE = """
float c[8][4];
for (int j = 0; j < 8; ++j) for (int e = 0; e < 4; ++e) c[j][e] = 0.0f;
const unsigned t = threadIdx.x;
unsigned a[4] = {t * 0x00010001u & 0x3bff3bffu, 0x3c003c00u, 0x38003800u, t & 0x03ff03ffu};
unsigned b[2] = {0x3c00bc00u, (t << 3) & 0x03ff03ffu};
for (int it = 0; it < ITERS; ++it) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[j][0]), "+f"(c[j][1]), "+f"(c[j][2]), "+f"(c[j][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
float v = 0.0f;
for (int j = 0; j < 8; ++j) v += c[j][0] + c[j][1] + c[j][2] + c[j][3];
if (v == 1234.5f) y[0] = v;
if (blockIdx.x == 0 && t == 0) y[1] = x[0];
"""


def mma_ceiling(mx):
    """TFLOP/s of a register-only loop of independent mma.sync m16n8k16 (f16 in, f32 accumulate), the
    instruction our CUDA tiles use: the ceiling for them on this device."""
    k = mx.fast.cuda_kernel(name="bonsai_mma_probe", input_names=["x"], output_names=["y"], source=MMA_PROBE)
    x = mx.zeros((2,), dtype=mx.float32)
    iters, blocks, threads = 4096, 132 * 8, 128
    f = lambda a: k(inputs=[a], grid=(blocks * threads, 1, 1), threadgroup=(threads, 1, 1), output_shapes=[(2,)],
                    output_dtypes=[mx.float32], template=[("ITERS", iters)])[0]
    t = timeit(mx, f, [(x,)], 10)
    return blocks * threads // 32 * iters * 8 * 2 * 16 * 8 * 16 / t


def call_floor_compiled(mx):
    """As call_floor, with the kernel call wrapped in mx.compile (replayed without re-tracing)."""
    noop = mx.fast.cuda_kernel(name="bonsai_noop", input_names=["x"], output_names=["y"],
                               source="if (threadIdx.x == 0 && blockIdx.x == 0) y[0] = x[0];")
    f = mx.compile(lambda a: noop(inputs=[a], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
                                  output_dtypes=[mx.float16])[0])
    xs = [(mx.random.normal((1, 3072)).astype(mx.float16),) for _ in range(8)]
    return timeit(mx, f, xs, 64)


def check_outputs(mx, kernels, rng, slab_only=False, config=None):
    """Kernel vs exact reference on the device, every path and format: rows of
    (fmt, M, N, K, dtype, kernel, path, rel err); err is nan when the call raised."""
    # (path, M): the launcher's choice at M = 1, 16 and slab_min_m[fmt], the GEMM forced at 1536,
    # the slab forced at 1536 and at M = 40.
    config = config or kernels.DEFAULT_CONFIG
    rows = []
    for fmt in kernels.FORMATS:
        slab_min = config.slab_min_m[fmt]
        cases = [(None, 1), (None, 16), ("gemm", 1536), ("slab", 1536), ("slab", 40), (None, slab_min)]
        if slab_only:
            cases = [("slab", 1536), ("slab", 40), (None, slab_min)]
        for (n, k) in CHECK_SHAPES:
            pw, t, s = make_packed(rng, fmt, n, k, mx)
            wd = mx.array(t.astype(np.float32) * np.repeat(s.astype(np.float32), 128, axis=1))
            for path, M in cases:
                for dt in (mx.float16, mx.bfloat16):
                    kernel = kernels.plan(fmt, M, n, k, dt, "cuda", path, config).kernel
                    try:
                        x = mx.random.normal((M, k)).astype(dt)
                        y = kernels.packed_matmul(x, pw, "cuda", path=path, config=config).astype(mx.float32)
                        ref = x.astype(mx.float32) @ wd.T
                        err = (mx.linalg.norm(y - ref) / mx.linalg.norm(ref)).item()
                    except Exception as e:  # recorded as nan; the caller decides what is fatal
                        print(f"check {fmt} {kernel} M={M} {n}x{k} {dt} raised: {type(e).__name__}: {e}", flush=True)
                        err = float("nan")
                    rows.append((fmt, M, n, k, str(dt).split(".")[-1], kernel, path or "auto", err))
            del wd
    return rows


def _git_head():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def measure(row, key, fn):
    """row[key] = fn(), seconds. A failure is printed and recorded (row[key] = None and
    row["errors"][key]) instead of ending the run: the other columns survive."""
    try:
        row[key] = fn()
    except Exception as e:
        row[key] = None
        row.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"
        print(f"  {key} failed at M={row['M']} {row['N']}x{row['K']}: {type(e).__name__}: {e}", flush=True)


def _ok(v):
    return isinstance(v, (int, float)) and v == v and v > 0


def run(args):
    import mlx.core as mx

    from bonsai_mlx import kernels

    rng = np.random.default_rng(0)
    cfg = kernels.DEFAULT_CONFIG
    # info["slab"] keeps the key names of the earlier result files (docs/results/), so their
    # tables and these compare; info["config"] is the whole tuning, for the record.
    info = dict(device=device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(sys.argv), mlx=mx.__version__, commit=_git_head(), slab_only=args.slab_only,
                slab=dict(SLAB_MIN_M=dataclasses.asdict(cfg.slab_min_m), SLAB_MAX_ELEMENTS=cfg.slab_max_elements,
                          SLAB_ROW_MULTIPLE=cfg.slab_row_multiple, DECODE_TILES=dataclasses.asdict(cfg.decode)),
                config=dataclasses.asdict(cfg))
    print(f"device: {info['device']}  mlx {info['mlx']}  {info['date']}  commit {info['commit']}", flush=True)
    checks = check_outputs(mx, kernels, rng, args.slab_only, cfg)
    slab_checks = [c for c in checks if c[5].endswith("_decode")]
    fused_checks = [c for c in checks if not c[5].endswith("_decode")]
    for name, cs in (("fused", fused_checks), ("slab", slab_checks)):
        if cs:
            worst = max((c[-1] for c in cs), key=lambda e: np.inf if e != e else e)
            print(f"correctness ({name}): {len(cs)} launches vs exact reference, worst rel err {worst:.2e}",
                  flush=True)
    # The fused kernels are the established paths: a wrong one ends the run as before. A wrong slab
    # path is flagged in the JSON and the tables, and its timings are still taken (never lose a run).
    assert all(np.isfinite(c[-1]) and c[-1] < 2e-2 for c in fused_checks), fused_checks
    info["slab_ok"] = all(np.isfinite(c[-1]) and c[-1] < 2e-2 for c in slab_checks)
    if not info["slab_ok"]:
        print("SLAB PATH FAILED ITS CHECK (wrong result or an error): its columns below are not valid", flush=True)
        for c in slab_checks:
            print("   ", c, flush=True)
    bw = copy_bandwidth(mx)
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    floor = probe("per-call floor", call_floor, mx)
    print(f"per-call floor (empty mx.fast.cuda_kernel, timed like the kernels): {floor * 1e6:.1f} us", flush=True)
    floor_c = probe("compiled floor", call_floor_compiled, mx)
    print(f"per-call floor, same kernel under mx.compile: {floor_c * 1e6:.1f} us", flush=True)
    mma = probe("mma probe", mma_ceiling, mx)
    print(f"mma.sync m16n8k16 f16/f32 register-only loop: {mma / 1e12:.0f} TFLOP/s", flush=True)

    results = []
    out = dict(info=info, copy_bandwidth=bw, call_floor=floor, call_floor_compiled=floor_c, mma_ceiling=mma,
               checks=checks, results=results)

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)

    shapes = SHAPES if not args.quick else SHAPES[:2]
    if args.slab_only:
        ms_list = SLAB_MS
    else:
        ms_list = args.ms if args.ms else (MS if not args.quick else [1, 1536])
    for (n, k) in shapes:
        w16 = (mx.random.normal((n, k)) * 0.02).astype(mx.float16)
        q = {bits: mx.quantize(w16, group_size=128, bits=bits) for bits in (2, 4)}
        pws = {fmt: make_packed(rng, fmt, n, k, mx)[0] for fmt in kernels.FORMATS}
        mx.eval(w16, q, [(p.data, p.scales) for p in pws.values()])
        rows_per_slab = kernels.slab_rows(n, k)
        ranges = kernels.slab_ranges(n, rows_per_slab)
        info["slab"][f"{n}x{k}"] = dict(rows=rows_per_slab, slabs=len(ranges))
        # The decodes alone, all slabs of the matrix (no matmul; this holds every slab at once, a
        # benchmark-only shortcut): the decode's share of the slab path. M-independent.
        decode_row = dict(M=0, N=n, K=k)
        for fmt, pw in pws.items():
            measure(decode_row, f"{fmt}_decode", lambda pw=pw: timeit(
                mx, lambda p: [kernels.decode_slab(p, a, b, mx.float16, "cuda") for a, b in ranges], [(pw,)], 10))
        for M in ms_list:
            x = mx.random.normal((M, k)).astype(mx.float16)
            mx.eval(x)
            flops = 2 * M * n * k
            iters = 40 if M <= 16 else 10

            def rot(nbytes, make):
                copies = 1 if M > 16 else int(min(32, max(1, L2_BYTES // max(nbytes, 1))))
                return [make(i) for i in range(copies)]

            row = dict(M=M, N=n, K=k, slabs=len(ranges), slab_rows=rows_per_slab)
            row["path"] = {fmt: kernels.plan(fmt, M, n, k, mx.float16, "cuda").kernel for fmt in kernels.FORMATS}
            # fp16 dense
            rs = rot(w16.nbytes, lambda i: (x, w16 if i == 0 else mx.array(w16 * 1)))
            measure(row, "fp16", lambda: timeit(mx, lambda a, w: a @ w.T, rs, iters))
            for bits in (2, 4):
                wq, sc, bi = q[bits]
                rs = rot(wq.nbytes, lambda i: (x, wq if i == 0 else mx.array(wq + 0), sc, bi))
                measure(row, f"q{bits}", lambda: timeit(
                    mx, lambda a, w, s_, b_: mx.quantized_matmul(a, w, s_, b_, transpose=True, group_size=128,
                                                                 bits=bits), rs, iters))
            wq, sc, bi = q[2]
            measure(row, "deq2", lambda: timeit(
                mx, lambda a, w, s_, b_: a @ mx.dequantize(w, s_, b_, group_size=128, bits=2).T, [(x, wq, sc, bi)],
                iters))
            for fmt, pw in pws.items():
                nb = pw.data.nbytes + pw.scales.nbytes

                def mk(i, pw=pw):
                    if i == 0:
                        return (x, pw)
                    return (x, SimpleNamespace(fmt=pw.fmt, data=mx.array(pw.data + 0), scales=mx.array(pw.scales * 1),
                                               shape=pw.shape))

                rs = rot(nb, mk)
                row[f"{fmt}_bytes"] = nb
                if not args.slab_only:
                    # The launcher's own choice (the product), and the fused GEMM where it chose the slab.
                    measure(row, fmt, lambda: timeit(mx, lambda a, p: kernels.packed_matmul(a, p, "cuda"), rs, iters))
                    if M >= kernels.GEMM_MIN_M and not row["path"][fmt].endswith("_gemm"):
                        measure(row, f"{fmt}_gemm", lambda: timeit(
                            mx, lambda a, p: kernels.packed_matmul(a, p, "cuda", path="gemm"), rs, iters))
                measure(row, f"{fmt}_slab", lambda: timeit(
                    mx, lambda a, p: kernels.packed_matmul(a, p, "cuda", path="slab"), rs, iters))
                if M == 1 and not args.slab_only:
                    # Weights as inputs, so the rotations replay one compiled graph.
                    cf = mx.compile(lambda a, d, s_, fmt=fmt: kernels.packed_matmul(
                        a, SimpleNamespace(fmt=fmt, data=d, scales=s_, shape=(n, k)), "cuda"))
                    measure(row, f"{fmt}_compiled", lambda: timeit(mx, lambda a, p: cf(a, p.data, p.scales), rs, iters))
                if M >= 1024 or args.slab_only:
                    cs = mx.compile(lambda a, d, s_, fmt=fmt: kernels.packed_matmul(
                        a, SimpleNamespace(fmt=fmt, data=d, scales=s_, shape=(n, k)), "cuda", path="slab"))
                    measure(row, f"{fmt}_slab_compiled", lambda: timeit(
                        mx, lambda a, p: cs(a, p.data, p.scales), rs, iters))
                    # Without the final concatenation (the parts, evaluated): its cost is the difference.
                    measure(row, f"{fmt}_slab_parts", lambda: timeit(
                        mx, lambda a, p: kernels.slab_parts(a, p, "cuda", rows_per_slab), rs, iters))
                    for cap in args.slab_caps:
                        capped = dataclasses.replace(cfg, slab_max_elements=int(cap))
                        measure(row, f"{fmt}_slab_cap{int(cap)}", lambda: timeit(
                            mx, lambda a, p: kernels.packed_matmul(a, p, "cuda", path="slab", config=capped), rs,
                            iters))
                row[f"{fmt}_decode"] = decode_row.get(f"{fmt}_decode")
                del rs
            row["tflops"] = {key: flops / v / 1e12 for key, v in row.items() if _is_timing(key) and _ok(v)}
            results.append(row)
            print(json.dumps(row), flush=True)
            save()
        del w16, q, pws
    save()
    try:
        print(tables(out))
    except Exception as e:  # the JSON is written; a table bug must not hide the numbers
        print(f"tables failed: {type(e).__name__}: {e}", flush=True)


BASELINES = ("fp16", "q2", "q4", "deq2")
FORMATS = ("binary", "ternary")  # kernels.FORMATS, without importing MLX for --sizes


def _is_timing(key):
    """Per-call time columns of a row (seconds), as opposed to sizes, labels and M-free decodes."""
    return key in BASELINES or (key.split("_")[0] in FORMATS and not key.endswith(("_bytes", "_decode")))


def _ms(r, key):
    v = r.get(key)
    return f"{v * 1e3:.3f} ms" if _ok(v) else "—"


def _x(r, num, den):
    """r[num] / r[den] as "1.23x" (for times: how many times faster `den` is), "—" if either is missing."""
    a, b = r.get(num), r.get(den)
    return f"{a / b:.2f}x" if _ok(a) and _ok(b) else "—"


def _gemm_time_key(r, fmt):
    """The column holding the fused GEMM's time in this row, if any."""
    if _ok(r.get(f"{fmt}_gemm")):
        return f"{fmt}_gemm"
    return fmt if str(r.get("path", {}).get(fmt, "")).endswith("_gemm") else None


def tables(out):
    bw = out["copy_bandwidth"]
    info = out["info"]
    res = out["results"]
    slab_note = "" if info.get("slab_ok", True) else " **The slab path FAILED its correctness check in this run.**"
    lines = [
        f"Device: {info['device']}, MLX {info['mlx']} (CUDA back-end), {info['date']}, commit {info.get('commit')}.",
        f"Command: `{info['command']}`. Copy bandwidth (1 GiB fp16 `a + 1`, read + write): "
        f"{bw / 1e9:.0f} GB/s. Per-call floor (an empty `mx.fast.cuda_kernel`, timed the same way): "
        f"{out.get('call_floor', float('nan')) * 1e6:.1f} us; under mx.compile: "
        f"{out.get('call_floor_compiled', float('nan')) * 1e6:.1f} us. mma.sync m16n8k16 (f16 in, f32 accumulate; the "
        f"instruction of our CUDA tiles) in a register-only loop: {out.get('mma_ceiling', float('nan')) / 1e12:.0f} "
        f"TFLOP/s. Slab path: SLAB_MIN_M = {info.get('slab', {}).get('SLAB_MIN_M')}, SLAB_MAX_ELEMENTS = "
        f"{info.get('slab', {}).get('SLAB_MAX_ELEMENTS')}.{slab_note}",
    ]
    if any("binary" in r or "ternary" in r for r in res):
        lines += [
            "",
            "Launcher's own choice (`binary`, `ternary`; path in the last column):",
            "",
            "| M | N x K | fp16 matmul | q2 qmm | q4 qmm | deq2+mm | binary | ternary | bin/fp16 | ter/fp16 | q2/bin | "
            "q2/ter | path |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res:
            path = "/".join(str(r.get("path", {}).get(f, "?")).split("_", 1)[-1].replace("decode", "slab")
                            for f in FORMATS)
            lines.append(
                f"| {r['M']} | {r['N']}x{r['K']} | {_ms(r, 'fp16')} | {_ms(r, 'q2')} | {_ms(r, 'q4')} | {_ms(r, 'deq2')} | "
                f"{_ms(r, 'binary')} | {_ms(r, 'ternary')} | {_x(r, 'fp16', 'binary')} | {_x(r, 'fp16', 'ternary')} | "
                f"{_x(r, 'q2', 'binary')} | {_x(r, 'q2', 'ternary')} | {path} |")
    lines += [
        "",
        "Fused GEMM vs slab path, both forced (`x/fp16` = fp16 time / x time, `q2/x` = times faster than 2-bit "
        "qmm, `gemm/slab` > 1: the slab is faster):",
        "",
        "| M | N x K | fp16 | binary gemm | binary slab | ternary gemm | ternary slab | bin slab/fp16 | ter slab/fp16 | "
        "q2/bin slab | q2/ter slab | bin gemm/slab | ter gemm/slab |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        g = {f: _gemm_time_key(r, f) for f in FORMATS}
        lines.append(
            f"| {r['M']} | {r['N']}x{r['K']} | {_ms(r, 'fp16')} | {_ms(r, g['binary']) if g['binary'] else '—'} | "
            f"{_ms(r, 'binary_slab')} | {_ms(r, g['ternary']) if g['ternary'] else '—'} | {_ms(r, 'ternary_slab')} | "
            f"{_x(r, 'fp16', 'binary_slab')} | {_x(r, 'fp16', 'ternary_slab')} | {_x(r, 'q2', 'binary_slab')} | "
            f"{_x(r, 'q2', 'ternary_slab')} | {_x(r, g['binary'], 'binary_slab') if g['binary'] else '—'} | "
            f"{_x(r, g['ternary'], 'ternary_slab') if g['ternary'] else '—'} |")
    # Per shape and format: the smallest measured M from which the forced slab beats the fused GEMM
    # at every larger measured M (what SLAB_MIN_M should be, as far as these Ms resolve it).
    shapes = list(dict.fromkeys((r["N"], r["K"]) for r in res))
    if any(_gemm_time_key(r, f) for r in res for f in FORMATS):
        lines += ["", "Smallest measured M from which the slab path beats the fused GEMM at every larger measured M:",
                  ""]
    else:
        shapes = []  # --slab-only times no GEMM
    for (n, k) in shapes:
        rows = sorted((r for r in res if (r["N"], r["K"]) == (n, k) and r["M"] >= 32), key=lambda r: r["M"])
        found = []
        for f in FORMATS:
            best = None
            for r in reversed(rows):
                gk = _gemm_time_key(r, f)
                if not (gk and _ok(r.get(gk)) and _ok(r.get(f"{f}_slab"))):
                    break
                if r[f"{f}_slab"] < r[gk]:
                    best = r["M"]
                else:
                    break
            found.append(f"{f} {best if best is not None else 'none'}")
        lines.append(f"- {n}x{k}: " + ", ".join(found))
    big = [r for r in res if any(f"{f}_slab_parts" in r for f in FORMATS)]
    if big:
        lines += ["", "Slab path in parts: as launched, under mx.compile, without the final concatenation, and the "
                      "decodes alone (all slabs, no matmul):", "",
                  "| M | N x K | slabs x rows | bin slab | bin compiled | bin no concat | bin decodes | ter slab | "
                  "ter compiled | ter no concat | ter decodes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in big:
            lines.append(
                f"| {r['M']} | {r['N']}x{r['K']} | {r.get('slabs')} x {r.get('slab_rows')} | "
                + " | ".join(f"{_ms(r, f + '_slab')} | {_ms(r, f + '_slab_compiled')} | {_ms(r, f + '_slab_parts')} | "
                             f"{_ms(r, f + '_decode')}" for f in FORMATS) + " |")
    caps = sorted({key.split("_cap")[1] for r in res for key in r if "_slab_cap" in key}, key=int)
    if caps:
        lines += ["", "Slab path by slab cap (SLAB_MAX_ELEMENTS), forced:", "",
                  "| M | N x K | " + " | ".join(f"{f} cap {c}" for f in FORMATS for c in caps) + " |",
                  "|---|---|" + "---|" * (len(FORMATS) * len(caps))]
        for r in res:
            if any(f"{f}_slab_cap{c}" in r for f in FORMATS for c in caps):
                lines.append(f"| {r['M']} | {r['N']}x{r['K']} | "
                             + " | ".join(_ms(r, f"{f}_slab_cap{c}") for f in FORMATS for c in caps) + " |")
    fl = out.get("call_floor", 0.0)
    ones = [r for r in res if r["M"] == 1 and any(_ok(r.get(f)) for f in FORMATS)]
    if ones:
        lines += ["", "M = 1 as a share of copy bandwidth (packed bytes read once per call), and under mx.compile:", "",
                  "| N x K | binary GB/s | % of copy | ternary GB/s | % of copy | binary, time - floor | "
                  "ternary, time - floor | binary | binary compiled | ternary | ternary compiled |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in ones:
            cells = []
            for f in FORMATS:
                if _ok(r.get(f)):
                    gb = r[f"{f}_bytes"] / r[f]
                    cells.append(f"{gb / 1e9:.0f} | {100 * gb / bw:.0f}%")
                else:
                    cells.append("— | —")
            ex = [(f"{100 * r[f'{f}_bytes'] / (r[f] - fl) / bw:.0f}% of copy" if _ok(r.get(f)) and r[f] > fl else "n/a")
                  for f in FORMATS]
            lines.append(f"| {r['N']}x{r['K']} | {cells[0]} | {cells[1]} | {ex[0]} | {ex[1]} | "
                         + " | ".join(f"{_ms(r, f)} | {_ms(r, f + '_compiled')}" for f in FORMATS) + " |")
    lines += ["", "Throughput (TFLOP/s, 2MNK per call) at M >= 1536:", "",
              "| M | N x K | fp16 | q2 | q4 | binary | ternary | binary slab | ternary slab |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        if r["M"] >= 1536:
            t = r.get("tflops", {})
            c = lambda key: f"{t[key]:.0f}" if key in t else "—"
            lines.append(f"| {r['M']} | {r['N']}x{r['K']} | {c('fp16')} | {c('q2')} | {c('q4')} | {c('binary')} | "
                         f"{c('ternary')} | {c('binary_slab')} | {c('ternary_slab')} |")
    return "\n".join(lines)


def gemv_variant(kernels, values):
    """The default config with the CUDA 16-bit GEMV's NJ, KL, NSG (0 = auto) and, when given, its
    gemv_steps_per_sg replaced, in that order, for every M (no separate tile for M <= 8)."""
    base = kernels.DEFAULT_CONFIG
    tile = dataclasses.replace(base.gemv_cuda, **dict(zip(("NJ", "KL", "NSG"), values[:3])))
    steps = values[3] if len(values) > 3 else base.gemv_steps_per_sg
    return dataclasses.replace(base, gemv_cuda=tile, gemv_cuda_small=None, gemv_steps_per_sg=steps)


def tune_variants(kernels, args):
    """(GEMM configs, GEMV configs) to time, each a KernelConfig derived from the default: the
    GEMM ones for every source variant (None = unpatched) x tile, as (patch index, tile, config);
    the GEMV ones as (argument list, config)."""
    base = kernels.DEFAULT_CONFIG
    patch_sets = args.tune_patches
    if isinstance(patch_sets, str):  # "@file"
        with open(patch_sets[1:]) as f:
            patch_sets = json.load(f)
    patches = [()] + [tuple(tuple(r) for r in v) for v in patch_sets]
    gemm = [(pi, tuple(v), dataclasses.replace(base, source_patches=patch,
                                               gemm_cuda=kernels.GemmTile(*v)))
            for pi, patch in enumerate(patches) for v in args.tune_tiles]
    gemv = [(tuple(v), gemv_variant(kernels, v)) for v in args.tune_gemv]
    return gemm, gemv


def tune(args):
    """Time tile/launch variants of the CUDA twins (for choosing the KernelConfig's gemm_cuda / gemv_*
    fields), and the per-call floor of an empty custom kernel timed the same way."""
    import mlx.core as mx

    from bonsai_mlx import kernels

    rng = np.random.default_rng(1)
    print(f"empty cuda_kernel per call: {call_floor(mx) * 1e6:.1f} us", flush=True)
    print(f"mma.sync m16n8k16 register-only loop: {mma_ceiling(mx) / 1e12:.0f} TFLOP/s", flush=True)
    xs = [(mx.random.normal((1, 3072)).astype(mx.float16),) for _ in range(8)]
    t = timeit(mx, lambda a: a + 1, xs, 64)
    print(f"x + 1 (1x3072) per call: {t * 1e6:.1f} us", flush=True)
    header, _ = kernels.cuda_source("binary_gemv")
    big = mx.fast.cuda_kernel(name="bonsai_noop_big", input_names=["x"], output_names=["y"], header=header,
                              source="if (threadIdx.x == 0 && blockIdx.x == 0) y[0] = x[0];")
    t = timeit(mx, lambda a: big(inputs=[a], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
                                 output_dtypes=[mx.float16], template=[("T", mx.float16), ("NJ", 4)])[0], xs, 64)
    print(f"empty cuda_kernel with our {len(header)}-char header + template, per call: {t * 1e6:.1f} us", flush=True)
    tiny = {fmt: make_packed(rng, fmt, 64, 128, mx)[0] for fmt in kernels.FORMATS}
    xt = [(mx.random.normal((1, 128)).astype(mx.float16),) for _ in range(8)]
    for fmt, pw in tiny.items():
        t = timeit(mx, lambda a: kernels.packed_matmul(a, pw, "cuda"), xt, 64)
        print(f"packed_matmul {fmt} M=1 N=64 K=128 per call: {t * 1e6:.1f} us", flush=True)
    gemm_variants, gemv_variants = tune_variants(kernels, args)
    for (n, k) in args.tune_shapes:
        pws = {fmt: make_packed(rng, fmt, n, k, mx)[0] for fmt in kernels.FORMATS}
        w16 = (mx.random.normal((n, k)) * 0.02).astype(mx.float16)
        wq, sc, bi = mx.quantize(w16, group_size=128, bits=2)
        for M in (1536, 4608):
            x = mx.random.normal((M, k)).astype(mx.float16)
            mx.eval(x, w16, wq, sc, bi)
            fl = 2 * M * n * k
            tf = fl / timeit(mx, lambda a, w: a @ w.T, [(x, w16)], 10) / 1e12
            tq = fl / timeit(mx, lambda a: mx.quantized_matmul(a, wq, sc, bi, transpose=True, group_size=128, bits=2),
                             [(x,)], 10) / 1e12
            print(f"{n}x{k} M={M} fp16 {tf:.0f} TFLOP/s, q2 {tq:.0f}", flush=True)
            for pi, tile, cfg in gemm_variants:
                for fmt, pw in pws.items():
                    t = timeit(mx, lambda a, p: kernels.packed_matmul(a, p, "cuda", path="gemm", config=cfg),
                               [(x, pw)], 10)
                    print(f"  gemm{f' p{pi}' if pi else ''} {fmt:8s} {tile}: "
                          f"{fl / t / 1e12:.0f} TFLOP/s ({tf * t / fl * 1e12:.2f}x fp16 time)", flush=True)
        copies = {fmt: [SimpleNamespace(fmt=fmt, data=mx.array(p.data + 0), scales=mx.array(p.scales * 1),
                                        shape=p.shape) for _ in range(8)] for fmt, p in pws.items()}
        for M in (1, 16):
            xm = [mx.random.normal((M, k)).astype(mx.float16) for _ in range(8)]
            for v, cfg in gemv_variants:
                for fmt in kernels.FORMATS:
                    nb = pws[fmt].data.nbytes + pws[fmt].scales.nbytes
                    rot = [(xm[i], copies[fmt][i]) for i in range(8)]
                    t = timeit(mx, lambda a, p: kernels.packed_matmul(a, p, "cuda", config=cfg), rot, 64)
                    print(f"  gemv M={M} {fmt:8s} {v}: {t * 1e6:.1f} us, {nb / t / 1e9:.0f} GB/s", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", action="store_true", help="print the resident-size table and exit (no GPU)")
    p.add_argument("--quick", action="store_true", help="two shapes, M in {1, 1536}")
    p.add_argument("--slab-only", action="store_true",
                   help="short run: checks, baselines and the slab columns at M in 1536, 4608 only")
    p.add_argument("--ms", type=json.loads, default=None, help=f"M values, a JSON list (default {MS})")
    p.add_argument("--slab-caps", type=json.loads, default=[],
                   help="also time the slab path at these slab_max_elements values (M >= 1024), a JSON list")
    p.add_argument("--out", help="write raw results as JSON (rewritten after every row)")
    p.add_argument("--tune", action="store_true", help="time CUDA tile/launch variants instead")
    p.add_argument("--tune-tiles", type=json.loads, default=[[128, 128, 64, 2, 2], [128, 256, 64, 2, 4]],
                   help="CUDA GEMM tiles to time, a JSON list of [BM, BN, BK, SGM, SGN]")
    p.add_argument("--tune-patches", type=lambda v: v if v.startswith("@") else json.loads(v), default=[],
                   help="source variants for the GEMM: a JSON list of variants, each a list of [file, old, new]")
    p.add_argument("--tune-shapes", type=json.loads, default=[[3072, 3072], [18432, 3072], [3072, 12288]],
                   help="(N, K) shapes for --tune, a JSON list")
    p.add_argument("--tune-gemv", type=json.loads, default=[],
                   help="CUDA GEMV variants, a JSON list of [NJ, KL, NSG (0 = auto)] or [NJ, KL, NSG, steps per "
                        "simdgroup], each used for every M")
    args = p.parse_args()
    if args.tune:
        tune(args)
        return
    if args.sizes:
        print(sizes_table()[0])
        return
    run(args)


if __name__ == "__main__":
    main()
