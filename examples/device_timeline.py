"""The device's timeline of whole generations, stage by stage: how long the GPU ran kernels,
how long it sat idle, and what the host did meanwhile (MLX starting parts with async_eval,
waiting in eval or synchronize, CUDA runtime and driver calls). PyTorch's profiler traces
through CUPTI, which records every kernel and runtime call of the process, MLX's included;
the script marks MLX's evaluations and the pipeline's stages as annotations in that trace.

Each budget gets a fresh pipeline on a random pack, `--warm` untraced generations, then one
traced generation. The summary per stage (JSON): the stage's wall time, the union of kernel
time (busy), the idle gaps (by length, and what the host was in during them), kernel time
by kernel name, and runtime calls by name split by what MLX call they ran inside. Needs
MLX's CUDA back-end and PyTorch with CUDA:

    python examples/device_timeline.py --format binary --root /tmp/g --size 1024 \\
        --budgets target none --warm 2 --json out.json [--trace-dir DIR]
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import gzip
import json
import os
import shutil
import tempfile
from collections import defaultdict

import mlx.core as mx

from bonsai_mlx import memory
from bonsai_mlx.benchmark import PROMPTS, choose_plan, open_random_pipeline, random_pack, timed_generation

HOST_CALLS = ("async_eval", "eval", "synchronize")
DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
API_CATS = {"cuda_runtime", "cuda_driver"}


def annotate(torch):
    """Mark MLX's evaluations and the pipeline's stages in the trace: `mx.<call>` and
    `stage:<name>` annotations (record_function)."""
    def marked(name, fn):
        def call(*a, **k):
            with torch.profiler.record_function(name):
                return fn(*a, **k)
        return call

    for name in HOST_CALLS:
        setattr(mx, name, marked(f"mx.{name}", getattr(mx, name)))
    plain = memory.MemoryMonitor.stage

    @contextlib.contextmanager
    def stage(self, name):
        with torch.profiler.record_function(f"stage:{name}"), plain(self, name):
            yield
    memory.MemoryMonitor.stage = stage


def merged(spans):
    """The union of [start, end) spans, sorted."""
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def overlap(spans, a, b, starts=None):
    """Time of the sorted, disjoint `spans` inside [a, b)."""
    starts = starts if starts is not None else [s for s, _ in spans]
    i, total = max(bisect.bisect_right(starts, a) - 1, 0), 0.0
    while i < len(spans) and spans[i][0] < b:
        total += max(0.0, min(b, spans[i][1]) - max(a, spans[i][0]))
        i += 1
    return total


def inside(spans, starts, t):
    """Whether time t lies in one of the sorted, disjoint `spans`."""
    i = bisect.bisect_right(starts, t) - 1
    return i >= 0 and spans[i][0] <= t < spans[i][1]


def summarize(events, w0, w1, top=15):
    """One stage [w0, w1) (microseconds) of a trace's complete events. Kernels and host calls
    that cross the stage's edges count for their part inside it; runtime calls count only on
    the thread that runs MLX's evaluations (the one that made the `mx.` annotations)."""
    span = lambda e: (e["ts"], e["ts"] + e.get("dur", 0))  # noqa: E731
    clip = lambda spans: [[max(w0, a), min(w1, b)] for a, b in spans if a < w1 and b > w0]  # noqa: E731
    device = [e for e in events if e.get("cat", "").lower() in DEVICE_CATS and clip([span(e)])]
    busy = merged(clip(map(span, device)))
    marks = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("mx.")]
    host = {c: merged(clip(span(e) for e in marks if e["name"] == f"mx.{c}")) for c in HOST_CALLS}
    main_tids = {e.get("tid") for e in marks}
    # idle gaps of the device, and what the host was in during them
    edges = [w0] + [x for s in busy for x in s] + [w1]
    gaps = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b > a]
    idle = sum(b - a for a, b in gaps)
    starts = {c: [s for s, _ in host[c]] for c in HOST_CALLS}
    by_host = {c: sum(overlap(host[c], a, b, starts[c]) for a, b in gaps) for c in HOST_CALLS}
    by_host["outside mx calls"] = idle - sum(by_host.values())  # Python building parts, and the rest
    sizes = {"<10 us": 0.0, "10-100 us": 0.0, "0.1-1 ms": 0.0, ">1 ms": 0.0}
    for a, b in gaps:
        d = b - a
        sizes["<10 us" if d < 10 else "10-100 us" if d < 100 else "0.1-1 ms" if d < 1000 else ">1 ms"] += d
    kernels = defaultdict(lambda: [0, 0.0])
    for e in device:
        k = kernels[e["name"][:90]]
        k[0] += 1
        k[1] += e.get("dur", 0)
    # runtime / driver calls on MLX's thread by name, by the MLX call they ran inside
    calls = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    for e in events:
        if e.get("cat", "").lower() not in API_CATS or e.get("tid") not in main_tids or not w0 <= e["ts"] < w1:
            continue
        where = next((c for c in HOST_CALLS if inside(host[c], starts[c], e["ts"])), "outside")
        c = calls[where][e["name"]]
        c[0] += 1
        c[1] += e.get("dur", 0)
    ms = lambda us: round(us / 1e3, 3)  # noqa: E731
    return {
        "wall_ms": ms(w1 - w0), "busy_ms": ms(sum(b - a for a, b in busy)), "idle_ms": ms(idle),
        "device_events": len(device), "device_event_ms": ms(sum(e.get("dur", 0) for e in device)),
        "host_ms": {c: ms(sum(b - a for a, b in host[c])) for c in HOST_CALLS},
        "host_calls": {c: len(host[c]) for c in HOST_CALLS},
        "idle_while_ms": {k: ms(v) for k, v in by_host.items()},
        "idle_gaps_ms": {k: ms(v) for k, v in sizes.items()},
        "largest_gaps_ms": sorted((ms(b - a) for a, b in gaps), reverse=True)[:10],
        "kernel_time_by_name": [{"name": n, "count": c, "ms": ms(t)}
                                for n, (c, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]],
        "api_total_ms": {where: ms(sum(t for _, t in d.values())) for where, d in calls.items()},
        "api_by_caller": {where: [{"name": n, "count": c, "ms": ms(t)}
                                  for n, (c, t) in sorted(d.items(), key=lambda kv: -kv[1][1])[:top]]
                          for where, d in calls.items()},
    }


def stages_of(events):
    """{stage name: (start, end)} from the `stage:` annotations (the traced generation's)."""
    return {e["name"][6:]: (e["ts"], e["ts"] + e["dur"]) for e in events
            if e.get("cat") == "user_annotation" and e["name"].startswith("stage:")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", choices=("binary", "ternary"), required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--budgets", nargs="+", default=["target", "none"])
    ap.add_argument("--warm", type=int, default=2, help="untraced generations before the traced one")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", required=True)
    ap.add_argument("--trace-dir", help="also keep each traced generation's Chrome trace, gzipped")
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    annotate(torch)
    pack = random_pack(args.root, args.format)
    out = {"format": args.format, "size": args.size, "runs": []}
    for label in args.budgets:
        pipe, rec, _ = open_random_pipeline(pack, args.format, args.size, label, args.dtype, (9, 18, 27))
        plan = choose_plan(pipe, args.size, rec)
        name = f"{args.format} {args.size} {label}"
        rec["untraced"] = [timed_generation(pipe, PROMPTS[g % len(PROMPTS)], args.size, 4, g, plan,
                                            label=f"{name} #{g + 1}") for g in range(args.warm)]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            rec["traced"] = timed_generation(pipe, PROMPTS[0], args.size, 4, args.warm, plan,
                                             label=f"{name} traced")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "ts" in e]
            if args.trace_dir:
                os.makedirs(args.trace_dir, exist_ok=True)
                with open(path, "rb") as f, gzip.open(os.path.join(
                        args.trace_dir, f"trace-{args.format}-{args.size}-{label}.json.gz"), "wb") as g:
                    shutil.copyfileobj(f, g)
        for e in events:
            e["ts"] = float(e["ts"])
        rec["stages"] = {s: summarize(events, a, b) for s, (a, b) in stages_of(events).items()}
        out["runs"].append(rec)
        for s, v in rec["stages"].items():
            print(f"[{name}] {s}: wall {v['wall_ms']} ms, busy {v['busy_ms']}, idle {v['idle_ms']} "
                  f"(while {v['idle_while_ms']}), host {v['host_ms']}", flush=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        del pipe
        mx.clear_cache()


if __name__ == "__main__":
    main()
