"""DiT steps of a random full-size pack under variants of the slab path: the slab cap (8M or 16M
weights), whether a slab may hold a whole matrix or at most half of it, and where the slab path
starts (`slab_min_m`). Two rounds, each step timed by profile_speed.timeit (median of 5 after
2 warm-ups, with the extra peak).

The variants are tried in one process, each in a `kernels.tuned` block of its config; the
"at most half a matrix" rule, which the kernels no longer have, is this script's own
`slab_rows`, swapped in while its variants run. Needs MLX's Metal or CUDA back-end and a pack
written by `bonsai_mlx.benchmark.random_pack(root, fmt)`:

    python examples/dit_slab_variants.py --format ternary --root /tmp/g --json out.json
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
from profile_speed import JSON, timeit  # this folder: the script's own is first on the path

from bonsai_mlx import kernels
from bonsai_mlx.benchmark import klein_inputs
from bonsai_mlx.execution import Execution
from bonsai_mlx.loading import load_transformer


def half_slab_rows(N: int, K: int, config: kernels.KernelConfig = kernels.DEFAULT_CONFIG) -> int:
    """Rows per slab when a slab holds at most the cap and at most N // 2 rows: no slab is ever
    the whole matrix."""
    cap = min(config.slab_max_elements // K, N // 2)
    mult = config.slab_row_multiple if cap >= config.slab_row_multiple else 1
    cap = max(1, cap - cap % mult)
    rows = -(-N // -(-N // cap))
    return -(-rows // mult) * mult


BASE = kernels.DEFAULT_CONFIG
VARIANTS = {  # name: (config, slab rule)
    "8M, half a matrix": (replace(BASE, slab_max_elements=8 << 20), half_slab_rows),
    "16M, half a matrix": (replace(BASE, slab_max_elements=16 << 20), half_slab_rows),
    "8M, a whole matrix": (replace(BASE, slab_max_elements=8 << 20), kernels.slab_rows),
    "16M, a whole matrix": (replace(BASE, slab_max_elements=16 << 20), kernels.slab_rows),
    "16M, ternary from 1536 rows": (replace(BASE, slab_max_elements=16 << 20,
                                            slab_min_m=kernels.ByFormat(binary=1536, ternary=1536)), kernels.slab_rows),
    "16M, binary from 1024 rows": (replace(BASE, slab_max_elements=16 << 20,
                                           slab_min_m=kernels.ByFormat(binary=1024, ternary=1024)), kernels.slab_rows),
    "16M, from 512 rows": (replace(BASE, slab_max_elements=16 << 20,
                                   slab_min_m=kernels.ByFormat(binary=512, ternary=512)), kernels.slab_rows),
}
SETTINGS = {512: [("whole, two in flight", Execution(sync=True, overlap=True)),
                  ("512-token chunks, two in flight", Execution(512, None, True, True))],
            1024: [("whole, two in flight", Execution(sync=True, overlap=True)),
                   ("1024-token chunks, MLP in 2 parts", Execution(1024, None, True, True, hidden_parts=2)),
                   ("1024-token chunks, MLP in 4 parts", Execution(1024, None, True, True, hidden_parts=4)),
                   ("whole, MLP in 2 parts", Execution(sync=True, overlap=True, hidden_parts=2)),
                   ("512-token chunks, two in flight", Execution(512, None, True, True)),
                   ("2048-token chunks, MLP in 2 parts", Execution(2048, None, True, True, hidden_parts=2)),
                   ("2048-token chunks, MLP in 4 parts", Execution(2048, None, True, True, hidden_parts=4))]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", choices=("binary", "ternary"), required=True)
    ap.add_argument("--root", required=True, help="the folder random_pack wrote random-<format> into")
    ap.add_argument("--json", required=True)
    ap.add_argument("--variants", default="", help="a regular expression: only the variants it finds")
    ap.add_argument("--settings", default="", help="a regular expression: only the settings it finds")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--from-rows", type=json.loads, default=[],
                    help="slab_min_m values (both formats) to add, with each --caps cap, as variants, a JSON list")
    ap.add_argument("--decode", type=json.loads, default=[],
                    help='decode tiles to add as variants of the default, a JSON list of [CPT, NSG]')
    ap.add_argument("--caps", type=json.loads, default=[],
                    help="slab caps (millions of 2**20 weights) to add as variants of the default, a JSON list")
    args = ap.parse_args()
    for cap in args.caps:
        VARIANTS[f"{cap}M, a whole matrix"] = (replace(BASE, slab_max_elements=cap << 20), kernels.slab_rows)
        for m in args.from_rows:
            VARIANTS[f"{cap}M, a whole matrix, from {m} rows"] = (
                replace(BASE, slab_max_elements=cap << 20, slab_min_m=kernels.ByFormat(binary=m, ternary=m)),
                kernels.slab_rows)
    for cpt, nsg in args.decode:
        VARIANTS[f"16M, a whole matrix, decode {cpt}x{nsg}"] = (
            replace(BASE, decode=kernels.DecodeTile(cpt, nsg)), kernels.slab_rows)
    JSON[0] = args.json
    if not any(re.search(args.variants, name) for name in VARIANTS) or not any(
            re.search(args.settings, f"{size} {label}") for size, settings in SETTINGS.items() for label, _ in settings):
        raise SystemExit(f"no variant matches {args.variants!r} or no setting matches {args.settings!r}")
    model = load_transformer(Path(args.root) / f"random-{args.format}", dtype=mx.bfloat16)
    mx.eval(model.parameters())
    rule = kernels.slab_rows
    try:
        for size, settings in SETTINGS.items():
            inp = klein_inputs(model.config, size, size, 512, mx.bfloat16)
            ctx, mods = model.prepare(inp[1], inp[3], inp[4]), model.modulations(inp[2], mx.bfloat16)
            mx.eval(inp, ctx, mods)
            for rnd in range(args.rounds):
                for name, (config, slab_rule) in VARIANTS.items():
                    if not re.search(args.variants, name):
                        continue
                    kernels.slab_rows = slab_rule
                    kernels._plan_cached.cache_clear()  # plans of another rule under an equal config
                    for label, ex in settings:
                        if not re.search(args.settings, f"{size} {label}"):
                            continue
                        with kernels.tuned(config):
                            timeit(f"dit step {size} {args.format} {name}, {label}",
                                   lambda: model.forward(inp[0], mods, ctx, execution=ex),
                                   fmt=args.format, size=size, variant=name, setting=label, round=rnd)
    finally:
        kernels.slab_rows = rule
        kernels._plan_cached.cache_clear()

if __name__ == "__main__":
    main()
