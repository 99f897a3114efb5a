"""The spread of the planner's VAE calibration (memory.calibrate_vae) on this device: the full
FLUX.2 VAE (random weights) calibrated again and again in one process, in turn with one run
of each measurement and with memory.calibration_runs()'s repeats (the least counts), each
also with `--flush` (every part waits for the device and its releases before the next). JSON
lines on stdout and in --json: each fit, then per figure and setting the least and the most.

    python examples/calibration_spread.py --rounds 6 --json out.json
"""
from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx

from bonsai_mlx import memory
from bonsai_mlx.random_weights import FLUX2_VAE
from bonsai_mlx.vae import AutoencoderKLFlux2, VAEConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--flush", action="store_true", help="also calibrate with the flush after every part")
    ap.add_argument("--json")
    args = ap.parse_args()
    keep = {k: v for k, v in FLUX2_VAE.items() if k in VAEConfig.__dataclass_fields__}
    vae = AutoencoderKLFlux2(VAEConfig(**keep), has_encoder=False)
    vae.set_dtype(getattr(mx, args.dtype))
    mx.eval(vae.parameters())
    repeats, records = memory.calibration_runs(), []
    settings = [(r, f) for r in sorted({1, repeats}) for f in ((False, True) if args.flush else (False,))]
    for i in range(args.rounds):
        for runs, flush in settings:
            t = time.perf_counter()
            fit = memory.calibrate_vae(vae, runs, flush)
            records.append({"round": i, "runs": runs, "flush": flush, "s": time.perf_counter() - t, **fit})
            print(json.dumps(records[-1]), flush=True)
    spread = {f"{key} ({runs} run{'s' if runs > 1 else ''}{', flush' if flush else ''})":
              [min(r[key] for r in records if (r["runs"], r["flush"]) == (runs, flush)),
               max(r[key] for r in records if (r["runs"], r["flush"]) == (runs, flush))]
              for runs, flush in settings for key in records[0] if key not in ("round", "runs", "flush", "s")}
    print(json.dumps(spread, indent=1))
    if args.json:
        json.dump({"device": str(mx.default_device()), "dtype": args.dtype, "fits": records, "spread": spread},
                  open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
