"""Memory: measuring it the way PrismML's whitepaper does, and planning under a budget.

`MemoryMonitor` polls `mx.get_active_memory()` every 50 ms from a background thread
and records `mx.get_peak_memory()` per stage; mean-active is the trapezoidal integral
of the samples over the render time.

`plan_memory` picks how to run the stages (stream the text encoder or keep it, keep
the transformer across stages or reload it, VAE tile size, attention chunking) from
estimates of each stage's footprint, preferring the fastest plan that fits.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field

import mlx.core as mx

from .errors import BonsaiError
from .vae import _MAX_SCORES as VAE_MAX_SCORES  # attention score elements per query chunk of the mid block

GB = 1e9
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value) -> int:
    """1500000000, "1.5GB", "1500MB", "1.5 GiB" -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise BonsaiError(f"memory budget {value!r} is not a size; write e.g. 1.5GB, 1500MB or 1610612736")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise BonsaiError(f"memory budget must be positive, got {value!r}")
    return int(n)


@dataclass
class StageMemory:
    name: str
    seconds: float
    peak_bytes: int
    mean_active_bytes: float


@dataclass
class MemoryReport:
    interval_s: float
    stages: list[StageMemory] = field(default_factory=list)
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, active bytes)

    @property
    def peak_bytes(self) -> int:
        return max((s.peak_bytes for s in self.stages), default=0)

    @property
    def mean_active_bytes(self) -> float:
        return trapezoid_mean(self.samples)

    def as_dict(self) -> dict:
        return {
            "peak_gb": self.peak_bytes / GB, "mean_active_gb": self.mean_active_bytes / GB,
            "stages": {s.name: {"seconds": s.seconds, "peak_gb": s.peak_bytes / GB,
                                "mean_active_gb": s.mean_active_bytes / GB} for s in self.stages},
        }


def trapezoid_mean(samples: list[tuple[float, int]]) -> float:
    if not samples:
        return 0.0
    if len(samples) == 1 or samples[-1][0] == samples[0][0]:
        return float(samples[0][1])
    area = sum((t1 - t0) * (a0 + a1) / 2 for (t0, a0), (t1, a1) in zip(samples, samples[1:]))
    return area / (samples[-1][0] - samples[0][0])


class MemoryMonitor:
    """with MemoryMonitor() as mon: with mon.stage("denoising"): ...; mon.report"""

    def __init__(self, interval_s: float = 0.05):
        self.report = MemoryReport(interval_s)
        self._stop = threading.Event()
        self._thread = None
        self._t0 = 0.0

    def _sample(self):
        self.report.samples.append((time.perf_counter() - self._t0, mx.get_active_memory()))

    def _run(self):
        while not self._stop.wait(self.report.interval_s):
            self._sample()

    def __enter__(self):
        self._t0 = time.perf_counter()
        mx.reset_peak_memory()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="bonsai-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def stage(self, name: str):
        return _Stage(self, name)


class _Stage:
    def __init__(self, monitor: MemoryMonitor, name: str):
        self.monitor, self.name = monitor, name

    def __enter__(self):
        mx.synchronize()
        mx.reset_peak_memory()
        self.t0 = time.perf_counter() - self.monitor._t0
        self.monitor._sample()
        return self

    def __exit__(self, *exc):
        mx.synchronize()
        self.monitor._sample()
        t1 = time.perf_counter() - self.monitor._t0
        inside = [(t, a) for t, a in self.monitor.report.samples if self.t0 <= t <= t1]
        self.monitor.report.stages.append(
            StageMemory(self.name, t1 - self.t0, mx.get_peak_memory(), trapezoid_mean(inside)))


# ---------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class MemoryPlan:
    stream_text_encoder: bool = False  # read encoder layers one at a time, release after use
    keep_transformer: bool = True  # resident across text encoding and decoding
    vae_tile: int | None = None  # pixels per tile side; None decodes whole
    attention_chunk: int | None = None  # query rows per attention call; None = one call
    eval_per_block: bool = True  # evaluate block by block (bounded activations, a sync per block)
    token_chunk: int | None = None  # tokens per pass through the token-wise parts (MLPs, fused projection)
    estimated_peak_bytes: int = 0
    stage_estimates: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Footprint:
    """What the planner needs to know about the loaded models (bytes and sizes)."""
    transformer_bytes: int
    transformer_dim: int
    transformer_mlp: int
    transformer_heads: int
    transformer_max_out: int  # widest linear output (scratch of one matmul)
    reference_matmul: bool  # plain-MLX packed matmul keeps float32 partial sums
    text_resident_bytes: int  # encoder layers + embedding that encode needs
    text_stream_bytes: int  # embedding + the largest layer
    text_hidden: int
    text_heads: int
    text_len: int
    vae_bytes: int
    vae_mid_channels: int
    # Measured on this device (see BonsaiPipeline._vae_scratch): peak scratch of the
    # decoder's up path per output pixel of the window it runs on, and of the mid block
    # per latent pixel, each plus a fixed part.
    vae_up_fixed: float = 0.0
    vae_up_per_pixel: float = 0.0
    vae_mid_fixed: float = 0.0
    vae_mid_per_pixel: float = 0.0
    fused_attention: bool = True  # the transformer's attention never materialises its scores
    text_dequant_bytes: int = 0  # dense weights alive at once when the encoder dequantizes per matmul
    dtype_bytes: int = 2


# No budget: everything resident, one graph per forward, nothing estimated.
UNCONSTRAINED = MemoryPlan(eval_per_block=False)

OVERHEAD = 48 * 2**20  # allocator slack, small arrays, ids, schedules
VAE_MARGIN = 104  # pixels of context a decoder tile needs on each side (FLUX.2 VAE)
SAFETY = 1.10
TOKEN_CHUNK = 512  # under a budget: big enough to keep the matmuls efficient


def _attention_scores(heads: int, rows: int, cols: int) -> int:
    return heads * rows * cols * 4


def vae_scores_bytes(latent_px: int) -> int:
    """The mid block's attention scores for one query chunk: 16-bit scores, float32
    softmax and probabilities (no fused kernel takes its 512-wide head)."""
    rows = min(latent_px, max(1, VAE_MAX_SCORES // latent_px))
    return rows * latent_px * 10


def estimate(fp: Footprint, width: int, height: int, plan: MemoryPlan, cfg_batches: int = 1) -> dict:
    """Bytes at the peak of each stage under `plan`."""
    s = fp.dtype_bytes
    L_img = (width // 16) * (height // 16)
    L = L_img + fp.text_len
    D, F = fp.transformer_dim, fp.transformer_mlp
    c = min(plan.token_chunk or L, L)
    # Held for every token inside a block (transformer.py): its input and modulated input,
    # q, k, v, the attention output, the branch output, the residual sum and the result.
    held = 9 * L * D * s
    # One chunk: pass 1 (q/k/v rows of the projection, float32 RoPE copies) and pass 2
    # (MLP rows, SwiGLU, [attention | MLP] and to_out), counted together.
    chunk = c * ((3 * D + 2 * F + F + (D + F) + D) * s + 3 * D * 4)
    # The plain-MLX packed matmul: float32 x, two dequantized 512-column slabs, two float32
    # partial sums (packed_linear.packed_matmul_reference). Kernels need nothing beyond y.
    N = fp.transformer_max_out
    matmul = 2 * c * N * 4 + 2 * N * 512 * 4 + c * (D + F) * 4 if fp.reference_matmul else 0
    rows = plan.attention_chunk or L
    scores = 0 if fp.fused_attention else 2 * _attention_scores(fp.transformer_heads, rows, L)
    # The VAE (small) stays resident through every stage.
    denoise = (fp.vae_bytes + fp.transformer_bytes + held + chunk + matmul + scores
               + cfg_batches * fp.text_len * D * s * 2 + L_img * 128 * 4 * 3)
    text_act = fp.text_len * fp.text_hidden * 4 * 10 + _attention_scores(fp.text_heads, fp.text_len, fp.text_len)
    text = (fp.vae_bytes + (fp.text_stream_bytes if plan.stream_text_encoder else fp.text_resident_bytes) + text_act
            + fp.text_dequant_bytes)
    if plan.keep_transformer:
        text += fp.transformer_bytes
    # The mid block runs once on the whole latent. A tile's up path runs on the tile plus a
    # margin as wide as the decoder's receptive field on each side (so tiles only pay off on
    # images much larger than 2 * VAE_MARGIN), beside the mid block's output and the
    # float32 image accumulators.
    tile = plan.vae_tile or max(width, height)
    th, tw = min(tile + 2 * VAE_MARGIN, height), min(tile + 2 * VAE_MARGIN, width)
    latent_px = (height // 8) * (width // 8)
    mid = fp.vae_mid_fixed + fp.vae_mid_per_pixel * latent_px + vae_scores_bytes(latent_px)
    up = (latent_px * fp.vae_mid_channels * s + fp.vae_up_fixed + fp.vae_up_per_pixel * th * tw
          + height * width * 4 * 4 * 2)
    decode = fp.vae_bytes + max(mid, up)
    if plan.keep_transformer:
        decode += fp.transformer_bytes
    return {k: int(SAFETY * v + OVERHEAD) for k, v in
            (("text_encoding", text), ("denoising", denoise), ("decoding", decode))}


def candidate_plans(width: int, height: int, fused_attention: bool = True):
    """Fastest first: resident everything, then stream the encoder, then drop the
    transformer between stages, then smaller VAE tiles and attention chunks (only where
    the attention materialises its scores: chunks cost memory next to a fused kernel)."""
    tiles = [None] + [t for t in (1024, 768, 512, 384, 256, 128) if t < max(width, height)]
    chunks = [None] if fused_attention else [None, 1024, 512, 256]
    for stream in (False, True):
        for keep in (True, False):
            for tile in tiles:
                for chunk in chunks:
                    yield MemoryPlan(stream, keep, tile, chunk, token_chunk=TOKEN_CHUNK)


def smallest_plan(fp: Footprint, width: int, height: int, cfg_batches: int = 1) -> MemoryPlan:
    """The plan with the lowest estimated peak (the slowest, most frugal one)."""
    def cost(e):  # lowest peak first; among equal peaks, the lowest other stages
        return max(e.values()), sum(e.values())

    best, best_est = None, None
    for p in candidate_plans(width, height, fp.fused_attention):
        est = estimate(fp, width, height, p, cfg_batches)
        if best is None or cost(est) < cost(best_est):
            best, best_est = p, est
    return MemoryPlan(best.stream_text_encoder, best.keep_transformer, best.vae_tile, best.attention_chunk, True,
                      best.token_chunk, max(best_est.values()), best_est)


def plan_memory(fp: Footprint, width: int, height: int, budget: int | None, cfg_batches: int = 1) -> MemoryPlan:
    for p in candidate_plans(width, height, fp.fused_attention):
        est = estimate(fp, width, height, p, cfg_batches)
        peak = max(est.values())
        if budget is None or peak <= budget:
            return MemoryPlan(p.stream_text_encoder, p.keep_transformer, p.vae_tile, p.attention_chunk,
                              budget is not None, p.token_chunk if budget is not None else None, peak, est)
    best = smallest_plan(fp, width, height, cfg_batches)
    need = math.ceil(best.estimated_peak_bytes / 1e6) / 1e3  # GB, rounded up so that it fits
    raise BonsaiError(
        f"a {width}x{height} generation does not fit a memory budget of {budget / GB:.2f} GB: the smallest plan "
        f"({describe(best)}) needs about {need:.3f} GB "
        f"(peak stage: {max(best.stage_estimates, key=best.stage_estimates.get)}). "
        f"Use a budget of at least {need:.3f} GB or a smaller image."
    )


def describe(plan: MemoryPlan) -> str:
    parts = ["stream the text encoder" if plan.stream_text_encoder else "text encoder resident",
             "keep the transformer" if plan.keep_transformer else "release the transformer between stages",
             f"{plan.vae_tile}-pixel VAE tiles" if plan.vae_tile else "whole-image VAE decode"]
    if plan.token_chunk:
        parts.append(f"{plan.token_chunk}-token chunks")
    if plan.attention_chunk:
        parts.append(f"attention in chunks of {plan.attention_chunk} queries")
    if plan.eval_per_block:
        parts.append("block by block")
    return ", ".join(parts)
