"""Benchmarks that need no downloaded weights: random weights at the real shapes."""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .config import TransformerConfig
from .errors import BonsaiError, NonFiniteError
from .transformer import Flux2Transformer

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def random_transformer(cfg: TransformerConfig, dtype=mx.float16, seed: int = 0) -> Flux2Transformer:
    """A transformer with N(0, 1/fan_in) weights drawn directly in `dtype`, one top-level
    child at a time, so building it peaks at the final weight bytes (the default float32
    init is never evaluated)."""
    model = Flux2Transformer(cfg)
    key = mx.random.key(seed)
    for name, child in model.children().items():
        subs = child if isinstance(child, list) else [child]
        for i, sub in enumerate(subs):
            new = []
            for pname, p in tree_flatten(sub.parameters()):
                key, k = mx.random.split(key)
                if p.ndim == 1:  # RMSNorm weights
                    w = 1 + 0.1 * mx.random.normal(p.shape, dtype=mx.float32, key=k)
                else:
                    w = mx.random.normal(p.shape, dtype=mx.float32, key=k) * (p.shape[-1] ** -0.5)
                new.append((pname, w.astype(dtype)))
                mx.eval(new[-1][1])
            sub.update(tree_unflatten(new))
    model.eval()
    return model


def klein_inputs(cfg: TransformerConfig, width: int, height: int, txt_len: int, dtype, batch: int = 1, seed: int = 0):
    """Inputs shaped as the klein pipeline makes them for a width x height image."""
    h, w = height // 16, width // 16
    k1, k2 = mx.random.split(mx.random.key(seed))
    img_ids = mx.array([(0, i, j, 0) for i in range(h) for j in range(w)], dtype=mx.int32)
    txt_ids = mx.array([(0, 0, 0, i) for i in range(txt_len)], dtype=mx.int32)
    x = mx.random.normal((batch, h * w, cfg.in_channels), key=k1).astype(dtype)
    txt = mx.random.normal((batch, txt_len, cfg.joint_attention_dim), key=k2).astype(dtype)
    return x, txt, mx.full((batch,), 0.75), img_ids, txt_ids


def dtype_named(name: str):
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise BonsaiError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


def bench_forward(cfg: TransformerConfig, width=512, height=512, txt_len=512, dtype="float16",
                  runs: int = 1, warmup: int = 0, log=print, seed: int = 0) -> dict:
    dt = dtype_named(dtype)
    if not all(isinstance(v, int) and v > 0 for v in (width, height, txt_len)) or width % 16 or height % 16:
        raise BonsaiError(f"width and height must be positive multiples of 16 and text tokens positive, "
                          f"got {width}x{height}, {txt_len}")
    if not (isinstance(runs, int) and runs >= 1 and isinstance(warmup, int) and warmup >= 0):
        raise BonsaiError(f"runs must be at least 1 and warmup at least 0, got {runs}, {warmup}")
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    model = random_transformer(cfg, dt, seed=seed)
    build_s = time.perf_counter() - t0
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    log(f"built random transformer: {weight_bytes / 1e9:.3f} GB of {dtype} weights in {build_s:.1f} s")
    inputs = klein_inputs(cfg, width, height, txt_len, dt, seed=seed)
    mx.eval(inputs)
    for _ in range(warmup):
        mx.eval(model(*inputs))
    times = []
    for i in range(runs):
        t = time.perf_counter()
        out = model(*inputs)
        mx.eval(out)
        mx.synchronize()
        times.append(time.perf_counter() - t)
        log(f"forward {i + 1}/{runs}: {times[-1]:.2f} s")
    if not bool(mx.all(mx.isfinite(out))):
        raise NonFiniteError(f"the {dtype} forward on random weights produced NaN or Inf; try float32 or bfloat16",
                             "forward")
    return dict(
        model_params=sum(v.size for _, v in tree_flatten(model.parameters())),
        weight_bytes=weight_bytes, width=width, height=height, image_tokens=(width // 16) * (height // 16),
        text_tokens=txt_len, dtype=dtype, device=str(mx.default_device()), machine=platform.machine(),
        runs=runs, warmup=warmup, median_s=statistics.median(times), times_s=times,
        peak_memory_bytes=mx.get_peak_memory(), build_s=build_s,
        tflop=forward_flops(cfg, (width // 16) * (height // 16), txt_len) / 1e12,
    )


def forward_flops(cfg: TransformerConfig, L_img: int, L_txt: int) -> float:
    """Matmul + attention FLOPs of one forward at batch 1 (2 per multiply-add)."""
    D, F, L = cfg.inner_dim, cfg.mlp_hidden_dim, L_img + L_txt
    double = 2 * L * (4 * D * D + 3 * D * F) + 4 * L * L * D
    single = 2 * L * (D * (3 * D + 2 * F) + (D + F) * D) + 4 * L * L * D
    embed = 2 * (L_img * cfg.in_channels * D + L_txt * cfg.joint_attention_dim * D + L_img * D * cfg.out_dim)
    return cfg.num_layers * double + cfg.num_single_layers * single + embed



# Peak-memory targets for a whole generation (bytes): the budgets the planner must accept.
PEAK_TARGETS = {("binary", 512): 1.5e9, ("binary", 1024): 1.9e9, ("ternary", 512): 1.8e9, ("ternary", 1024): 2.2e9}
PROMPTS = ("a bonsai tree on a wooden desk, morning light, photograph",
           "a red maple bonsai in a blue ceramic pot, studio light")


def _budget(label, fmt: str, size: int):
    """'target' -> the format and size's peak target; anything else as memory_budget takes it."""
    if label == "target":
        return PEAK_TARGETS.get((fmt, size))
    return label


def bench_generate(root, fmts=("binary", "ternary"), sizes=(512, 1024), steps=4, dtype="bfloat16",
                   budgets=("auto", "target", "none"), seed=0, log=print, pack_kwargs=None,
                   text_layers=(9, 18, 27), generations=2, checkpoint=None) -> dict:
    """Full generations on random weights at the real shapes, written to disk and loaded
    the way real weights load, under each of `budgets` ("auto": the default plan,
    "target": the format and size's peak target, "none": no limit, or a size). Each
    budget gets a fresh pipeline and `generations` generations with different prompts
    (the first includes the cold start; later ones show the steady state, reloads
    included). Per stage: time, peak (`mx.get_peak_memory`) and mean-active memory (50 ms
    samples of `mx.get_active_memory`); per step: time. Also streamed vs resident text
    encoding in the same run. `checkpoint(result)` is called after every run (to save
    partial results)."""
    from pathlib import Path

    from .memory import GB, describe, parse_budget
    from .pipeline import BonsaiPipeline
    from .random_weights import write_random_pack

    out = {"device": str(mx.default_device()), "dtype": dtype, "steps": steps, "runs": []}
    for fmt in fmts:
        pack = Path(root) / f"random-{fmt}"
        t = time.perf_counter()
        if not (pack / "model_index.json").exists():
            write_random_pack(pack, fmt, seed=seed, **(pack_kwargs or {}))
        log(f"[{fmt}] random pack at {pack} ({time.perf_counter() - t:.1f} s)")
        for size in sizes:
            for label in budgets:
                budget = parse_budget(_budget(label, fmt, size))
                mx.clear_cache()
                mx.reset_peak_memory()
                t_cold = time.perf_counter()
                pipe = BonsaiPipeline.from_pretrained(pack, dtype=dtype_named(dtype), text_layers=text_layers,
                                                      memory_budget=budget)
                run = {"format": fmt, "size": size, "budget": label,
                       "budget_gb": budget / GB if isinstance(budget, int) else budget,
                       "load_s": time.perf_counter() - t_cold, "load_peak_gb": mx.get_peak_memory() / GB,
                       "text_encoder_dequantized_matmuls": pipe.text_encoder.dequantize_matmuls,
                       "generations": []}
                try:
                    plan = pipe.plan(size, size)
                except Exception as e:  # the planner refuses: record it, run the most frugal plan
                    run["refused"] = str(e)
                    plan = pipe.smallest_plan(size, size)
                run["plan"] = {**{k: getattr(plan, k) for k in (
                    "stream_text_encoder", "keep_text_encoder", "transformer_in_text", "transformer_in_decode",
                    "vae_tile", "vae_strip", "token_chunk", "attention_rows", "sync", "estimated_peak_bytes",
                    "stage_estimates")},
                    "described": describe(plan)}
                for g in range(generations):
                    steps_at = []
                    result = pipe.generate(PROMPTS[g % len(PROMPTS)], width=size, height=size, steps=steps,
                                           seed=seed + g, plan=plan, callback=lambda e: steps_at.append(e.elapsed))
                    start = result.timings["text_encoding_s"] + result.timings.get("transformer_load_s", 0.0)
                    gen = {"timings": result.timings, "memory": result.memory,
                           "step_s": [b - a for a, b in zip([start] + steps_at[:-1], steps_at)],
                           "finite": bool(np.isfinite(result.array).all())}
                    if g == 0:
                        gen["cold_start_to_first_image_s"] = time.perf_counter() - t_cold
                        run["footprint"] = dataclasses.asdict(pipe.footprint()) if budget is not None else None
                    run["generations"].append(gen)
                    log(f"[{fmt} {size} {label} #{g + 1}] peak {result.memory['peak_gb']:.3f} GB, mean-active "
                        f"{result.memory['mean_active_gb']:.3f} GB, {result.timings['total_s']:.2f} s "
                        f"({', '.join(f'{k} {v:.3f}' for k, v in result.timings.items())})")
                out["runs"].append(run)
                if checkpoint:
                    checkpoint(out)
                del pipe
        out[f"text_stream_vs_resident_{fmt}"] = bench_text_streaming(pack, dtype, PROMPTS[0], text_layers)
    return out


def bench_text_streaming(pack, dtype, prompt, text_layers=(9, 18, 27)) -> dict:
    """Time one prompt encoding streamed (layers read and freed one by one) against the
    same encoder resident (weights loaded before timing), in one process."""
    from .memory import GB
    from .text_encoder import load_text_encoder

    te = load_text_encoder(pack, dtype=dtype_named(dtype), layers=text_layers, resident=False)
    res = {}
    for mode in ("streamed", "resident"):
        mx.clear_cache()
        mx.reset_peak_memory()
        if mode == "resident":
            te.load()
        t = time.perf_counter()
        mx.eval(te.encode([prompt], stream=mode == "streamed", sync=True))  # as under a budget
        res[f"{mode}_s"] = time.perf_counter() - t
        res[f"{mode}_peak_gb"] = mx.get_peak_memory() / GB
    te.evict()
    return res
