"""DiT steps with the double and the single blocks run under different executions.

The double-stream blocks hold more decoded weights per part than the single ones (both
streams' MLPs: 2 x D x 2F in, 2 x F x D out, against D x 2F and (D + F) x D), so a budget
that keeps the doubles in MLP passes or token chunks may leave the singles whole. For each
variant: the step's time (median of 5) and the host's time starting and waiting for parts,
its extra peak above the weights, and the peak of each kind's blocks alone (the step run
again with a synchronize between the kinds). A format's first variant's host times include
the kernel builds of its warm-ups.

    python examples/block_kinds.py --root /tmp/g --formats binary ternary --sizes 512 1024 [--tiny]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from contextlib import nullcontext

import mlx.core as mx

sys.path.insert(0, os.path.dirname(__file__))
import profile_speed as P  # noqa: E402  (timing helpers, the pace instrumentation)

from bonsai_mlx import transformer as T  # noqa: E402
from bonsai_mlx.benchmark import klein_inputs, random_transformer  # noqa: E402
from bonsai_mlx.config import KLEIN_4B, TransformerConfig  # noqa: E402
from bonsai_mlx.execution import Execution  # noqa: E402
from bonsai_mlx.executor import packed_info, slab_tuning  # noqa: E402
from bonsai_mlx.loading import load_transformer  # noqa: E402
from bonsai_mlx.memory import MemoryPlan  # noqa: E402

RUNS, WARMUP = 5, 2  # timed steps and warm-ups per variant (the host's times are per step over both)


def ex(chunk=None, parts=1):
    return Execution(chunk, None, True, True, hidden_parts=parts, attention_apart=True)


# label: (the double blocks' execution, the single blocks', whole slabs)
VARIANTS = {
    "whole / whole": (ex(), ex(), True),
    "2 passes / 2 passes": (ex(parts=2), ex(parts=2), True),
    "2 passes / whole": (ex(parts=2), ex(), True),
    "1536 chunks, 2 passes / same, kernels' slabs": (ex(1536, 2), ex(1536, 2), False),
    "4 passes / 2 passes": (ex(parts=4), ex(parts=2), True),
    "1536 chunks, 2 passes / 2 passes": (ex(1536, 2), ex(parts=2), True),
}


def forward(m, x, mods, ctx, ex_double: Execution, ex_single: Execution, between=None):
    """Flux2Transformer.forward (without reference tokens) with each kind of block under its
    own execution: the model's forward takes one for all its blocks."""
    img, txt = m.x_embedder(x), ctx.txt
    pace = ex_double.pace()
    for block in m.transformer_blocks:
        img, txt = block(img, txt, mods.img, mods.txt, ctx.rope, ex_double)
        pace(img, txt)
    if between:
        between(img, txt)
    L_txt, L_img = txt.shape[1], img.shape[1]
    h = mx.concatenate([txt, img], axis=1)
    pace = ex_single.pace()
    for block in m.single_transformer_blocks:
        h = block(h, mods.single, ctx.rope, ex_single)
        pace(h)
    return m.proj_out(m.norm_out(h[:, L_txt:L_txt + L_img], mods.out))


def kind_peaks(m, inp, mods, ctx, exd, exs):
    """Extra peak of the double blocks, then of the single blocks (a synchronize between)."""
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    peaks = []

    def between(img, txt):
        mx.eval(img, txt)
        mx.synchronize()
        peaks.append(mx.get_peak_memory() - base)
        mx.reset_peak_memory()

    mx.eval(forward(m, inp[0], mods, ctx, exd, exs, between))
    mx.synchronize()
    peaks.append(mx.get_peak_memory() - base)
    return peaks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/g")
    ap.add_argument("--formats", nargs="+", default=["binary", "ternary"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    ap.add_argument("--variants", default="", help="a regex over the variant labels")
    ap.add_argument("--tiny", action="store_true", help="a small dense model: a smoke test")
    ap.add_argument("--no-input-wait", action="store_true",
                    help="blocks in MLP passes start their attention without waiting for the block's inputs "
                         "(transformer._block_inputs returns nothing)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "block_kinds.json"))
    a = ap.parse_args()
    P.JSON[0] = a.json
    P.record("device", device=str(mx.default_device()), mlx=mx.__version__)
    P._instrument_pace()
    if a.no_input_wait:
        T._block_inputs = lambda ex, chunked, after: ()
    cfg = (TransformerConfig(num_layers=1, num_single_layers=2, num_attention_heads=2, joint_attention_dim=256,
                             in_channels=32) if a.tiny else KLEIN_4B)
    txt_len = 64 if a.tiny else 512
    for fmt in (["dense"] if a.tiny else a.formats):
        m = (random_transformer(cfg, mx.bfloat16) if a.tiny
             else load_transformer(os.path.join(a.root, f"random-{fmt}"), dtype=mx.bfloat16))
        mx.eval(m.parameters())
        info = packed_info(m, mx.bfloat16)
        for size in ([128, 256] if a.tiny else a.sizes):
            inp = klein_inputs(cfg, size, size, txt_len, mx.bfloat16)
            ctx, mods = m.prepare(inp[1], inp[3], inp[4]), m.modulations(inp[2], mx.bfloat16)
            mx.eval(inp, ctx, mods)
            for label, (exd, exs, whole) in VARIANTS.items():
                if a.variants and not re.search(a.variants, label):
                    continue
                tuning = slab_tuning(info, MemoryPlan(whole_slabs=True)) if whole else nullcontext()
                name = f"{fmt} {size} {label}" + (", no input wait" if a.no_input_wait else "")
                P.HOST.update(encode=0.0, wait=0.0)
                with tuning:
                    t = time.perf_counter()
                    ms = P.timeit(f"step {name}", lambda: forward(m, inp[0], mods, ctx, exd, exs), runs=RUNS,
                                  warmup=WARMUP)
                    host = {f"{k}_ms": 1e3 * v / (RUNS + WARMUP) for k, v in P.HOST.items()}
                    peaks = kind_peaks(m, inp, mods, ctx, exd, exs)
                P.record(f"kinds {name}", step_ms=ms, double_peak_mb=peaks[0] / 1e6, single_peak_mb=peaks[1] / 1e6,
                         s=time.perf_counter() - t, **host)
        del m
        gc.collect()
        mx.clear_cache()
    print(json.dumps({"done": a.json}))


if __name__ == "__main__":
    main()
