"""Where the memory of a budgeted generation goes, part by part, at full size.

Writes a random binary pack (`random_weights.write_random_pack`) and loads it, then reports
for each part (transformer forwards and blocks at 512/1024, attention, RoPE, packed linears,
the VAE's mid block, up blocks, convolutions, GroupNorm and whole decodes) the peak
`mx.get_peak_memory()` above what was live before the call, as JSON lines and in
$OUT/profile.json. Meant for the GPU device (docs/benchmarks.md, issue 5); on a CPU it runs
for hours.

    python examples/profile_memory.py
"""
import gc
import json
import os
import time

import mlx.core as mx
import mlx.nn as nn

from bonsai_mlx.random_weights import write_random_pack
from bonsai_mlx.pipeline import BonsaiPipeline, image_ids, text_ids
from bonsai_mlx.benchmark import klein_inputs
from bonsai_mlx.execution import Execution
from bonsai_mlx.memory import smallest_plan
from bonsai_mlx import transformer as T

OUT = os.environ.get("OUT", "/tmp")
res = []

def delta(name, f, **kw):
    gc.collect(); mx.synchronize(); mx.clear_cache()
    base = mx.get_active_memory(); mx.reset_peak_memory()
    t = time.perf_counter()
    try:
        out = f(); mx.eval(out); mx.synchronize()
        err = None
    except Exception as e:
        out, err = None, repr(e)[:300]
    dt = time.perf_counter() - t
    r = dict(name=name, base_mb=base / 1e6, extra_peak_mb=(mx.get_peak_memory() - base) / 1e6, s=dt, err=err, **kw)
    print(json.dumps(r), flush=True); res.append(r)
    return out

def dump():
    json.dump(res, open(f"{OUT}/profile.json", "w"), indent=1)

root = "/tmp/prof/random-binary"
t = time.perf_counter()
if not os.path.exists(root + "/model_index.json"):
    write_random_pack(root, "binary")
print("pack", time.perf_counter() - t, flush=True)
pipe = BonsaiPipeline.from_pretrained(root, dtype=mx.bfloat16)
m, vae = pipe.transformer, pipe.vae
fp = pipe.footprint()
print("footprint", fp, flush=True)
res.append(dict(name="footprint", **{k: getattr(fp, k) for k in fp.__dataclass_fields__}))
for size in (512, 1024):
    p = smallest_plan(fp, size, size)
    res.append(dict(name=f"smallest_plan {size}", plan=str(p)))
    print(p, flush=True)

def section_transformer():
    for size in (1024, 512):
        inp = klein_inputs(m.config, size, size, 512, mx.bfloat16); mx.eval(inp)
        for attn, tok in ((None, 512), (None, 256), (None, None)):
            ex = Execution(tok, attn, sync=True)
            delta(f"forward {size} attn={attn} tok={tok}", lambda: m(*inp, execution=ex))
        ex = Execution(512, None, sync=True)
        delta(f"forward {size} timed again attn=None tok=512", lambda: m(*inp, execution=ex))
    dump()

    D, H = 3072, 24
    for L in (4608, 1536):
        q, k, v = (mx.random.normal((1, L, H, 128)).astype(mx.bfloat16) for _ in range(3)); mx.eval(q, k, v)
        for ch in (None, 256, 1024):
            delta(f"attention L={L} chunk={ch}", lambda: T.attention(q, k, v, ch))
        qt, kt, vt = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
        qc, kc, vc = (mx.contiguous(a) for a in (qt, kt, vt)); mx.eval(qc, kc, vc)
        delta(f"sdpa contiguous L={L}", lambda: mx.fast.scaled_dot_product_attention(qc, kc, vc, scale=128**-0.5))
        rot = T.rope_rotation(mx.zeros((L, 4), dtype=mx.int32) + mx.arange(L)[:, None].astype(mx.int32), (32, 32, 32, 32), 2000.0)
        mx.eval(rot)
        delta(f"rope L={L}", lambda: T.apply_rope(q, rot))
        del q, k, v, qt, kt, vt, qc, kc, vc
        x = mx.random.normal((1, L, D)).astype(mx.bfloat16); mx.eval(x)
        rope = T.rope_rotation(mx.concatenate([text_ids(512), image_ids((L - 512) // 64, 64)]) if L > 512 else text_ids(L), m.config.axes_dims_rope, m.config.rope_theta)
        mx.eval(rope)
        temb = mx.random.normal((1, D)).astype(mx.bfloat16)
        ms = m.single_stream_modulation(temb); mi = m.double_stream_modulation_img(temb); mt = m.double_stream_modulation_txt(temb)
        mx.eval(ms, mi, mt)
        sb, db = m.single_transformer_blocks[0], m.transformer_blocks[0]
        for attn, tok in ((None, 512), (None, None)):
            ex = Execution(tok, attn, sync=True)
            delta(f"single block L={L} attn={attn} tok={tok}", lambda: sb(x, ms, rope, ex))
            delta(f"double block L={L} attn={attn} tok={tok}", lambda: db(x[:, 512:], x[:, :512], mi, mt, rope, ex))
        lin = sb.attn.to_qkv_mlp_proj
        for M in (512, 1536):
            delta(f"packed linear M={M} N=27648", lambda: lin(x[:, :M]))
        del x
    dump()

def section_vae():
    dec = vae.decoder
    for size in (512, 1024):
        lat = size // 8
        z = mx.random.normal((1, lat, lat, 32)).astype(mx.float16); mx.eval(z)
        pace = Execution(sync=True).pace()
        h = delta(f"vae mid {size}", lambda: dec.mid(z, pace))
        for tile in (128, 256):
            w = min(tile // 8 + 26, lat)
            hw = h[:, :w, :w]; mx.eval(hw)
            x = hw
            for i, b in enumerate(dec.up_blocks):
                x = delta(f"vae up block {i} tile={tile} size={size} in={list(x.shape)}", lambda: b(x, pace=pace))
            delta(f"vae conv_out tile={tile} in={list(x.shape)}", lambda: dec.conv_out(dec.conv_norm_out(x, silu=True)))
        del h
    c256 = nn.Conv2d(256, 256, 3, padding=1); c256.set_dtype(mx.float16) if hasattr(c256, "set_dtype") else None
    c256.update({"weight": c256.weight.astype(mx.float16), "bias": c256.bias.astype(mx.float16)})
    c128 = nn.Conv2d(128, 128, 3, padding=1)
    c128.update({"weight": c128.weight.astype(mx.float16), "bias": c128.bias.astype(mx.float16)})
    for side in (336, 464):
        a = mx.random.normal((1, side, side, 256)).astype(mx.float16); mx.eval(a)
        delta(f"conv3x3 256 at {side} (in {a.nbytes/1e6:.0f} MB)", lambda: c256(a))
        gn = dec.up_blocks[2].resnets[1].norm1
        delta(f"groupnorm 256 at {side}", lambda: gn(a))
        delta(f"norm+silu+conv 256 at {side}", lambda: c256(nn.silu(gn(a))))
        b = mx.random.normal((1, side, side, 128)).astype(mx.float16); mx.eval(b)
        delta(f"conv3x3 128 at {side}", lambda: c128(b))
        del a, b
    dump()
    x512 = mx.random.normal((1, 1024, 128)).astype(mx.float16)
    x1024 = mx.random.normal((1, 4096, 128)).astype(mx.float16); mx.eval(x512, x1024)
    for size, tok, tiles in ((512, x512, (None, 128, 256, 384)), (1024, x1024, (128, 256, 384, 512))):
        for tile in tiles:
            delta(f"decode {size} tile={tile}", lambda: vae.decode_tokens(tok, size, size, tile_size=tile, overlap=16,
                                                                          execution=Execution(sync=True)))
            dump()
for sec in (section_transformer, section_vae):
    try:
        sec()
    except Exception as e:
        import traceback; traceback.print_exc(); res.append(dict(name=sec.__name__, err=repr(e)[:500]))
    dump()
print("done", flush=True)
