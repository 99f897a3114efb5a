"""Where the time of a generation goes, part by part, at full size (random weights).

Sections (each fail-soft; JSON lines on stdout and $OUT/speed.json, or --json, rewritten as it goes):
  vae   decoder part by part at 512 / 1024, GroupNorm variants at the decoder's shapes
  strips  whole decode vs strip decode vs exact tiles at 512 / 1024 in float16 and bfloat16:
        time, extra peak, the planner's estimate (calibrated here) and the difference from
        the whole decode
  encode  whole encode vs strip encode (editing images) at 512 / 1024 in float16 and bfloat16:
        time, extra peak, the planner's estimate of the image-encoding stage (calibrated
        here) and the difference from the whole encode
  dit   transformer steps (dense bf16, binary, ternary) under the execution settings the
        budget plans use (DIT_WHOLE_SLABS=1: the packed ones also with each matrix one slab,
        as whole-slab plans run them; DIT_DECODE_TILES="2,4 8,4" also under those decode launch
        tiles), linears at the real shapes per path, elementwise parts
  load  transformer load time from a pack on disk (the reload a released transformer pays):
        the file read floors, three loads, the third profiled
  build a 1024 px step built as one lazy graph, whole and in 512-token chunks: host time by
        Python function, then the graph evaluated
  text  the text encoder's streamed encodes of new prompts, the layer reads alone, resident encodes

    python examples/profile_speed.py [--sections vae strips encode dit load] [--tiny] [--json PATH]
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

OUT = os.environ.get("OUT", "/tmp")
RES: list[dict] = []
JSON = [f"{OUT}/speed.json"]  # where record() writes; --json changes it


def record(name, **kw):
    r = dict(name=name, **kw)
    print(json.dumps(r), flush=True)
    RES.append(r)
    json.dump(RES, open(JSON[0], "w"), indent=1)


def timeit(name, fn, runs=5, warmup=2, **kw):
    """Median wall time of fn() evaluated and synchronized, and its extra peak memory."""
    try:
        gc.collect()
        mx.synchronize()
        mx.clear_cache()  # a cached buffer larger than a request is counted whole when reused
        for _ in range(warmup):
            mx.eval(fn())
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            mx.eval(fn())
            mx.synchronize()
            ts.append(time.perf_counter() - t)
        record(name, ms=1e3 * statistics.median(ts), min_ms=1e3 * min(ts),
               extra_peak_mb=(mx.get_peak_memory() - base) / 1e6, **kw)
        return 1e3 * statistics.median(ts)
    except Exception as e:  # noqa: BLE001 - a profile keeps going
        record(name, err=repr(e)[:300], **kw)
        return None


# ----------------------------------------------------------------------------- GroupNorm variants

def gn_colreduce(x, groups, weight, bias, silu=True):
    """Statistics as a reduction over the spatial axis first (a column reduction with C
    outputs), then over each group's channels."""
    B, H, W, C = x.shape
    g = x.reshape(B, H * W, groups, C // groups)
    n = H * W * (C // groups)
    s = mx.sum(g.astype(mx.float32), axis=1)  # [B, G, Cg]
    mean = (mx.sum(s, axis=-1, keepdims=True) / n)[:, None]  # [B, 1, G, 1]
    d = mx.sum(mx.square(g.astype(mx.float32) - mean), axis=1)
    var = (mx.sum(d, axis=-1, keepdims=True) / n)[:, None]
    inv = mx.rsqrt(var + 1e-6)
    y = (g.astype(mx.float32) - mean) * inv * weight.reshape(groups, -1) + bias.reshape(groups, -1)
    if silu:
        y = y * mx.sigmoid(y)
    return y.astype(x.dtype).reshape(B, H, W, C)


def gn_layernorm(x, groups, weight, bias, silu=True):
    """MLX nn.GroupNorm's way: transpose each group together, fast.layer_norm, transpose back."""
    B, H, W, C = x.shape
    g = x.reshape(B, H * W, groups, C // groups).transpose(0, 2, 1, 3).reshape(B, groups, -1)
    y = mx.fast.layer_norm(g, None, None, 1e-6)
    y = y.reshape(B, groups, H * W, C // groups).transpose(0, 2, 1, 3).reshape(B, H, W, C)
    y = y * weight + bias
    return nn.silu(y) if silu else y


def section_vae(tiny, quick=False):
    from bonsai_mlx.vae import AutoencoderKLFlux2, GroupNorm, VAEConfig
    from bonsai_mlx.random_weights import FLUX2_VAE

    cfg = dict(FLUX2_VAE)
    if tiny:
        cfg.update(block_out_channels=[32, 32, 64, 64])
    keep = {k: v for k, v in cfg.items() if k in VAEConfig.__dataclass_fields__}
    vae = AutoencoderKLFlux2(VAEConfig(**keep), has_encoder=False)
    vae.set_dtype(mx.float16)
    mx.eval(vae.parameters())
    dec = vae.decoder
    sizes = (128, 256) if tiny else (512, 1024)
    for size in sizes:
        lat = size // 8
        z = mx.random.normal((1, lat, lat, 32)).astype(mx.float16)
        mx.eval(z)
        from bonsai_mlx.execution import Execution
        timeit(f"vae decode {size} (whole, one graph)", lambda: vae.decode(z), runs=5)
        timeit(f"vae decode {size} (whole, block by block)", lambda: vae.decode(z, execution=Execution(sync=True)),
               runs=5)
        timeit(f"vae decode {size} (whole, block by block, two in flight)",
               lambda: vae.decode(z, execution=Execution(sync=True, overlap=True)), runs=5)
        if os.environ.get("VAE_COPIES"):  # the same with GroupNorm statistics from float32 copies
            from bonsai_mlx import kernels
            moments_backend = kernels.moments_backend
            kernels.moments_backend = lambda dtype: None
            try:
                timeit(f"vae decode {size} (whole, one graph, float32 copies)", lambda: vae.decode(z), runs=5)
                timeit(f"vae decode {size} (whole, block by block, two in flight, float32 copies)",
                       lambda: vae.decode(z, execution=Execution(sync=True, overlap=True)), runs=5)
            finally:
                kernels.moments_backend = moments_backend
        for log2 in os.environ.get("VAE_REDUCE_BLOCKS", "").split():  # GroupNorm row blocks of 2**log2 elements
            ex = Execution(sync=True, overlap=True, reduce_block=1 << int(log2))
            timeit(f"vae decode {size} (whole, block by block, two in flight, reduce blocks 2^{log2})",
                   lambda: vae.decode(z, execution=ex), runs=5)
        if quick:
            continue
        timeit(f"vae decode {size} (256 px exact tiles, block by block)",
               lambda: vae.decode(z, tile_size=256, overlap=16, execution=Execution(sync=True)), runs=1, warmup=1)
        # part by part
        h = dec.conv_in(z)
        mx.eval(h)
        timeit(f"vae {size} conv_in", lambda: dec.conv_in(z))
        mb = dec.mid_block
        timeit(f"vae {size} mid resnet", lambda: mb.resnets[0](h))
        if "attentions" in mb:
            timeit(f"vae {size} mid attention", lambda: mb.attentions[0](h))
        x = h
        for i, b in enumerate(dec.up_blocks):
            for j, r in enumerate(b.resnets):
                xin = x
                timeit(f"vae {size} up{i} resnet{j} in={list(xin.shape)}", lambda: r(xin))
                if j == 0:
                    timeit(f"vae {size} up{i} resnet{j} norm1", lambda: r.norm1(xin, silu=True))
                    timeit(f"vae {size} up{i} resnet{j} conv1", lambda: r.conv1(xin))
                x = r(xin)
                mx.eval(x)
            if "upsamplers" in b:
                xin = x
                timeit(f"vae {size} up{i} upsampler in={list(xin.shape)}", lambda: b.upsamplers[0](xin))
                x = b.upsamplers[0](xin)
                mx.eval(x)
        xin = x
        timeit(f"vae {size} norm_out+conv_out", lambda: dec.conv_out(dec.conv_norm_out(xin, silu=True)))
        del x, xin, h
    if quick:
        return
    # GroupNorm variants at the decoder's shapes
    shapes = [(64, 512), (128, 512), (256, 256), (512, 128), (512, 256), (1024, 128)]
    if tiny:
        shapes = [(32, 64), (64, 32)]
    for side, c in shapes:
        a = mx.random.normal((1, side, side, c)).astype(mx.float16)
        mx.eval(a)
        gn = GroupNorm(32, c)
        gn.set_dtype(mx.float16)
        w, b = gn.weight, gn.bias
        mx.eval(gn.parameters())
        ref = nn.GroupNorm(32, c, pytorch_compatible=True)
        ref.set_dtype(mx.float16)
        tag = f"{side}x{side}x{c}"
        timeit(f"gn current {tag}", lambda: gn(a, silu=True))
        timeit(f"gn current sync {tag}", lambda: gn(a, silu=True, pace=Execution(sync=True).pace()))
        timeit(f"gn colreduce {tag}", lambda: gn_colreduce(a, 32, w, b))
        cc = mx.compile(lambda a, w, b: gn_colreduce(a, 32, w, b))
        timeit(f"gn colreduce compiled {tag}", lambda: cc(a, w, b))
        timeit(f"gn layernorm {tag}", lambda: gn_layernorm(a, 32, w, b))
        timeit(f"gn nn.GroupNorm {tag}", lambda: ref(a))
        timeit(f"sum axis (1,2) f32 {tag}", lambda: mx.sum(a.astype(mx.float32), axis=(1, 2)))
        timeit(f"sum 5d axes (1,2,4) f32 {tag}",
               lambda: mx.sum(a.reshape(1, side, side, 32, -1).astype(mx.float32), axis=(1, 2, 4)))
        conv = nn.Conv2d(c, c, 3, padding=1)
        conv.set_dtype(mx.float16)
        timeit(f"conv3x3 {tag}", lambda: conv(a))
        del a


# ----------------------------------------------------------------------------- strip decoding

def vae_footprint(vae, fit: dict, **kw):
    """A Footprint of `vae` alone (nothing else resident) with its calibrated scratch `fit`."""
    from bonsai_mlx.memory import Footprint, vae_held_per_pixel

    return Footprint(transformer_bytes=0, transformer_dim=0, transformer_mlp=0, transformer_heads=0,
                     transformer_max_out=0, reference_matmul=False, text_resident_bytes=0, text_stream_bytes=0,
                     text_hidden=0, text_heads=0, text_len=0, vae_bytes=0,
                     vae_mid_channels=vae.config.decoder_channels[-1], vae_held_per_pixel=vae_held_per_pixel(vae),
                     **fit, **kw)


def _strip_setup(tiny, quick):
    """The VAE config (the full FLUX.2 one, or narrow channels with --tiny), the sizes, the
    strip heights, the dtypes, and the strict and two-in-flight executions that the strip
    sections compare. STRIPS_SIZES, STRIPS_ROWS and STRIPS_DTYPES (space-separated) replace
    the sizes, heights and dtypes; STRIPS_HOST=1 splits each run's host time; STRIPS_COPIES=1
    takes the strips' moments from float32 copies (no block-moments kernel)."""
    from bonsai_mlx.execution import Execution
    from bonsai_mlx.random_weights import FLUX2_VAE
    from bonsai_mlx.vae import VAEConfig

    cfg = dict(FLUX2_VAE)
    if tiny:
        cfg.update(block_out_channels=[32, 32, 64, 64])
    keep = {k: v for k, v in cfg.items() if k in VAEConfig.__dataclass_fields__}
    sizes = ((64,) if quick else (64, 128)) if tiny else (512, 1024)
    if os.environ.get("STRIPS_SIZES"):  # e.g. "512"
        sizes = tuple(int(v) for v in os.environ["STRIPS_SIZES"].split())
    rows = [int(r) for r in os.environ.get("STRIPS_ROWS", "").split()] or ((16,) if tiny else (256, 128, 64, 32))
    dtypes = [getattr(mx, d) for d in os.environ.get("STRIPS_DTYPES", "float16 bfloat16").split()]
    if os.environ.get("STRIPS_HOST"):  # splits each part's host time, as DIT_HOST does for steps
        _instrument_pace()
    return keep, sizes, rows, dtypes, Execution(sync=True), Execution(sync=True, overlap=True)


def _record_host(name: str, ms, runs: int):
    """With STRIPS_HOST=1: a timed decode or encode's host time per run (timed and warm-up
    runs), split as `_instrument_pace` splits it."""
    if ms and os.environ.get("STRIPS_HOST"):
        record(name, run_ms=ms, **{f"{k}_ms": 1e3 * v / runs for k, v in HOST.items()})


def section_strips(tiny, quick=False):
    """The decode under each way a plan can run it, full FLUX.2 VAE (random weights), one
    image: ms (median of 5 after 2 warm-ups; tiles 1 after 1), extra peak above the weights
    and latents (mx.get_peak_memory after mx.reset_peak_memory), the planner's estimate of
    that peak (the decoding stage with nothing else resident, VAE scratch calibrated on
    this device: the estimate covers the peak when estimate_mb >= extra_peak_mb) and the
    difference from the whole block-by-block decode (largest, and relative in norm)."""
    import numpy as np

    from bonsai_mlx.execution import Execution
    from bonsai_mlx.memory import MemoryPlan, calibrate_vae, estimate
    from bonsai_mlx.vae import AutoencoderKLFlux2, VAEConfig

    keep, sizes, rows, dtypes, strict, two = _strip_setup(tiny, quick)
    if os.environ.get("STRIPS_COPIES"):  # strips' moments from float32 copies, not the block-moments kernel, for the whole process
        from bonsai_mlx import vae_strips

        vae_strips._moments = vae_strips._copied_moments
        record("strip moments from float32 copies")
    if os.environ.get("STRIPS_HELD_UPSAMPLER"):  # an experiment: every upsampler's output held, none read lazily
        from bonsai_mlx import vae_strips

        lazy = vae_strips._stages
        vae_strips._stages = lambda dec: [("upsample" if k == "lazy_upsample" else k, m) for k, m in lazy(dec)]
        record("strips with the last upsampler held")
    ahead = Execution(sync=True, ahead=True)  # one part at a time, built while the one before runs
    cases = [("whole, one graph (none)", None, None, Execution()), ("whole, block by block, strict", None, None, strict),
             ("whole, block by block, ahead", None, None, ahead),
             ("whole, block by block, two in flight (auto)", None, None, two)]
    for strip in rows:
        cases += [(f"{strip}-row strips, two in flight", strip, None, two),
                  (f"{strip}-row strips, strict", strip, None, strict),
                  (f"{strip}-row strips, ahead", strip, None, ahead)]
    if not quick:  # exact tiles re-run the up path once per GroupNorm: minutes on a CPU
        tiles = (32, 64) if tiny else (256, 512)
        cases += [(f"exact {tiles[0]} px tiles, strict", None, tiles[0], strict),
                  (f"exact {tiles[1]} px tiles, two in flight", None, tiles[1], two)]
    runs, warmup = (2, 1) if tiny else (5, 2)
    for dtype in dtypes:
        dname = str(dtype).rpartition(".")[2]
        vae = AutoencoderKLFlux2(VAEConfig(**keep), has_encoder=False)
        vae.set_dtype(dtype)
        mx.eval(vae.parameters())
        fit = calibrate_vae(vae)
        record(f"vae calibration {dname}", dtype=dname, **fit)
        fp = vae_footprint(vae, fit)
        for size in sizes:
            z = mx.random.normal((1, size // 8, size // 8, vae.config.latent_channels), key=mx.random.key(size))
            z = z.astype(dtype)
            mx.eval(z)
            whole = np.array(vae.decode(z, execution=strict))
            for label, strip, tile, ex in cases:
                plan = MemoryPlan(transformer_in_decode=False, keep_text_encoder=False, sync=ex.sync,
                                  overlap=ex.overlap, vae_strip=strip, vae_tile=tile)
                est = estimate(fp, size, size, plan)["decoding"] / 1e6 if ex.sync else None
                fn = lambda: vae.decode(z, tile_size=tile, overlap=16, execution=ex, strip=strip)  # noqa: E731
                try:
                    # The first call of each shape: on CUDA, MLX's convolutions pick their
                    # algorithm then, with scratch of its own.
                    gc.collect()
                    mx.synchronize()
                    mx.clear_cache()
                    base = mx.get_active_memory()
                    mx.reset_peak_memory()
                    got = np.array(fn())
                    first_mb = (mx.get_peak_memory() - base) / 1e6
                    diff = float(np.abs(got - whole).max())
                    rel = float(np.linalg.norm(got - whole) / np.linalg.norm(whole))
                except Exception as e:  # noqa: BLE001 - a profile keeps going
                    record(f"vae decode {size} {dname} {label}", err=repr(e)[:300])
                    continue
                slow = tile is not None
                HOST.update(encode=0.0, wait=0.0)
                ms = timeit(f"vae decode {size} {dname} {label}", fn, runs=1 if slow else runs,
                            warmup=1 if slow else warmup, size=size, dtype=dname, strip=strip, tile=tile, sync=ex.sync,
                            overlap=ex.overlap, ahead=ex.ahead, estimate_mb=est, first_call_extra_peak_mb=first_mb,
                            max_diff_vs_whole=diff, rel_diff_vs_whole=rel,
                            whole_max_abs=float(np.abs(whole).max()))
                if not slow:
                    _record_host(f"vae host {size} {dname} {label}", ms, runs + warmup)
            del z, whole
        del vae


def section_encode(tiny, quick=False):
    """Whole encode (one graph, as the executor runs it without strips) against strip encodes
    (vae_strips.encode_strips) of one size x size image: ms, extra peak above the weights and
    the image, the planner's estimate of the image-encoding stage with nothing else resident
    (VAE scratch calibrated here; the estimate covers the peak when estimate_mb >=
    extra_peak_mb) and the difference of the tokens from the whole encode."""
    import numpy as np

    from bonsai_mlx.execution import Execution
    from bonsai_mlx.memory import MemoryPlan, calibrate_vae, calibrate_vae_encoder, estimate, vae_enc_held_per_pixel
    from bonsai_mlx.vae import AutoencoderKLFlux2, VAEConfig

    keep, sizes, rows, dtypes, strict, two = _strip_setup(tiny, quick)
    cases = [("whole, one graph (as run without strips)", None, Execution())]
    for strip in rows:
        cases += [(f"{strip}-row strips, two in flight", strip, two), (f"{strip}-row strips, strict", strip, strict)]
    runs, warmup = (2, 1) if tiny else (5, 2)
    for dtype in dtypes:
        dname = str(dtype).rpartition(".")[2]
        vae = AutoencoderKLFlux2(VAEConfig(**keep))
        vae.set_dtype(dtype)
        mx.eval(vae.parameters())
        fit = {**calibrate_vae(vae), **calibrate_vae_encoder(vae)}
        record(f"vae encoder calibration {dname}", dtype=dname, **fit)
        fp = vae_footprint(vae, fit, vae_enc_held_per_pixel=vae_enc_held_per_pixel(vae), dtype_bytes=dtype.size,
                           latent_channels=vae.config.patched_channels)
        for size in sizes:
            pixels = mx.random.uniform(shape=(1, size, size, 3), key=mx.random.key(size))
            mx.eval(pixels)
            whole = np.array(vae.encode(pixels))
            for label, strip, ex in cases:
                plan = MemoryPlan(transformer_in_text=False, keep_text_encoder=False, sync=ex.sync,
                                  overlap=ex.overlap, vae_encode_strip=strip)
                est = estimate(fp, size, size, plan, images=((size, size),))["image_encoding"] / 1e6
                fn = lambda: vae.encode(pixels, strip=strip, execution=ex)  # noqa: E731
                try:
                    got = np.array(fn())
                except Exception as e:  # noqa: BLE001 - a profile keeps going
                    record(f"vae encode {size} {dname} {label}", err=repr(e)[:300])
                    continue
                HOST.update(encode=0.0, wait=0.0)
                ms = timeit(f"vae encode {size} {dname} {label}", fn, runs=runs, warmup=warmup, size=size, dtype=dname,
                            strip=strip, sync=ex.sync, overlap=ex.overlap, estimate_mb=est,
                            max_diff_vs_whole=float(np.abs(got - whole).max()),
                            rel_diff_vs_whole=float(np.linalg.norm(got - whole) / np.linalg.norm(whole)),
                            whole_max_abs=float(np.abs(whole).max()))
                _record_host(f"vae encode host {size} {dname} {label}", ms, runs + warmup)
            del pixels, whole
        del vae


# ----------------------------------------------------------------------------- transformer

HOST = {"encode": 0.0, "wait": 0.0}


def _slab_variants(model, name: str) -> list:
    """(label suffix, context factory) for each slab setting a step is timed under: the kernels'
    slabs, and with DIT_WHOLE_SLABS=1 for a packed model each matrix one slab, through the
    executor's own `slab_tuning` as a whole-slab plan runs it (and under each of
    DIT_DECODE_TILES's decode launch tiles)."""
    from contextlib import nullcontext
    from dataclasses import replace

    from bonsai_mlx import kernels
    from bonsai_mlx.executor import packed_info, slab_tuning
    from bonsai_mlx.memory import MemoryPlan

    variants = [("", nullcontext)]
    info = packed_info(model, model.dtype)
    if name != "dense" and info["largest_packed"] and os.environ.get("DIT_WHOLE_SLABS"):
        variants.append((", whole slabs", lambda: slab_tuning(info, MemoryPlan(whole_slabs=True))))
        # DIT_DECODE_TILES="2,4 8,4": whole slabs decoded with other launch tiles (CPT, NSG)
        for tile in os.environ.get("DIT_DECODE_TILES", "").split():
            cpt, nsg = (int(v) for v in tile.split(","))
            config = replace(kernels.whole_slabs(info["largest_packed"]), decode=kernels.DecodeTile(CPT=cpt, NSG=nsg))
            variants.append((f", whole slabs, decode tile {cpt}x{nsg}", lambda c=config: kernels.tuned(c)))
    return variants


def _instrument_pace():
    """Pace, timing its host side: starting parts (async_eval: MLX encodes the graph on
    this thread) and waiting for the part before (eval of finished work). The rest of a
    step's wall time is Python building the graphs. A copy of execution.Pace.__call__."""
    from bonsai_mlx import execution as E

    def call(self, *arrays, wait=()):
        if not self.active:
            return
        t = time.perf_counter()
        if not self.execution.overlap:
            mx.eval(*arrays)
        else:
            mx.async_eval(*arrays)
            t1 = time.perf_counter()
            HOST["encode"] += t1 - t
            t = t1
            if self._previous:
                mx.eval(*self._previous)
            self._previous = tuple(wait) or arrays
        flush = self.execution.flush_above  # the flush's wait counts as waiting
        if flush is not None and mx.get_active_memory() > flush:
            mx.synchronize()
        HOST["wait"] += time.perf_counter() - t
    E.Pace.__call__ = call


def section_dit(tiny, root, quick=False):
    from bonsai_mlx import kernels
    from bonsai_mlx import transformer as T
    from bonsai_mlx.benchmark import klein_inputs, random_transformer
    from bonsai_mlx.config import KLEIN_4B, TransformerConfig
    from bonsai_mlx.loading import load_transformer

    cfg = TransformerConfig(num_layers=1, num_single_layers=2, num_attention_heads=2, joint_attention_dim=256,
                            in_channels=32) if tiny else KLEIN_4B
    sizes = (128, 256) if tiny else (512, 1024)
    txt_len = 64 if tiny else 512
    wanted = os.environ.get("DIT_MODELS", "dense binary ternary").split()  # e.g. "ternary": no dense model resident
    models = {"dense": random_transformer(cfg, mx.bfloat16)} if "dense" in wanted else {}
    for fmt in (f for f in ("binary", "ternary") if f in wanted):
        pack = os.path.join(root, f"random-{fmt}")
        if os.path.exists(pack):
            t = time.perf_counter()
            models[fmt] = load_transformer(pack, dtype=mx.bfloat16)
            mx.eval(models[fmt].parameters())
            record(f"load transformer {fmt}", s=time.perf_counter() - t)

    from bonsai_mlx.execution import Execution

    if os.environ.get("DIT_HOST"):
        _instrument_pace()
    if os.environ.get("DIT_CACHE_LIMIT"):  # as a budgeted run limits MLX's buffer cache (bytes)
        mx.set_cache_limit(int(os.environ["DIT_CACHE_LIMIT"]))
        record("dit cache limit", bytes=int(os.environ["DIT_CACHE_LIMIT"]))
    if os.environ.get("DIT_MEMORY_LIMIT"):  # the limits a run under this budget (bytes) sets here
        from bonsai_mlx.memory import MlxLimits, budget_limits

        memory, cache = budget_limits(int(os.environ["DIT_MEMORY_LIMIT"]), 0)
        MlxLimits(memory, cache).__enter__()  # for the rest of this process
        record("dit limits", memory_bytes=memory, cache_bytes=cache)
    settings = [("one graph", Execution()), ("block by block", Execution(sync=True)),
                ("block by block, two in flight", Execution(sync=True, overlap=True)),
                ("block by block, 2048-token chunks", Execution(2048, None, True)),
                ("block by block, 2048-token chunks, two in flight", Execution(2048, None, True, True)),
                ("block by block, 1024-token chunks, two in flight", Execution(1024, None, True, True)),
                ("block by block, 512-token chunks", Execution(512, None, True)),
                ("block by block, 512-token chunks, two in flight", Execution(512, None, True, True))]
    settings += [("block by block, attention apart, two in flight", Execution(sync=True, overlap=True,
                                                                           attention_apart=True))]
    for parts in (2, 4, 8):
        settings += [(f"block by block, MLP in {parts} parts", Execution(sync=True, hidden_parts=parts)),
                     (f"block by block, MLP in {parts} parts, two in flight",
                      Execution(sync=True, overlap=True, hidden_parts=parts)),
                     (f"block by block, MLP in {parts} parts, two in flight, joined",  # Execution.joins at any size
                      Execution(sync=True, overlap=True, hidden_parts=parts, join_upto=1 << 30))]
    settings += [(f"block by block, {chunk}-token chunks, MLP in {parts} parts, two in flight",
                  Execution(chunk, None, True, True, hidden_parts=parts)) for chunk in (2048, 1024) for parts in (2, 4)]
    if os.environ.get("DIT_SETTINGS"):  # a subset by label substring, e.g. "parts|flight"
        import re
        settings = [s for s in settings if re.search(os.environ["DIT_SETTINGS"], s[0])]
    for size in sizes:
        inp = klein_inputs(cfg, size, size, txt_len, mx.bfloat16)
        mx.eval(inp)
        for name, m in models.items():
            ctx, mods = m.prepare(inp[1], inp[3], inp[4]), m.modulations(inp[2], mx.bfloat16)
            mx.eval(ctx, mods)
            for (label, ex), (slabs, tuning) in itertools.product(settings, _slab_variants(m, name)):
                if name == "dense" and (ex.token_chunk or ex.hidden_parts > 1):
                    continue
                HOST.update(encode=0.0, wait=0.0)
                with tuning():
                    ms = timeit(f"dit step {size} {name} {label}{slabs}",
                                lambda: m.forward(inp[0], mods, ctx, execution=ex), runs=5)
                if ms and os.environ.get("DIT_HOST"):  # per step, over the 7 timed and warm-up steps
                    record(f"dit host {size} {name} {label}{slabs}", step_ms=ms,
                           **{f"{k}_ms": 1e3 * v / 7 for k, v in HOST.items()})
    if quick:
        return
    # linears by path at the real shapes
    D, F = cfg.inner_dim, cfg.mlp_hidden_dim
    shapes = [(D, D), (2 * F, D), (D, F), (3 * D + 2 * F, D), (D, D + F)]
    Ms = (512, 1024, 1536, 5120) if not tiny else (64, 300)
    for fmt in ("binary", "ternary"):
        if fmt not in models:
            continue
        blk = models[fmt].single_transformer_blocks[0].attn
        dblk = models[fmt].transformer_blocks[0]
        lins = {(D, D): dblk.attn.to_q, (2 * F, D): dblk.ff.linear_in, (D, F): dblk.ff.linear_out,
                (3 * D + 2 * F, D): blk.to_qkv_mlp_proj, (D, D + F): blk.to_out}
        for (N, K), lin in lins.items():
            pw = lin.packed
            for M in Ms:
                x = mx.random.normal((M, K)).astype(mx.bfloat16)
                mx.eval(x)
                tag = f"{fmt} N={N} K={K} M={M}"
                if fmt == "binary":
                    wd = mx.random.normal((N, K)).astype(mx.bfloat16) * 0.02
                    mx.eval(wd)
                    timeit(f"linear dense {tag}", lambda: x @ wd.T)
                    del wd
                if tiny:
                    continue
                timeit(f"linear auto {tag}", lambda: lin(x))
                for path in ("gemm", "slab"):
                    timeit(f"linear {path} {tag}", lambda: kernels.packed_matmul(x, pw, path=path))
                rows = kernels.slab_rows(N, K)
                timeit(f"linear slab parts (no concat) {tag}", lambda: kernels.slab_parts(x, pw, "cuda", rows))
                timeit(f"decode all slabs {tag}", lambda: [kernels.decode_slab(pw, a, b, mx.bfloat16)
                                                           for a, b in kernels.slab_ranges(N, rows)])
                del x
    # elementwise parts at 1024 tokens-wise
    L = 5120 if not tiny else 320
    H, Dh = cfg.num_attention_heads, cfg.attention_head_dim
    x = mx.random.normal((1, L, D)).astype(mx.bfloat16)
    q = mx.random.normal((1, L, H, Dh)).astype(mx.bfloat16)
    sh, sc, g = (mx.random.normal((1, 1, D)).astype(mx.bfloat16) * 0.1 for _ in range(3))
    ids = mx.concatenate([mx.zeros((L, 3), dtype=mx.int32), mx.arange(L)[:, None].astype(mx.int32)], axis=1)
    cos, sin = T.rope_tables(ids, cfg.axes_dims_rope, cfg.rope_theta)
    rot = T.rope_rotation(ids, cfg.axes_dims_rope, cfg.rope_theta)
    h2 = mx.random.normal((1, L, 2 * F)).astype(mx.bfloat16)
    mx.eval(x, q, sh, sc, g, cos, sin, h2)
    norm = nn.RMSNorm(Dh)
    norm.set_dtype(mx.bfloat16)
    timeit(f"modulate L={L}", lambda: T.modulate(x, sh, sc, 1e-6))
    cmod = mx.compile(lambda x, sh, sc: (1 + sc) * mx.fast.layer_norm(x, None, None, 1e-6) + sh)
    timeit(f"modulate compiled L={L}", lambda: cmod(x, sh, sc))
    timeit(f"layer_norm L={L}", lambda: mx.fast.layer_norm(x, None, None, 1e-6))
    timeit(f"gated residual L={L}", lambda: x + g * x)
    timeit(f"rmsnorm q L={L}", lambda: norm(q))
    timeit(f"rope L={L}", lambda: T.apply_rope(q, rot))
    timeit(f"rmsnorm+rope L={L}", lambda: T.apply_rope(norm(q), rot))
    cosf = mx.repeat(cos, 2, axis=-1)[None, :, None, :]
    sinf = mx.stack([-sin, sin], axis=-1).reshape(L, Dh)[None, :, None, :]
    mx.eval(cosf, sinf)

    def rope2(q, cosf, sinf):
        B, L_, H_, Dh_ = q.shape
        sw = q.reshape(B, L_, H_, Dh_ // 2, 2)[..., ::-1].reshape(B, L_, H_, Dh_)
        return (q.astype(mx.float32) * cosf + sw.astype(mx.float32) * sinf).astype(q.dtype)
    crope = mx.compile(rope2)
    timeit(f"rope swap-form L={L}", lambda: rope2(q, cosf, sinf))
    timeit(f"rope swap-form compiled L={L}", lambda: crope(q, cosf, sinf))
    timeit(f"swiglu L={L}", lambda: T.swiglu(h2))
    csw = mx.compile(T.swiglu)
    timeit(f"swiglu compiled L={L}", lambda: csw(h2))
    qt = q.transpose(0, 2, 1, 3)
    timeit(f"sdpa L={L}", lambda: mx.fast.scaled_dot_product_attention(qt, qt, qt, scale=Dh ** -0.5))
    timeit(f"concat [L,D]+[L,F] L={L}", lambda: mx.concatenate([x, h2[..., :F]], axis=-1))


def section_buffer(tiny):
    """A TokenBuffer filled strip by strip in place (as strict token chunks fill theirs), strict
    and two in flight: its extra peak against the buffer's own size shows whether each slice
    update reuses the buffer (about 1x) or copies it (about 2x)."""
    from bonsai_mlx.execution import Execution, TokenBuffer

    H, W, C = (64, 64, 16) if tiny else (1024, 1024, 256)
    for rows in (256, 32):
        for label, ex in (("strict", Execution(sync=True)), ("two in flight", Execution(sync=True, overlap=True))):
            def fill():
                buf, pace = TokenBuffer((1, H, W, C), mx.float16), ex.pace()
                for a in range(0, H, rows):
                    part = mx.full((1, min(rows, H - a), W, C), float(a), dtype=mx.float16) * 1.5
                    pace(buf.write(a, a + part.shape[1], part), wait=(part,))
                return buf.value
            timeit(f"buffer fill {H}x{W}x{C} in {rows}-row strips, {label}", fill,
                   buffer_mb=H * W * C * 2 / 1e6)


def _floors(path):
    """How fast this machine reads `path` (page cache warm): Python into host memory, and
    mx.load evaluated at once and tensor by tensor (what a device array costs to fill)."""
    size = os.path.getsize(path)
    buf = bytearray(64 << 20)
    with open(path, "rb") as f:  # warm the page cache
        while f.readinto(buf):
            pass
    t = time.perf_counter()
    with open(path, "rb") as f:
        while f.readinto(buf):
            pass
    name = os.path.basename(os.path.dirname(path))
    record(f"read {name} host", s=time.perf_counter() - t, gb=size / 1e9)
    for how in ("at once", "tensor by tensor"):
        mx.clear_cache()
        t = time.perf_counter()
        w = mx.load(path)
        if how == "at once":
            mx.eval(w)
        else:
            for v in w.values():
                mx.eval(v)
        mx.synchronize()
        record(f"read {name} mx.load {how}", s=time.perf_counter() - t, gb=sum(v.nbytes for v in w.values()) / 1e9)
        del w


def _top(prof, n=14):
    import pstats
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][3])[:n]  # cumulative
    return [dict(fn=f"{os.path.basename(k[0])}:{k[1]}({k[2]})", calls=v[1], tottime=round(v[2], 4),
                 cumtime=round(v[3], 4)) for k, v in rows]


def section_build(root):
    """The host's share of a chunked step: one 1024 px step built as one lazy graph (nothing
    evaluated), timed and profiled by Python function; then that graph evaluated at once."""
    import cProfile
    from bonsai_mlx.benchmark import klein_inputs
    from bonsai_mlx.config import KLEIN_4B
    from bonsai_mlx.execution import Execution
    from bonsai_mlx.loading import load_transformer
    for fmt in ("binary", "ternary"):
        pack = os.path.join(root, f"random-{fmt}")
        if not os.path.exists(pack):
            continue
        m = load_transformer(pack, dtype=mx.bfloat16)
        inp = klein_inputs(KLEIN_4B, 1024, 1024, 512, mx.bfloat16)
        ctx, mods = m.prepare(inp[1], inp[3], inp[4]), m.modulations(inp[2], mx.bfloat16)
        mx.eval(m.parameters(), inp, ctx, mods)
        for chunk in (None, 512):
            ex = Execution(chunk, None, False, False)
            mx.eval(m.forward(inp[0], mods, ctx, execution=ex))  # kernels built
            for i in range(3):
                prof = cProfile.Profile() if i == 2 else None
                t = time.perf_counter()
                if prof:
                    prof.enable()
                y = m.forward(inp[0], mods, ctx, execution=ex)
                if prof:
                    prof.disable()
                built = time.perf_counter() - t
                mx.eval(y)
                mx.synchronize()
                record(f"build step 1024 {fmt} chunk {chunk} #{i}", build_s=built, total_s=time.perf_counter() - t,
                       **({"profile": _top_tottime(prof)} if prof else {}))
                del y
        del m


def _top_tottime(prof, n=18):
    import pstats
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:n]
    return [dict(fn=f"{os.path.basename(k[0])}:{k[1]}({k[2]})", calls=v[1], tottime=round(v[2], 4),
                 cumtime=round(v[3], 4)) for k, v in rows]


def section_load(root):
    """The transformer's (re)load: the file read floors, then load_transformer timed and
    profiled (where its time goes beyond reading the file)."""
    import cProfile
    import glob
    from mlx.utils import tree_flatten
    from bonsai_mlx.loading import load_transformer
    for fmt in ("binary", "ternary"):
        pack = os.path.join(root, f"random-{fmt}")
        if not os.path.exists(pack):
            continue
        for f in sorted(glob.glob(os.path.join(pack, "transformer*", "*.safetensors"))):
            _floors(f)
        for i in range(3):
            mx.clear_cache()
            mx.reset_peak_memory()
            prof = cProfile.Profile() if i == 2 else None
            t = time.perf_counter()
            if prof:
                prof.enable()
            m = load_transformer(pack, dtype=mx.bfloat16)
            mx.eval(m.parameters())
            mx.synchronize()
            if prof:
                prof.disable()
            record(f"reload transformer {fmt} #{i}", s=time.perf_counter() - t,
                   peak_gb=mx.get_peak_memory() / 1e9, weights_gb=sum(v.nbytes for _, v in
                                                                     tree_flatten(m.parameters())) / 1e9,
                   **({"profile": _top(prof)} if prof else {}))
            del m


PROMPTS = ("a red square on a blue field", "three green circles, studio light", "a yellow triangle at dusk",
           "an orange star over still water", "two purple hexagons, side by side")


def section_text(root):
    """The text encoder: streamed encodes of new prompts (timed, one profiled), the layers'
    reads alone, and the same prompts on a resident encoder (the compute alone)."""
    import cProfile
    import glob
    from bonsai_mlx.text_encoder import load_text_encoder
    for fmt in ("binary",):
        pack = os.path.join(root, f"random-{fmt}")
        if not os.path.exists(pack):
            continue
        for f in sorted(glob.glob(os.path.join(pack, "text_encoder*", "*.safetensors"))):
            _floors(f)
        enc = load_text_encoder(pack, resident=False)
        w = enc.weights
        for i, p in enumerate(PROMPTS[:4]):
            mx.clear_cache()
            prof = cProfile.Profile() if i == 3 else None
            t = time.perf_counter()
            if prof:
                prof.enable()
            mx.eval(enc.encode(p, stream=True))
            mx.synchronize()
            if prof:
                prof.disable()
            record(f"text encode streamed #{i}", s=time.perf_counter() - t,
                   **({"profile": _top(prof)} if prof else {}))
        for how in ("one at a time", "next started early"):
            mx.clear_cache()
            t = time.perf_counter()
            mx.eval(w.embedding(True).parameters())
            nxt = w.layer(0, True)
            for i in range(w.num_layers):
                cur, nxt = nxt, (w.layer(i + 1, True) if i + 1 < w.num_layers else None)
                if how != "one at a time" and nxt is not None:
                    mx.async_eval(nxt.parameters())
                mx.eval(cur.parameters())
                del cur
            mx.synchronize()
            record(f"text layers read, {how}", s=time.perf_counter() - t,
                   gb=(w.weight_bytes(None) + sum(w.weight_bytes(i) for i in range(w.num_layers))) / 1e9)
        t = time.perf_counter()
        enc.load()
        record("text encoder made resident", s=time.perf_counter() - t)
        for i, p in enumerate(PROMPTS[1:]):
            t = time.perf_counter()
            mx.eval(enc.encode(p, sync=True))
            mx.synchronize()
            record(f"text encode resident #{i}", s=time.perf_counter() - t)
        del enc, w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", default=["vae", "dit", "load"])
    ap.add_argument("--tiny", action="store_true", help="small shapes: a smoke test of this script")
    ap.add_argument("--quick", action="store_true", help="whole decodes and steps only")
    ap.add_argument("--root", default="/tmp/bench", help="random packs written by `benchmark generate --dir`")
    ap.add_argument("--json", help=f"where the results go (default {JSON[0]})")
    a = ap.parse_args()
    if a.json:
        JSON[0] = a.json
    record("device", device=str(mx.default_device()), mlx=mx.__version__)
    for s in a.sections:
        t = time.perf_counter()
        try:
            {"vae": lambda: section_vae(a.tiny, a.quick), "strips": lambda: section_strips(a.tiny, a.quick),
             "encode": lambda: section_encode(a.tiny, a.quick),
             "dit": lambda: section_dit(a.tiny, a.root, a.quick), "buffer": lambda: section_buffer(a.tiny),
             "load": lambda: section_load(a.root), "text": lambda: section_text(a.root),
             "build": lambda: section_build(a.root)}[s]()
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            record(f"section {s}", err=repr(e)[:500])
        record(f"section {s} done", s=time.perf_counter() - t)


if __name__ == "__main__":
    main()
