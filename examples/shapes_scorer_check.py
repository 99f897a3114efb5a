"""Measure the shapes scorer on ground truth: clean renders of every prompt, and the held-out
prompts under blur, noise, JPEG and colour shift at several strengths.

    python examples/shapes_scorer_check.py [--seeds 4] [--json out.json]

Prints one line per setting with the overall and per-category scores (docs/quality.md
quotes its output).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bonsai_mlx.shapes import render, scenes, score
from bonsai_mlx.shapes.degrade import degrade

SWEEPS = {"blur": [1.0, 1.5, 2.0, 2.5, 3.0], "noise": [10, 20, 30, 40, 60], "jpeg": [50, 25, 15, 10, 5],
          "shift": [20, 30, 40, 50, 60]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=4, help="images per prompt")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    out = {}
    every = [s for c in scenes.CATEGORIES for s in scenes.all_specs(c)]
    clean = [(s, score.score_image(s, render.example(s, 10_000 * i + k)[0])) for i, s in enumerate(every)
             for k in range(a.seeds)]
    out["clean, all prompts"] = score.summarize(clean)
    held = [(s, render.example(s, 20_000 * i + k)[0]) for i, s in enumerate(scenes.evaluation_specs())
            for k in range(a.seeds)]
    for kind, amounts in SWEEPS.items():
        for amount in amounts:
            rng = np.random.default_rng(0)
            out[f"{kind} {amount}"] = score.summarize((s, score.score_image(s, degrade(im, kind, amount, rng)))
                                                      for s, im in held)
    for name, r in out.items():
        cats = " ".join(f"{c}={v['score']:.3f}" for c, v in r["categories"].items())
        print(f"{name:>20}: overall {r['overall']:.4f} over {r['images']} images ({cats})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
