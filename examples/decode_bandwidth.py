"""The slab decode's bandwidth on MLX's CUDA back-end: each `<fmt>_decode` launch tile
(kernels.DecodeTile: CPT 16-byte stores a lane, NSG simdgroups a threadgroup) writing the
slabs the slab path decodes at klein's shapes, against a fill and a copy of the same bytes
in the same run, and MLX's matmul of 1,536 tokens (a 512 px step's) on the decoded slab.
Each time is per call, from CALLS calls built into one graph and evaluated together
(median of REPEATS, after a warm-up). JSON rows to $OUT/decode.json.

    python examples/decode_bandwidth.py [--tiles '[[4, 4], [8, 4]]'] [--shapes '[[27648, 3072]]']
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from bonsai_mlx import kernels
from bonsai_mlx.packing import pack_binary, pack_ternary

CALLS, REPEATS, TOKENS = 20, 5, 1536


def per_call(fn) -> float:
    """Seconds per call of `fn`, CALLS calls evaluated together (median of REPEATS)."""
    mx.eval([fn() for _ in range(2)])
    times = []
    for _ in range(REPEATS):
        mx.synchronize()
        t = time.perf_counter()
        mx.eval([fn() for _ in range(CALLS)])
        mx.synchronize()
        times.append((time.perf_counter() - t) / CALLS)
    return statistics.median(times)


def packed(fmt: str, rows: int, K: int):
    rng = np.random.default_rng(0)
    scales = mx.array(rng.uniform(0.5, 1.5, (rows, K // 128)).astype(np.float16))
    if fmt == "binary":
        return pack_binary(np.where(rng.standard_normal((rows, K)) > 0, 1.0, -1.0), scales)
    return pack_ternary(rng.integers(-1, 2, (rows, K)).astype(np.int8), scales)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=json.loads, default=[[c, n] for c in (1, 2, 4, 8) for n in (2, 4, 8)])
    ap.add_argument("--shapes", type=json.loads, default=[[27648, 3072], [5376, 3072], [3072, 12288], [3072, 3072]])
    ap.add_argument("--formats", nargs="+", default=["binary", "ternary"])
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    if not mx.cuda.is_available():
        sys.exit("decode_bandwidth.py times CUDA launches: run it where MLX's CUDA back-end is available")
    dtype = getattr(mx, args.dtype)
    rows_out, out = [], os.environ.get("OUT", "/tmp") + "/decode.json"
    for N, K in args.shapes:
        nbytes = N * K * 2
        src = mx.random.normal((N, K)).astype(dtype)
        x = mx.random.normal((TOKENS, K)).astype(dtype)
        mx.eval(src, x)
        base = {"N": N, "K": K, "slab_mb": nbytes / 1e6,
                "fill_us": 1e6 * per_call(lambda: mx.full((N, K), 1.0, dtype=dtype)),  # noqa: B023
                "copy_us": 1e6 * per_call(lambda: src + 1),  # noqa: B023 - reads and writes the slab's bytes
                "matmul_us": 1e6 * per_call(lambda: x @ src.T)}  # noqa: B023
        base["fill_tb_s"] = nbytes / base["fill_us"] / 1e6
        base["copy_tb_s"] = 2 * nbytes / base["copy_us"] / 1e6
        for fmt in args.formats:
            pw = packed(fmt, N, K)
            mx.eval(pw.data, pw.scales)
            ref = kernels.decode_rows(pw.data, pw.scales, fmt, K, dtype, "cuda")
            mx.eval(ref)
            for cpt, nsg in args.tiles:
                cfg = dataclasses.replace(kernels.DEFAULT_CONFIG, decode=kernels.DecodeTile(CPT=cpt, NSG=nsg))
                fn = lambda: kernels.decode_rows(pw.data, pw.scales, fmt, K, dtype, "cuda", cfg)  # noqa: E731,B023
                same = bool(mx.array_equal(fn(), ref).item())
                us = 1e6 * per_call(fn)
                slab_mm = 1e6 * per_call(lambda: x @ fn().T)  # noqa: B023
                r = {**base, "format": fmt, "CPT": cpt, "NSG": nsg, "same_as_default": same, "decode_us": us,
                     "decode_tb_s": nbytes / us / 1e6, "decode_then_matmul_us": slab_mm,
                     "x_fill": us / base["fill_us"], "x_matmul": slab_mm / base["matmul_us"]}
                rows_out.append(r)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
                json.dump(rows_out, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
