"""Benchmarks that need no downloaded weights: random weights at the real shapes."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .config import TransformerConfig
from .execution import CUDA_GRAPHS
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


def random_pack(root, fmt: str, seed: int = 0, pack_kwargs=None, log=print):
    """The random pack `root`/random-`fmt`, written once: every benchmark that is given the
    same `root` reads the same pack."""
    from .random_weights import write_random_pack

    pack = Path(root) / f"random-{fmt}"
    t = time.perf_counter()
    if not (pack / "model_index.json").exists():
        write_random_pack(pack, fmt, seed=seed, **(pack_kwargs or {}))
    log(f"[{fmt}] random pack at {pack} ({time.perf_counter() - t:.1f} s)")
    return pack


def open_random_pipeline(pack, fmt: str, size: int, label, dtype: str, text_layers):
    """A fresh pipeline on `pack` under the budget `label` (see `_budget`), peak memory
    reset first; (pipeline, the run's record, the time loading started)."""
    from .memory import GB, parse_budget
    from .pipeline import BonsaiPipeline

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
           "cuda_graphs": os.environ.get(CUDA_GRAPHS)}  # the variable as the pipeline left it (MLX reads it once)
    return pipe, run, t_cold


def choose_plan(pipe, size: int, record: dict, images: tuple = ()):
    """The plan the pipeline's budget gives a size x size generation conditioned on
    `images`; when the planner refuses, the reason goes into `record` and the most frugal
    plan runs instead. The plan's settings and estimates go into record["plan"]."""
    from .memory import describe

    try:
        plan = pipe.plan(size, size, images=images)
    except BonsaiError as e:
        record["refused"] = str(e)
        plan = pipe.smallest_plan(size, size, images=images)
    record["plan"] = {**{k: getattr(plan, k) for k in (
        "stream_text_encoder", "keep_text_encoder", "transformer_in_text", "transformer_in_decode",
        "vae_tile", "vae_strip", "vae_encode_strip", "token_chunk", "hidden_parts", "vae_overlap", "attention_rows", "sync",
        "overlap", "whole_slabs", "vae_sync", "text_sync", "keep_modulation", "estimated_peak_bytes", "part_bytes", "vae_part_bytes",
        "stage_estimates")},
        "described": describe(plan)}
    return plan


def timed_generation(pipe, prompt: str, size: int, steps: int, seed: int, plan, log=print, label: str = "",
                     **edit) -> dict:
    """One generation (editing arguments in `edit`): its timings, memory report, the time of
    each denoising step run and whether the image is finite."""
    steps_at, peaks = [], []

    def step_done(event):
        steps_at.append(event.elapsed)
        peaks.append(mx.get_peak_memory() / 1e9)  # the stage's running peak: which step raised it

    wall = time.perf_counter()
    result = pipe.generate(prompt, width=size, height=size, steps=steps, seed=seed, plan=plan, callback=step_done,
                           **edit)
    wall = time.perf_counter() - wall
    t = result.timings
    # the stages before denoising: the first step starts after every one of them
    start = sum(t.get(k, 0.0) for k in ("text_encoding_s", "image_encoding_s", "transformer_load_s", "modulation_s"))
    log(f"[{label}] peak {result.memory['peak_gb']:.3f} GB, mean-active {result.memory['mean_active_gb']:.3f} GB, "
        f"active+cached (sampled) {result.memory['sampled_footprint_gb']:.3f} GB, "
        f"{t['total_s']:.2f} s ({', '.join(f'{k} {v:.3f}' for k, v in t.items())})")
    return {"timings": t, "wall_s": wall, "memory": result.memory, "step_s": [b - a for a, b in zip([start] + steps_at[:-1], steps_at)],
            "running_peak_gb": peaks,
            "finite": bool(np.isfinite(result.array).all())}


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
    out = {"device": str(mx.default_device()), "dtype": dtype, "steps": steps, "runs": []}
    for fmt in fmts:
        pack = random_pack(root, fmt, seed, pack_kwargs, log)
        for size in sizes:
            for label in budgets:
                pipe, run, t_cold = open_random_pipeline(pack, fmt, size, label, dtype, text_layers)
                run["generations"] = []
                plan = choose_plan(pipe, size, run)
                for g in range(generations):
                    t = time.perf_counter()  # what planning costs a generation that plans for itself
                    try:
                        pipe.plan(size, size)
                    except BonsaiError:
                        pass
                    plan_s = time.perf_counter() - t
                    gen = timed_generation(pipe, PROMPTS[g % len(PROMPTS)], size, steps, seed + g, plan, log,
                                           f"{fmt} {size} {label} #{g + 1}")
                    gen["plan_s"] = plan_s
                    if g == 0:
                        gen["cold_start_to_first_image_s"] = time.perf_counter() - t_cold
                        run["footprint"] = dataclasses.asdict(pipe.footprint()) if pipe.memory_budget is not None \
                            else None
                    run["generations"].append(gen)
                out["runs"].append(run)
                if checkpoint:
                    checkpoint(out)
                del pipe
        out[f"text_stream_vs_resident_{fmt}"] = bench_text_streaming(pack, dtype, PROMPTS[0], text_layers)
    return out


# The cases of `bench_edit`: what each adds to a plain generation. "plain" is the baseline
# every ratio is taken against (same size, budget and pipeline).
EDIT_CASES = {
    "plain": {},
    "reference-1": {"references": 1},
    "reference-2": {"references": 2},
    "inpaint": {"init_image": True, "mask": True},
    "image-to-image": {"init_image": True},
    "lora-r16": {"lora_ranks": (16,)},
    "lora-r64": {"lora_ranks": (64,)},
    "lora-r16+r64": {"lora_ranks": (16, 64)},
}
# The summary figures each case gets as a ratio to the plain run's.
RATIOS = ("total_s", "denoising_s", "denoise_per_step_s", "peak_gb", "mean_active_gb")


def picture(width: int, height: int, seed: int, mode: str = "RGB"):
    """A smooth random picture (low-resolution noise scaled up), so the VAE sees structure."""
    from PIL import Image

    g = np.random.default_rng(seed)
    small = Image.fromarray(g.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC).convert(mode)


def edit_arguments(case: str, size: int, strength: float, seed: int = 0) -> dict:
    """`generate`'s editing arguments for one of EDIT_CASES at size x size: references and
    init image the output's size, a mask that repaints the central quarter of the area."""
    from PIL import Image

    spec = EDIT_CASES[case]
    edit = {}
    if spec.get("references"):
        edit["image"] = [picture(size, size, seed + 1 + i) for i in range(spec["references"])]
    if spec.get("init_image"):
        edit.update(init_image=picture(size, size, seed), strength=strength)
    if spec.get("mask"):
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
        edit["mask"] = mask
    return edit


def random_lora_file(root, rank: int, cfg: TransformerConfig, seed: int = 0):
    """`root`/loras/random-lora-r`rank`.safetensors for transformers of `cfg`, written once."""
    from .random_weights import write_random_lora

    path = Path(root) / "loras" / f"random-lora-r{rank}-{cfg.num_layers}x{cfg.num_single_layers}x{cfg.inner_dim}" \
        f".safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_random_lora(path, rank, transformer=cfg, seed=seed + rank)
    return path


def edit_summary(gen: dict, plan) -> dict:
    """The figures of one generation that the table shows."""
    from .memory import GB

    t, mem = gen["timings"], gen["memory"]
    steps_run = len(gen["step_s"])
    return {"total_s": t["total_s"], "stages_s": {k: v["seconds"] for k, v in mem["stages"].items()},
            "text_encoding_s": t["text_encoding_s"], "image_encoding_s": t.get("image_encoding_s", 0.0),
            "transformer_load_s": t.get("transformer_load_s", 0.0), "denoising_s": t["denoising_s"],
            "decoding_s": t["decoding_s"], "steps_run": steps_run, "denoise_per_step_s": t["denoising_s"] / steps_run,
            "peak_gb": mem["peak_gb"], "mean_active_gb": mem["mean_active_gb"],
            "estimated_peak_gb": plan.estimated_peak_bytes / GB if plan.estimated_peak_bytes else None,
            "stage_estimates_gb": {k: v / GB for k, v in plan.stage_estimates.items()}}


def bench_edit(root, fmt="binary", sizes=(512, 1024), steps=4, dtype="bfloat16", budgets=("auto", "none"),
               cases=tuple(EDIT_CASES), strength=0.6, seed=0, log=print, pack_kwargs=None,
               text_layers=(9, 18, 27), generations=2, checkpoint=None) -> dict:
    """Editing and LoRA next to plain generation, on the random pack `bench_generate` writes
    into `root` (written here if absent). Per size and budget, one fresh pipeline runs
    every case of `cases` (EDIT_CASES; "plain" always, first) `generations` times, each
    with a new prompt (so the text is always encoded); the first generation of a case is
    its warm-up (kernels compiled for its shapes) and the summary is the last one's. Each
    case's summary carries its ratios to "plain" (RATIOS). LoRAs: random rank-r files in
    diffusers' key style on every block linear, written once into `root`/loras and loaded
    for their cases (two for a stacked case), unloaded after. `checkpoint(result)` is
    called after every case."""
    from .images import prepare_edit

    unknown = [c for c in cases if c not in EDIT_CASES]
    if unknown:
        raise BonsaiError(f"unknown case(s) {', '.join(unknown)}; the cases are {', '.join(EDIT_CASES)}")
    if not (isinstance(generations, int) and generations >= 1):
        raise BonsaiError(f"generations must be at least 1, got {generations!r}")
    # plain first (the baseline), then the cases that encode no image: the first image read
    # leaves the VAE's encoder resident, which every case after it holds and plain did not
    encodes = lambda c: bool(EDIT_CASES[c].get("references") or EDIT_CASES[c].get("init_image"))  # noqa: E731
    cases = ["plain"] + sorted((c for c in dict.fromkeys(cases) if c != "plain"), key=encodes)
    pack = random_pack(root, fmt, seed, pack_kwargs, log)
    out = {"device": str(mx.default_device()), "dtype": dtype, "steps": steps, "format": fmt, "strength": strength,
           "generations": generations, "runs": []}
    n = 0  # generations so far: each gets its own prompt
    for size in sizes:
        for label in budgets:
            pipe, run, _ = open_random_pipeline(pack, fmt, size, label, dtype, text_layers)
            run["cases"] = {}
            out["runs"].append(run)
            for case in cases:
                spec, record = EDIT_CASES[case], {}
                edit = edit_arguments(case, size, strength, seed)
                if spec.get("lora_ranks"):
                    t = time.perf_counter()
                    for rank in spec["lora_ranks"]:
                        pipe.load_lora(random_lora_file(root, rank, pipe.models.transformer_info["config"], seed))
                    record.update(lora_load_s=time.perf_counter() - t, lora_bytes=pipe.models.loras.nbytes,
                                  loras=[name for name, _, _ in pipe.loras])
                images = prepare_edit(**edit, width=size, height=size).sizes
                plan = choose_plan(pipe, size, record, images)
                record["generations"] = []
                for g in range(generations):
                    prompt = f"{PROMPTS[n % len(PROMPTS)]}, take {n}"
                    n += 1
                    record["generations"].append(timed_generation(pipe, prompt, size, steps, seed + g, plan, log,
                                                                  f"{fmt} {size} {label} {case} #{g + 1}", **edit))
                if spec.get("lora_ranks"):
                    pipe.unload_lora()
                s = record["summary"] = edit_summary(record["generations"][-1], plan)
                plain = run["cases"].get("plain", record)["summary"]  # plain runs first
                s["ratio_to_plain"] = {k: s[k] / plain[k] if plain[k] else None for k in RATIOS}
                run["cases"][case] = record
                if checkpoint:  # after every case: a run cut short keeps what it measured
                    checkpoint(out)
            del pipe
    return out


EDIT_COLUMNS = ("size", "budget", "case", "steps run", "total s", "text s", "image enc. s", "reload s", "denoise s",
                "s/step", "decode s", "peak GB", "mean-active GB", "estimated peak GB", "total x plain",
                "s/step x plain", "peak x plain", "mean-active x plain")


def edit_table(result: dict | None = None) -> str:
    """`bench_edit`'s result as a markdown table, one row per size, budget and case (the
    summary: the last generation). Without a result: the header only."""
    def num(v, digits=3):
        return "" if v is None else f"{v:.{digits}f}"

    lines = ["| " + " | ".join(EDIT_COLUMNS) + " |", "|" + "---|" * len(EDIT_COLUMNS)]
    for run in (result or {}).get("runs", []):
        for case, record in run["cases"].items():
            s, r = record["summary"], record["summary"]["ratio_to_plain"]
            cells = [str(run["size"]), str(run["budget"]) + (" (refused)" if "refused" in record else ""), case,
                     str(s["steps_run"]), num(s["total_s"]), num(s["text_encoding_s"]),
                     num(s["image_encoding_s"]) if s["image_encoding_s"] else "",
                     num(s["transformer_load_s"]) if s["transformer_load_s"] else "", num(s["denoising_s"]),
                     num(s["denoise_per_step_s"]), num(s["decoding_s"]), num(s["peak_gb"]),
                     num(s["mean_active_gb"]), num(s["estimated_peak_gb"]), num(r["total_s"], 2),
                     num(r["denoise_per_step_s"], 2), num(r["peak_gb"], 2), num(r["mean_active_gb"], 2)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
