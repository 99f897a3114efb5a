"""Whole generations under a budget with the plan the planner gives and with variants of its
token chunks and MLP passes, or of its decode's strips, on a random full-size pack, in one
process: what a plan the estimate does not admit would peak at and take, under the same MLX
limits.

Each variant replaces only `token_chunk` and `hidden_parts` (`--variants`), `vae_strip` and
`vae_overlap` (`--decodes`) or, with `--split-slabs`, `whole_slabs` (the kernels' slabs instead)
of the planned plan; it runs with the budget's memory limits, as a
planned run does, and records the estimates the planner gives its plan at that budget
(`memory.budgeted`: the budget for a stage that fits only with the pacer's flush).
`--unlimited` runs the planned plan again without the budget's MLX limits, second: what the
limits themselves cost. `--none` adds the unconstrained run last (its cache would crowd the
others). Needs MLX's Metal
or CUDA back-end and a pack written by `bonsai_mlx.benchmark.random_pack(root, fmt)`:

    python examples/plan_variants.py --format binary --root /tmp/g --size 1024 --budget target \\
        --variants "[[1536, 2], [2048, 2]]" --decodes "[[16, true]]" --none --json out.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from bonsai_mlx.benchmark import PROMPTS, choose_plan, open_random_pipeline, random_pack, timed_generation
from bonsai_mlx.memory import GB, budgeted, describe


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", choices=("binary", "ternary"), required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--budget", default="target", help="'target' (the format and size's) or a size")
    ap.add_argument("--variants", type=json.loads, default=[],
                    help='[token_chunk or null, hidden_parts] pairs, a JSON list')
    ap.add_argument("--decodes", type=json.loads, default=[],
                    help='[vae_strip or null, two strips in flight (true / false)] pairs, a JSON list')
    ap.add_argument("--split-slabs", action="store_true",
                    help="also run the planned plan with the kernels' slabs where it decodes each matrix whole")
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--none", action="store_true", help="also run without limits, last")
    ap.add_argument("--unlimited", action="store_true",
                    help="also run the planned plan without the budget's MLX memory and cache limits, second")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-flush", action="store_true",
                    help="run without the pacer's flush (MemoryPlan.paced_execution); on MLX's CUDA "
                         "back-end a one-part-at-a-time decode then runs strict instead of ahead")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    pack = random_pack(args.root, args.format)
    out = {"format": args.format, "size": args.size, "budget": args.budget, "runs": []}

    def run(label, budget, variant=None, plan=None):
        """Run `label`'s generations; returns the plan they ran."""
        pipe, rec, _ = open_random_pipeline(pack, args.format, args.size, budget, args.dtype, (9, 18, 27))
        if plan is None:
            plan = choose_plan(pipe, args.size, rec)
        else:  # a plan chosen under another budget, run here without MLX's limits
            rec["plan"] = {"described": describe(plan), "estimated_peak_bytes": plan.estimated_peak_bytes,
                           "stage_estimates": plan.stage_estimates}
        if variant is not None:
            plan = dataclasses.replace(plan, **variant)
            # whole slabs go with steps over all tokens only, as the planner offers them
            variant = {**variant, "whole_slabs": plan.whole_slabs and not plan.token_chunk and variant.get(
                "whole_slabs", True)}
            plan = budgeted(dataclasses.replace(plan, **variant), pipe.footprint(), args.size, args.size,
                            int(round(rec["budget_gb"] * GB)))
            rec["plan"].update(**variant, described=describe(plan), estimated_peak_bytes=plan.estimated_peak_bytes,
                               stage_estimates=plan.stage_estimates, part_bytes=plan.part_bytes,
                               vae_part_bytes=plan.vae_part_bytes)
        if args.no_flush:
            plan = dataclasses.replace(plan, part_bytes=0, vae_part_bytes=0)
        rec["variant"], rec["flush"] = label, not args.no_flush
        rec["generations"] = [timed_generation(pipe, PROMPTS[g % len(PROMPTS)], args.size, 4, g, plan,
                                               label=f"{args.format} {args.size} {label} #{g + 1}")
                              for g in range(args.generations)]
        out["runs"].append(rec)
        print(f"{label}: estimate {rec['plan']['estimated_peak_bytes'] / GB:.3f} GB; "
              + "; ".join(f"peak {g['memory']['peak_gb']:.3f} GB, denoising {g['timings']['denoising_s']:.3f} s"
                          for g in rec["generations"]), flush=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        return plan

    planned = run("planned", args.budget)
    if args.unlimited:
        run("planned, without MLX's limits", "none", plan=planned)
    if args.split_slabs:
        run("planned, the kernels' slabs", args.budget, dict(whole_slabs=False))
    for chunk, parts in args.variants:
        run(f"{f'{chunk}-token chunks' if chunk else 'all tokens'}, MLP in {parts} passes", args.budget,
            dict(token_chunk=chunk, hidden_parts=parts))
    for strip, two in args.decodes:
        run(f"decode {f'in {strip}-row strips' if strip else 'whole'}, {'two' if two else 'one'} in flight",
            args.budget, dict(vae_strip=strip, vae_overlap=two))
    if args.none:
        run("none", "none")


if __name__ == "__main__":
    main()
