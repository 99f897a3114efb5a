"""Where a paced DiT step peaks: the extra peak memory of each part a `Pace` evaluates, in order,
for one full-size step of a random pack under chosen executions.

Every pace call is wrapped: strict, the peak since the previous call is read right after the
part's evaluation; two in flight, right after the wait for the part before. Each record names
the calling module function and line (the part: a block's q/k/v chunk, its attention, an MLP
pass, an output chunk, a whole block), the bytes live and the peak above the step's start,
then the peak is reset. Needs MLX's Metal or CUDA back-end and a pack written by
`bonsai_mlx.benchmark.random_pack(root, fmt)`:

    python examples/part_peaks.py --format ternary --root /tmp/g --sizes "[1024]" --json out.json

Each setting is first timed untraced (profile_speed.timeit: median of 5 after 2 warm-ups, with
its extra peak, into `<json>.steps.json`), then run traced `--repeat` times, each run its own
record (the spread of one setting's peak within a process). `--memory-limit` sets MLX's memory
and cache limits as a budgeted generation does.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import mlx.core as mx
from profile_speed import JSON, timeit  # this folder: the script's own is first on the path

from bonsai_mlx import execution
from bonsai_mlx.benchmark import klein_inputs
from bonsai_mlx.execution import Execution
from bonsai_mlx.loading import load_transformer
from bonsai_mlx.memory import parse_bytes


def settings(size: int) -> dict:
    """Name -> Execution keywords: whole blocks, MLP passes over all tokens, token chunks with
    passes, each two in flight."""
    out = {"whole blocks": {}}
    for parts in (2, 4, 8):
        out[f"MLP in {parts} parts"] = dict(hidden_parts=parts)
    for chunk in (2048, 1536, 1152, 1024, 768, 512):
        for parts in (1, 2, 4):
            if chunk < size * size // 256:
                out[f"{chunk}-token chunks" + (f", MLP in {parts} parts" if parts > 1 else "")] = dict(
                    token_chunk=chunk, hidden_parts=parts)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", choices=("binary", "ternary"), required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--sizes", type=json.loads, default=[512, 1024])
    ap.add_argument("--settings", default="", help="a regular expression over the setting names")
    ap.add_argument("--json", required=True)
    ap.add_argument("--tag", default="", help="recorded with every row (which code ran)")
    ap.add_argument("--repeat", type=int, default=1, help="traced steps per setting, each recorded")
    ap.add_argument("--memory-limit", help="MLX's memory limit and cache limit while the steps run (e.g. 2.2GB), "
                                           "as a budgeted generation sets them")
    ap.add_argument("--flush-above", help="Execution.flush_above for every setting (e.g. 1.6GB)")
    args = ap.parse_args()
    JSON[0] = args.json + ".steps.json"
    if not any(re.search(args.settings, f"{size} {name}") for size in args.sizes for name in settings(size)):
        raise SystemExit(f"no setting matches {args.settings!r} at sizes {args.sizes}")

    model = load_transformer(Path(args.root) / f"random-{args.format}", dtype=mx.bfloat16)
    mx.eval(model.parameters())
    if args.memory_limit:
        limit = parse_bytes(args.memory_limit)
        mx.set_memory_limit(limit)
        mx.set_cache_limit(limit)
    log: list[dict] = []
    base = [0]
    original = execution.Pace.__call__

    def traced(self, *arrays, wait=()):
        original(self, *arrays, wait=wait)
        if not self.active:
            return
        caller = sys._getframe(1)
        log.append(dict(at=f"{Path(caller.f_code.co_filename).stem}.{caller.f_code.co_name}:{caller.f_lineno}",
                        active_mb=(mx.get_active_memory() - base[0]) / 1e6, cache_mb=mx.get_cache_memory() / 1e6,
                        peak_mb=(mx.get_peak_memory() - base[0]) / 1e6))
        mx.reset_peak_memory()

    out = []
    try:
        for size in args.sizes:
            inp = klein_inputs(model.config, size, size, 512, mx.bfloat16)
            ctx, mods = model.prepare(inp[1], inp[3], inp[4]), model.modulations(inp[2], mx.bfloat16)
            mx.eval(inp, ctx, mods)
            for name, kw in settings(size).items():
                if not re.search(args.settings, f"{size} {name}"):
                    continue
                ex = Execution(sync=True, overlap=True, **kw,
                               flush_above=parse_bytes(args.flush_above) if args.flush_above else None)
                step = lambda: model.forward(inp[0], mods, ctx, execution=ex)
                ms = timeit(f"dit step {size} {args.format} {name}", step, fmt=args.format, size=size,
                            setting=name, tag=args.tag)
                for run in range(args.repeat):
                    execution.Pace.__call__ = traced
                    log.clear()
                    mx.synchronize()
                    base[0] = mx.get_active_memory()
                    mx.reset_peak_memory()
                    mx.eval(step())
                    mx.synchronize()
                    execution.Pace.__call__ = original
                    top = sorted(range(len(log)), key=lambda i: -log[i]["peak_mb"])[:8]
                    rec = dict(fmt=args.format, size=size, setting=name, tag=args.tag, ms=ms, parts=len(log),
                               run=run, memory_limit=args.memory_limit, flush_above=args.flush_above,
                               step_peak_mb=max([r["peak_mb"] for r in log] + [(mx.get_peak_memory() - base[0]) / 1e6]),
                               top=[dict(index=i, **log[i]) for i in sorted(top)],
                               by_site={at: max(r["peak_mb"] for r in log if r["at"] == at)
                                        for at in {r["at"] for r in log}})
                    out.append(rec)
                    with open(args.json, "w") as f:
                        json.dump(out, f, indent=1)
    finally:
        execution.Pace.__call__ = original


if __name__ == "__main__":
    main()
