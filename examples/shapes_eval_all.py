"""Run `eval-shapes` for several variants in one process (MLX compiles its kernels once),
and tar each variant's report.json and grid.png into one file.

    python examples/shapes_eval_all.py OUT NAME=MODEL[:QUANTIZE[:DTYPE]] ... [--count N] [--seed S]

For example `fp16=exports/fp::float16 ptq-binary=exports/fp:binary qat-binary=exports/binary-pack`.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path

import mlx.core as mx

from bonsai_mlx.shapes.evaluate import eval_shapes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--count", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae", help="VAE folder for every variant (default: each model's own)")
    a = ap.parse_args()
    summary = {}
    for spec in a.variants:
        name, _, rest = spec.partition("=")
        model, quantize, dtype = (rest.split(":") + ["", ""])[:3]
        t = time.perf_counter()
        report = eval_shapes(model, a.out / name, count=a.count, seed=a.seed, quantize=quantize or None,
                             dtype=getattr(mx, dtype) if dtype else None, vae=a.vae)
        summary[name] = {"model": model, "quantize": quantize or None, "dtype": dtype or "bfloat16",
                         "overall": report["overall"], "categories": report["categories"],
                         "seconds": time.perf_counter() - t}
        print(name, json.dumps(summary[name]), flush=True)
        (a.out / "summary.json").write_text(json.dumps(summary, indent=2))
        with tarfile.open(a.out / f"{name}.tar", "w") as tar:
            for f in ("report.json", "grid.png"):
                tar.add(a.out / name / f, arcname=f"{name}/{f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
