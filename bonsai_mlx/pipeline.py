"""Text to image: prompt -> Qwen3 embeddings -> flow-matching denoise -> VAE decode.

Matches diffusers' `Flux2KleinPipeline` given the same initial noise. The stages run one
after another (`stream` yields between denoising steps), so a caller can show progress
and previews, and cancel between steps.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np
from PIL import Image, PngImagePlugin

from .errors import BonsaiError, WeightsError
from .loading import TRANSFORMER_SUBDIRS, load_transformer
from .memory import UNCONSTRAINED, Footprint, MemoryMonitor, MemoryPlan, parse_bytes, plan_memory, smallest_plan
from .packed_linear import PackedLinear, auto_backend
from .scheduler import flux2_sigmas
from .text_encoder import ENCODER_SUBDIRS, load_text_encoder
from .vae import load_vae

# Known names for `from_pretrained`; anything with a "/" is taken as a Hugging Face repo id.
MODELS = {
    "bonsai-binary": "prism-ml/bonsai-image-binary-4B-mlx-1bit",
    "bonsai-ternary": "prism-ml/bonsai-image-ternary-4B-mlx-2bit",
}
# PrismML's packs ship no VAE; they decode with BFL's small decoder.
DEFAULT_VAE_REPO = "black-forest-labs/FLUX.2-small-decoder"
# What a pipeline reads; repos also hold root-level single-file checkpoints we never need.
_PIPELINE_FILES = ["model_index.json"] + [
    f"{d}/*" for d in (*TRANSFORMER_SUBDIRS, *ENCODER_SUBDIRS, "tokenizer", "vae")]
_VAE_FILES = ["*.json", "*.safetensors", "vae/*"]

MIN_SIZE, MAX_SIZE = 64, 2048  # pixels per side; the multiple-of-16 rule is the VAE's x the 2x2 patch
MAX_STEPS = 1000


@dataclass
class StepEvent:
    step: int  # 1-based
    steps: int
    sigma: float  # noise level the step started from
    sigma_next: float
    elapsed: float  # seconds since generation started
    preview: Image.Image | None = None


@dataclass
class GenerationResult:
    image: Image.Image
    prompt: str
    negative_prompt: str | None
    seed: int | None
    steps: int
    guidance: float
    width: int
    height: int
    model: str
    timings: dict = field(default_factory=dict)
    array: np.ndarray | None = None  # float32 [H, W, 3] in [0, 1], before 8-bit rounding
    memory: dict = field(default_factory=dict)  # MemoryReport.as_dict(): peak / mean-active per stage
    plan: MemoryPlan | None = None

    def metadata(self) -> dict:
        return {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
            "steps": self.steps, "guidance": self.guidance, "width": self.width, "height": self.height,
            "model": self.model, "timings": self.timings, "memory": self.memory, "software": "bonsai-mlx",
        }

    def save(self, path: str | Path) -> Path:
        """Write a PNG with the settings in its text chunks, atomically: the image appears
        complete or not at all, never half-written."""
        path = Path(path)
        info = PngImagePlugin.PngInfo()
        for k, v in self.metadata().items():
            info.add_text(k, v if isinstance(v, str) else json.dumps(v))
        info.add_text("parameters", json.dumps(self.metadata()))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            self.image.save(tmp, format="PNG", pnginfo=info)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


class Cancelled(BonsaiError):
    """Raised by `generate` when its `cancel` callback asked to stop."""


def check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise BonsaiError(f"{name} must be an integer number of pixels, got {v!r}")
        if v % 16:
            lo, hi = v // 16 * 16, v // 16 * 16 + 16
            raise BonsaiError(f"{name}={v} is not a multiple of 16 (the VAE and 2x2 patching need it); try {lo} or {hi}")
        if not MIN_SIZE <= v <= MAX_SIZE:
            raise BonsaiError(f"{name}={v} is outside the supported range {MIN_SIZE}..{MAX_SIZE} pixels")


def image_ids(h: int, w: int) -> mx.array:
    """(t, h, w, l) = (0, i, j, 0) for the latent grid, row-major."""
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    z = np.zeros(h * w, np.int32)
    return mx.array(np.stack([z, i.reshape(-1), j.reshape(-1), z], axis=-1).astype(np.int32))


def text_ids(length: int) -> mx.array:
    z = np.zeros(length, np.int32)
    return mx.array(np.stack([z, z, z, np.arange(length, dtype=np.int32)], axis=-1))


def to_pil(images: mx.array) -> list[Image.Image]:
    """[B, H, W, 3] floats in [0, 1] -> 8-bit images, rounded as diffusers does."""
    a = np.array(images.astype(mx.float32))
    return [Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8)) for x in a]


VAE_TILE_OVERLAP = 16  # pixels shared by neighbouring VAE tiles under a budget


def _fused_attention(dtype) -> bool:
    """Whether MLX runs the transformer's attention (head dim 128, no mask) as one fused
    kernel that never holds the scores: Metal's does for 16- and 32-bit floats; CUDA's
    goes through cuDNN, for float16/bfloat16 only (and unless MLX_CUDA_USE_CUDNN_SDPA=0);
    the CPU back-end materialises the scores."""
    if mx.default_device() == mx.cpu:
        return False
    if mx.metal.is_available():
        return True
    return dtype in (mx.float16, mx.bfloat16) and os.environ.get("MLX_CUDA_USE_CUDNN_SDPA", "1") != "0"


def _scratch_peak(fn) -> int:
    """Bytes `fn()` allocates at its peak beyond what was live before it."""
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn())
    mx.synchronize()
    return mx.get_peak_memory() - base


def _fit_line(x0: float, x1: float, y0: float, y1: float) -> tuple[float, float]:
    """(fixed, slope) of the line through two measurements, neither below zero."""
    slope = max(y1 - y0, 0) / (x1 - x0)
    return max(y0 - slope * x0, 0.0), slope


def _nbytes(module) -> int:
    from mlx.utils import tree_flatten
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


class BonsaiPipeline:
    """Stages: text encoding -> denoising -> decoding. With a memory budget, each stage
    holds only what it needs (see memory.plan_memory); without one, everything stays
    resident between generations for speed."""

    def __init__(self, transformer, text_encoder, vae, *, is_distilled: bool = True, model: str = "local",
                 max_sequence_length: int = 512, memory_budget=None, transformer_loader=None):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.vae = vae
        self.is_distilled = is_distilled
        self.model = model
        self.max_sequence_length = max_sequence_length
        self.memory_budget = None if memory_budget is None else parse_bytes(memory_budget)
        # Re-reads the transformer after a budgeted run released it.
        self._transformer_loader = transformer_loader
        self._transformer_info = self._describe_transformer(transformer)

    @staticmethod
    def _describe_transformer(t) -> dict:
        packed = [m for _, m in t.named_modules() if isinstance(m, PackedLinear)]
        reference = any(m.backend == "reference" or (m.backend == "auto" and auto_backend() == "reference")
                        for m in packed)
        return {"bytes": _nbytes(t), "config": t.config, "reference_matmul": reference, "dtype": t.dtype}

    def release_transformer(self) -> None:
        if self._transformer_loader is None:
            raise BonsaiError("this pipeline was built from objects, not files: it cannot release its transformer")
        self.transformer = None
        mx.clear_cache()

    def _ensure_transformer(self):
        if self.transformer is None:
            self.transformer = self._transformer_loader()
        return self.transformer

    def footprint(self) -> Footprint:
        cfg = self._transformer_info["config"]
        te = self.text_encoder
        n = te.config.num_layers_needed
        layers = [te.weight_bytes(i) for i in range(n)]
        args = te.config.args
        dec = self.vae.config.decoder_channels
        up_fixed, up_px, mid_fixed, mid_px = self._vae_scratch()
        return Footprint(
            transformer_bytes=self._transformer_info["bytes"], transformer_dim=cfg.inner_dim,
            transformer_mlp=cfg.mlp_hidden_dim, transformer_heads=cfg.num_attention_heads,
            transformer_max_out=3 * cfg.inner_dim + 2 * cfg.mlp_hidden_dim,
            reference_matmul=self._transformer_info["reference_matmul"],
            text_resident_bytes=te.weight_bytes(None) + sum(layers),
            text_stream_bytes=te.weight_bytes(None) + max(layers, default=0),
            text_hidden=args.hidden_size, text_heads=args.num_attention_heads, text_len=self.max_sequence_length,
            vae_bytes=_nbytes(self.vae), vae_mid_channels=dec[-1],
            vae_up_fixed=up_fixed, vae_up_per_pixel=up_px, vae_mid_fixed=mid_fixed, vae_mid_per_pixel=mid_px,
            fused_attention=_fused_attention(self._transformer_info["dtype"]),
            # Qwen3TextEncoder.dequantize_matmuls: the widest layer's dense weight, twice (MLX may
            # dequantize the next one before the last is freed). Measured without it on the CPU,
            # the text stage exceeded its estimate by 3%.
            text_dequant_bytes=2 * max(args.intermediate_size, args.num_attention_heads * args.head_dim)
            * args.hidden_size * te.dtype.size if te.dequantize_matmuls else 0,
            dtype_bytes=self._transformer_info["dtype"].size,
        )

    def _vae_scratch(self) -> tuple[float, float, float, float]:
        """Peak decoder scratch on this device and dtype, as (up-path fixed bytes, bytes per
        output pixel, mid-block fixed bytes, bytes per latent pixel), each fitted to two
        measured runs block by block as budgeted decodes run them: the up path on 16x16
        and 32x32 latent windows, the mid block on 16x16 and 32x32 latents (less its
        attention's measured scratch: `memory.estimate` adds scores for the real size). Backends differ
        by several x (MLX's CPU convolution unfolds 3x3 patches, GPU kernels do not), so
        this is measured, once; it resets the peak-memory counter."""
        if getattr(self, "_vae_fit", None) is None:
            dec = self.vae.decoder
            was = dec.eval_per_block
            dec.eval_per_block = True
            C_lat, C_mid = self.vae.config.latent_channels, self.vae.config.decoder_channels[-1]
            up, mid = [], []
            try:
                for side in (16, 32):
                    z = mx.zeros((1, side, side, C_lat), dtype=self.vae.dtype)
                    h = mx.zeros((1, side, side, C_mid), dtype=self.vae.dtype)
                    q = mx.zeros((1, 1, side * side, C_mid), dtype=self.vae.dtype)
                    mx.eval(z, h, q)
                    # The mid block less its attention's scratch (not its output) as measured at
                    # this size: the scores grow as L^2 here but are chunked at real sizes,
                    # where memory.estimate adds its own (generous) model of them.
                    sdpa = _scratch_peak(lambda: mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0))
                    sdpa = max(sdpa - q.nbytes, 0)
                    mid.append(_scratch_peak(lambda: dec.mid(z)) - sdpa)
                    up.append(_scratch_peak(lambda: dec.up(h)))
                    del z, h, q
            finally:
                dec.eval_per_block = was
            f = self.vae.decoder_factor
            self._vae_fit = (*_fit_line((16 * f) ** 2, (32 * f) ** 2, *up), *_fit_line(16**2, 32**2, *mid))
        return self._vae_fit

    def plan(self, width: int = 512, height: int = 512, memory_budget=None, cfg: bool = False) -> MemoryPlan:
        """How a generation of this size would run under `memory_budget` (default: the
        pipeline's). Raises, saying the smallest budget that works, when nothing fits."""
        check_size(width, height)
        budget = self.memory_budget if memory_budget is None else parse_bytes(memory_budget)
        if budget is None:  # nothing to fit, so no footprint (its VAE calibration decodes and resets the peak)
            return UNCONSTRAINED
        return plan_memory(self.footprint(), width, height, budget, cfg_batches=2 if cfg else 1)

    def smallest_plan(self, width: int = 512, height: int = 512, cfg: bool = False) -> MemoryPlan:
        """The most frugal way to run a generation of this size (and its estimated peak)."""
        check_size(width, height)
        return smallest_plan(self.footprint(), width, height, cfg_batches=2 if cfg else 1)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, *, dtype=mx.bfloat16, vae=None,
                        quantize: str | None = None, backend: str = "auto", text_layers=(9, 18, 27),
                        revision: str | None = None, cache_dir: str | None = None, memory_budget=None,
                        vae_dtype=None) -> "BonsaiPipeline":
        """Load a pipeline from a local directory or a Hugging Face repo id.

        Accepted layouts: PrismML's MLX packs (`transformer-packed-mflux/`,
        `text_encoder-mlx-4bit/`, `tokenizer/`; no VAE inside, so `vae` or the small
        decoder from the Hub is used) and diffusers FLUX.2 klein pipelines
        (`model_index.json`, `transformer/`, `text_encoder/`, `tokenizer/`, `vae/`).
        `quantize` packs a dense transformer's block linears on load.
        `dtype` is the transformer's and text encoder's (bfloat16 by default: Qwen3's
        residual stream can exceed float16's range); the VAE runs in `vae_dtype`
        (float16 by default, float32 if dtype is float32).
        `memory_budget` (bytes or e.g. "1.5GB") makes every generation plan its stages
        to stay under it; see `plan`.
        """
        root = resolve_model(path_or_repo_id, revision=revision, cache_dir=cache_dir)
        is_distilled = True
        index = root / "model_index.json"
        if index.exists():
            try:
                is_distilled = bool(json.loads(index.read_text()).get("is_distilled", False))
            except json.JSONDecodeError as e:
                raise WeightsError(f"{index} is not valid JSON ({e})") from None
        missing = [s for s in ("transformer", "text encoder", "tokenizer") if not _has_part(root, s)]
        if missing:
            raise WeightsError(
                f"{root} is not a FLUX.2 klein pipeline or Bonsai pack: no {', '.join(missing)} found. Expected "
                "transformer-packed-mflux/ or transformer/, text_encoder-mlx-4bit/ or text_encoder/, and tokenizer/."
            )
        budget = None if memory_budget is None else parse_bytes(memory_budget)  # validate before loading

        def loader():
            return load_transformer(root, dtype=dtype, quantize=quantize, backend=backend)

        transformer = loader()
        text_encoder = load_text_encoder(root, dtype=dtype, layers=text_layers, resident=False)
        if vae is None:
            vae = root / "vae" if (root / "vae" / "config.json").exists() else resolve_model(
                DEFAULT_VAE_REPO, cache_dir=cache_dir, files=_VAE_FILES,
                what="the VAE (PrismML packs decode with BFL's small decoder; or pass vae=)")
        vae_dtype = vae_dtype or (mx.float32 if dtype == mx.float32 else mx.float16)
        vae_model = load_vae(vae, dtype=vae_dtype) if isinstance(vae, (str, os.PathLike)) else vae
        return cls(transformer, text_encoder, vae_model, is_distilled=is_distilled, model=str(path_or_repo_id),
                   memory_budget=budget, transformer_loader=loader)

    # ---------------------------------------------------------------- running
    def defaults(self, steps, guidance) -> tuple[int, float]:
        steps = (4 if self.is_distilled else 50) if steps is None else steps
        guidance = (1.0 if self.is_distilled else 4.0) if guidance is None else float(guidance)
        if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
            raise BonsaiError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
        if guidance < 0 or not np.isfinite(guidance):
            raise BonsaiError(f"guidance must be a finite number >= 0, got {guidance}")
        return int(steps), guidance

    def initial_noise(self, seed: int | None, latents, width: int, height: int) -> tuple[mx.array, int | None]:
        """[1, L, C] tokens of N(0, 1) noise, drawn as [1, C, H/16, W/16] and packed row-major
        (the reference's layout), from `seed` or from caller-supplied `latents`."""
        C = self._transformer_info["config"].in_channels
        h, w = height // 16, width // 16
        if latents is not None:
            lat = mx.array(latents).astype(mx.float32)
            if lat.shape == (1, C, h, w) or lat.shape == (C, h, w):
                return lat.reshape(1, C, h * w).transpose(0, 2, 1), seed
            if lat.shape == (1, h * w, C) or lat.shape == (h * w, C):
                return lat.reshape(1, h * w, C), seed
            raise BonsaiError(
                f"latents for a {width}x{height} image must be [1, {C}, {h}, {w}] or [1, {h * w}, {C}], "
                f"got {list(lat.shape)}"
            )
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        noise = mx.random.normal((1, C, h, w), key=mx.random.key(seed))
        return noise.reshape(1, C, h * w).transpose(0, 2, 1), seed

    def stream(self, prompt: str, width: int = 512, height: int = 512, steps: int | None = None,
               seed: int | None = None, guidance: float | None = None, negative_prompt: str | None = None,
               latents=None, preview: bool = False, preview_every: int = 1,
               memory_budget=None, plan: MemoryPlan | None = None) -> Iterator[StepEvent | GenerationResult]:
        """Yield a StepEvent after every denoising step, then the GenerationResult.
        Stop iterating (break / close()) to cancel: no further work is done.
        `plan` overrides the memory plan chosen from the budget."""
        if not isinstance(prompt, str):
            raise BonsaiError(f"prompt must be a string, got {type(prompt).__name__}")
        check_size(width, height)
        steps, guidance = self.defaults(steps, guidance)
        use_cfg = guidance > 1.0 and not self.is_distilled
        budget = self.memory_budget if memory_budget is None else parse_bytes(memory_budget)
        if plan is None:
            plan = self.plan(width, height, budget, cfg=use_cfg)  # refuses up front when nothing fits
        x, seed = self.initial_noise(seed, latents, width, height)
        # Everything above runs now, so bad arguments fail at the call, not at the first next().
        return self._run(prompt, width, height, steps, seed, guidance, negative_prompt, use_cfg, budget, plan, x,
                         preview, preview_every)

    def _run(self, prompt, width, height, steps, seed, guidance, negative_prompt, use_cfg, budget, plan, x,
             preview, preview_every) -> Iterator[StepEvent | GenerationResult]:
        te = self.text_encoder
        timings = {}
        t_start = time.perf_counter()
        # Under a budget, freed buffers MLX keeps for reuse (its cache, not active memory,
        # but still the process's memory on a unified-memory device) may fill only the
        # headroom the plan leaves (0 when the plan just fits: MLX then reuses nothing, which
        # costs some speed). MLX's limit is per process: restored afterwards, also on
        # cancellation, unless something else changed it meanwhile.
        cache_limit = None if budget is None else max(budget - plan.estimated_peak_bytes, 0)
        previous_limit = None if cache_limit is None else mx.set_cache_limit(cache_limit)
        try:
            with MemoryMonitor() as mon:
                with mon.stage("text_encoding"):
                    if not plan.keep_transformer and self.transformer is not None:
                        self.release_transformer()
                    cond = self._encode(prompt, plan)
                    neg = self._encode(negative_prompt or "", plan) if use_cfg else None
                    if budget is not None or plan.stream_text_encoder:
                        te.evict()  # gone before denoising starts
                timings["text_encoding_s"] = time.perf_counter() - t_start

                t_denoise = time.perf_counter()
                with mon.stage("denoising"):
                    model = self._ensure_transformer()
                    model.set_attention_chunk(plan.attention_chunk)
                    model.eval_per_block = plan.eval_per_block
                    model.set_token_chunk(plan.token_chunk, sync=plan.eval_per_block)
                    dtype = model.dtype
                    cond = cond.astype(dtype)
                    neg = None if neg is None else neg.astype(dtype)
                    h, w = height // 16, width // 16
                    img_ids, txt_ids = image_ids(h, w), text_ids(cond.shape[1])
                    sigmas = flux2_sigmas(steps, h * w)
                    for i in range(steps):
                        sigma, sigma_next = sigmas[i], sigmas[i + 1]
                        t = mx.array([sigma], dtype=mx.float32)
                        xin = x.astype(dtype)
                        v = model(xin, cond, t, img_ids, txt_ids).astype(mx.float32)
                        if use_cfg:
                            v_neg = model(xin, neg, t, img_ids, txt_ids).astype(mx.float32)
                            v = v_neg + guidance * (v - v_neg)
                        x = x + (sigma_next - sigma) * v  # Euler step of the rectified flow, in float32
                        mx.eval(x)
                        event = StepEvent(i + 1, steps, sigma, sigma_next, time.perf_counter() - t_start)
                        if preview and ((i + 1) % max(1, preview_every) == 0 or i + 1 == steps):
                            event.preview = self.preview(x - sigma_next * v if sigma_next > 0 else x, width, height)
                        yield event
                    del model
                    if not bool(mx.all(mx.isfinite(x))):
                        raise BonsaiError(
                            f"denoising produced non-finite values in {dtype}: the activations overflowed. "
                            "Run with dtype bfloat16 or float32 (--dtype)."
                        )
                timings["denoising_s"] = time.perf_counter() - t_denoise

                t_decode = time.perf_counter()
                with mon.stage("decoding"):
                    if not plan.keep_transformer:
                        self.release_transformer()
                    self.vae.decoder.eval_per_block = plan.eval_per_block
                    # Exact tiles (full context, whole-image GroupNorm statistics) equal the untiled
                    # decode up to float rounding, so a narrow cross-fade is enough; wide overlaps
                    # only multiplied the tiles (49 instead of 16 for 128 px tiles at 512x512).
                    overlap = VAE_TILE_OVERLAP
                    images = self.vae.decode_tokens(x.astype(self.vae.dtype), height, width, tile_size=plan.vae_tile,
                                                    overlap=overlap)
                    mx.eval(images)
                timings["decoding_s"] = time.perf_counter() - t_decode
                timings["total_s"] = time.perf_counter() - t_start
            arr = np.array(images.astype(mx.float32))[0]
            yield GenerationResult(
                image=to_pil(images)[0], prompt=prompt, negative_prompt=negative_prompt if use_cfg else None, seed=seed,
                steps=steps, guidance=guidance if use_cfg else 1.0, width=width, height=height, model=self.model,
                timings=timings, array=arr, plan=plan,
                memory={**mon.report.as_dict(), "cache_limit_bytes": cache_limit},
            )
        finally:
            if previous_limit is not None:
                current = mx.set_cache_limit(previous_limit)
                if current != cache_limit:  # changed meanwhile (another run, the caller): keep theirs
                    mx.set_cache_limit(current)

    def _encode(self, prompt: str, plan: MemoryPlan) -> mx.array:
        emb = self.text_encoder.encode([prompt], max_length=self.max_sequence_length,
                                       stream=plan.stream_text_encoder, sync=plan.eval_per_block)
        mx.eval(emb)
        if not bool(mx.all(mx.isfinite(emb))):
            raise BonsaiError(
                f"the text encoder overflowed in {emb.dtype} (Qwen3's activations exceed float16's range); "
                "use dtype bfloat16 (the default) or float32"
            )
        return emb

    def generate(self, prompt: str, width: int = 512, height: int = 512, steps: int | None = None,
                 seed: int | None = None, guidance: float | None = None, negative_prompt: str | None = None,
                 latents=None, callback=None, cancel=None, memory_budget=None,
                 plan: MemoryPlan | None = None) -> GenerationResult:
        """Run to the end. `callback(StepEvent)` is called after each step; `cancel()`
        returning True stops between steps with `Cancelled`."""
        gen = self.stream(prompt, width, height, steps, seed, guidance, negative_prompt, latents,
                          memory_budget=memory_budget, plan=plan)
        for item in gen:
            if isinstance(item, GenerationResult):
                return item
            if callback is not None:
                callback(item)
            if cancel is not None and cancel():
                gen.close()
                raise Cancelled(f"generation cancelled after step {item.step} of {item.steps}")
        raise BonsaiError("generation ended without a result")

    def preview(self, x0_tokens: mx.array, width: int, height: int, max_side: int = 256) -> Image.Image:
        """A cheap look at the current x0 estimate: the latent grid averaged down 2x2
        at a time until the image is at most `max_side` pixels, then VAE-decoded."""
        h, w = height // 16, width // 16
        grid = x0_tokens.reshape(1, h, w, -1)
        while max(grid.shape[1], grid.shape[2]) * 16 > max_side and grid.shape[1] % 2 == 0 and grid.shape[2] % 2 == 0:
            grid = (grid[:, ::2, ::2] + grid[:, 1::2, ::2] + grid[:, ::2, 1::2] + grid[:, 1::2, 1::2]) / 4
        gh, gw = grid.shape[1], grid.shape[2]
        img = self.vae.decode_tokens(grid.reshape(1, gh * gw, -1).astype(self.vae.dtype), gh * 16, gw * 16)
        return to_pil(img)[0]


def _has_part(root: Path, part: str) -> bool:
    subdirs = {
        "transformer": TRANSFORMER_SUBDIRS,
        "text encoder": ENCODER_SUBDIRS,
        "tokenizer": ("tokenizer", *ENCODER_SUBDIRS),
    }[part]
    return any((root / s).is_dir() for s in subdirs)


def resolve_model(name: str | os.PathLike, *, revision=None, cache_dir=None, files=tuple(_PIPELINE_FILES),
                  what: str = "the model") -> Path:
    """A local directory, a known model name, or a Hub repo id -> a local directory.

    Only the files a pipeline needs are fetched; HF_HUB_OFFLINE and the HF cache are
    honoured by huggingface_hub itself.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    name = str(name)
    repo_id = MODELS.get(name, name)
    if path.exists() or (repo_id.count("/") != 1 or name.startswith((".", "/", "~"))):
        raise BonsaiError(
            f"{name!r} is neither a model directory nor a known model name. Known names: "
            f"{', '.join(sorted(MODELS))}; or pass a Hugging Face repo id like 'org/name', or a local directory."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(files))
    except LocalEntryNotFoundError:
        raise WeightsError(
            f"{what} ({repo_id}) is not in the Hugging Face cache and downloads are off (HF_HUB_OFFLINE) or the "
            f"Hub cannot be reached. Download it once while online (huggingface-cli download {repo_id}) or pass "
            "a local directory."
        ) from None
    except HfHubHTTPError as e:
        raise WeightsError(f"could not fetch {what} ({repo_id}) from the Hugging Face Hub: {e}") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"could not fetch {what} ({repo_id}): {e}") from None
    return Path(local)
