"""Many new prompts in one process, as a prompt file runs them: each prompt encoded by its own
generation, against the upcoming prompts encoded ahead in one encode (`encode_prompts`, as
the CLI does), under the default budget and none, in one process. Random weights at full
size from `bonsai_mlx.benchmark.random_pack(root, fmt)`:

    python examples/prompt_batch_bench.py --root /tmp/g --format binary --sizes 512 1024 --prompts 16

JSON on stdout (a line a case) and in --json: wall time of all the generations (encodes
ahead included), the sum of the text-encoding stages, per image, and the peak.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import mlx.core as mx

from bonsai_mlx import BonsaiPipeline
from bonsai_mlx.memory import GB

RES: list[dict] = []


def record(path, **kw):
    print(json.dumps(kw), flush=True)
    RES.append(kw)
    if path:
        json.dump(RES, open(path, "w"), indent=1)


def run(pipe, prompts, size, ahead: bool) -> dict:
    mx.synchronize()
    text, peak, where, batches, t = 0.0, 0.0, "", [], time.perf_counter()
    done: set = set()
    for i, p in enumerate(prompts):
        if ahead and p not in done:
            mx.reset_peak_memory()  # each generation's monitor resets it at its stages
            new = pipe.encode_prompts(prompts[i:], size, size)
            done.update(new)
            batches.append(len(new))
            if mx.get_peak_memory() / GB > peak:
                peak, where = mx.get_peak_memory() / GB, "encode_prompts"
        r = pipe.generate(p, width=size, height=size, seed=i)
        text += r.timings["text_encoding_s"]
        if r.memory["peak_gb"] > peak:
            peak, where = r.memory["peak_gb"], max(r.memory["stages"], key=lambda k: r.memory["stages"][k]["peak_gb"])
    mx.synchronize()
    wall = time.perf_counter() - t
    return dict(wall_s=round(wall, 4), per_image_s=round(wall / len(prompts), 4), text_stages_s=round(text, 4),
                peak_gb=round(peak, 3), peak_stage=where, batches=batches)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/g")
    ap.add_argument("--format", default="binary")
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--budgets", nargs="+", default=["auto", "none"])
    ap.add_argument("--repeats", type=int, default=2, help="runs of each way, alternating")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "prompt-batch.json"))
    a = ap.parse_args()
    pack = os.path.join(a.root, f"random-{a.format}")
    record(a.json, name="device", device=str(mx.default_device()), mlx=mx.__version__)
    n = [0]
    for label in a.budgets:
        pipe = BonsaiPipeline.from_pretrained(pack, dtype=mx.bfloat16, memory_budget=None if label == "none" else label)
        for size in a.sizes:
            pipe.generate("a warm-up prompt, at this size", width=size, height=size, seed=0)
            for ahead in (False, True) * a.repeats:
                prompts = [f"prompt {n[0] + i}: a bonsai, {i % 5} leaves, {'red' if i % 2 else 'blue'} pot"
                           for i in range(a.prompts)]
                n[0] += a.prompts
                record(a.json, name="prompts", format=a.format, budget=label, size=size, prompts=a.prompts,
                       ahead=ahead, **run(pipe, prompts, size, ahead))
        del pipe


if __name__ == "__main__":
    main()
