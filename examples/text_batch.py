"""Streamed and resident encodes of B new prompts in one call: time and peak."""
import json, os, sys, time
import mlx.core as mx
from bonsai_mlx.text_encoder import load_text_encoder
pack = sys.argv[1]
te = load_text_encoder(pack, dtype=mx.bfloat16, resident=False)
n = [0]
def prompts(b):
    out = [f"prompt number {n[0] + i}: a {['red','blue','green'][i % 3]} shape, {i} times" for i in range(b)]
    n[0] += b
    return out
res = []
def rec(**kw):
    print(json.dumps(kw), flush=True); res.append(kw)
mx.eval(te.encode(prompts(1), stream=True))  # warm-up
for mode in ("streamed", "resident"):
    if mode == "resident":
        te.load()
    for b in (1, 1, 4, 4, 8, 16, 16, 32):
        mx.synchronize(); mx.clear_cache(); mx.reset_peak_memory()
        base = mx.get_active_memory()
        t = time.perf_counter()
        mx.eval(te.encode(prompts(b), stream=mode == "streamed", sync=True))
        mx.synchronize()
        s = time.perf_counter() - t
        rec(mode=mode, batch=b, s=round(s, 4), per_prompt_ms=round(1e3 * s / b, 1),
            extra_peak_gb=round((mx.get_peak_memory() - base) / 1e9, 3))
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/text-batch.json", "w"), indent=1)
