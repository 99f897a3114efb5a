"""Slab decode launch shapes: every slab of each klein matrix decoded under `DecodeTile(CPT, NSG)`
variants, against a device copy of the same bytes (read + write) timed in the same run.

Each variant's slabs are first checked equal, bit for bit, to the default tile's (the decode
is exact: values are +-s or 0), then timed as bench_kernels times its decode column: all slabs
of one matrix, as the slab launcher cuts them, per call. Needs MLX's Metal or CUDA back-end:

    python examples/bench_decode.py --json $OUT/decode.json [--tiles "[[4, 4], [2, 8]]"]
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import mlx.core as mx
import numpy as np
from bench_kernels import SHAPES, make_packed, timeit  # this folder: the script's own is first on the path

from bonsai_mlx import kernels

TILES = [[1, 4], [2, 4], [3, 4], [4, 4], [6, 4], [2, 8], [4, 8], [4, 2], [2, 16], [4, 16]]


def decode_all(pw, backend: str, config: kernels.KernelConfig) -> list[mx.array]:
    rows = kernels.slab_rows(*pw.shape, config)
    return [kernels.decode_slab(pw, a, b, mx.bfloat16, backend, config)
            for a, b in kernels.slab_ranges(pw.shape[0], rows)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--tiles", type=json.loads, default=TILES, help="a JSON list of [CPT, NSG]")
    args = ap.parse_args()
    backend = kernels.default_backend()
    rng = np.random.default_rng(0)
    base = kernels.DEFAULT_CONFIG
    configs = {tuple(t): dataclasses.replace(base, decode=kernels.DecodeTile(*t)) for t in args.tiles}
    results = []
    for fmt in kernels.FORMATS:
        for n, k in SHAPES:
            pw = make_packed(rng, fmt, n, k, mx)[0]
            rotations = [(pw,)]
            ref = decode_all(pw, backend, base)
            mx.eval(ref)
            dense = mx.concatenate(ref, axis=0)
            copy_s = timeit(mx, lambda p: dense + 0, [(pw,)], 20)
            row = dict(fmt=fmt, N=n, K=k, slab_rows=kernels.slab_rows(n, k, base), copy_ms=1e3 * copy_s)
            for tile, cfg in configs.items():
                got = decode_all(pw, backend, cfg)
                same = all(mx.array_equal(a.view(mx.uint16), b.view(mx.uint16)).item() for a, b in zip(got, ref))
                s = timeit(mx, lambda p, cfg=cfg: decode_all(p, backend, cfg), rotations, 20) if same else None
                row[f"{tile[0]}x{tile[1]}"] = None if s is None else 1e3 * s
            results.append(row)
            print(json.dumps(row), flush=True)
            with open(args.json, "w") as f:
                json.dump(dict(backend=backend, default=list(dataclasses.astuple(base.decode)), rows=results), f, indent=1)
    names = [f"{c}x{g}" for c, g in args.tiles]
    print("\n| fmt | N x K | copy | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for r in results:
        cells = [f"{r[nm]:.3f}" if r[nm] is not None else "differs" for nm in names]
        print(f"| {r['fmt']} | {r['N']}x{r['K']} | {r['copy_ms']:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
