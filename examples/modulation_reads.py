"""What a new schedule's modulations cost: every step's modulation vectors computed with the
modulation layers resident, and with them read from disk first and left there again
(`MemoryPlan.keep_modulation` False), on a random pack at the real shapes.

    python examples/modulation_reads.py --root /tmp/g --format binary --json out.json

Each timed call takes sigmas no call took before (another step count), so nothing is kept
from an earlier one; the first round warms up and is not recorded.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx

from bonsai_mlx.benchmark import random_pack
from bonsai_mlx.pipeline import BonsaiPipeline
from bonsai_mlx.scheduler import flux2_sigmas


def timed(models, steps: int, keep: bool) -> float:
    """ms to compute (and, with `keep` False, to leave on disk) the modulations of `steps` steps."""
    sigmas = flux2_sigmas(steps, 4096)[:-1]
    mx.synchronize()
    t = time.perf_counter()
    models.modulations(sigmas, keep=keep)
    mx.synchronize()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--format", default="binary")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    pipe = BonsaiPipeline.from_pretrained(random_pack(args.root, args.format), dtype=mx.bfloat16)
    models = pipe.models
    steps = iter(range(2, 10_000))
    out = {"format": args.format, "device": str(mx.default_device()),
           "modulation_bytes": models.transformer_info["modulation_bytes"], "resident_ms": [], "from_disk_ms": []}
    for rnd in range(args.rounds + 1):
        timed(models, next(steps), keep=True)  # reads them where they are on disk: resident from here
        n = next(steps)
        resident = timed(models, n, keep=True)
        models.modulations(flux2_sigmas(n, 4096)[:-1], keep=False)  # kept sigmas: only leaves them on disk
        from_disk = timed(models, next(steps), keep=False)  # read, computed, left on disk again
        if rnd:
            out["resident_ms"].append(resident)
            out["from_disk_ms"].append(from_disk)
        print(f"round {rnd}: resident {resident:.1f} ms, from disk {from_disk:.1f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
