"""Memory: measuring it the way PrismML's whitepaper does, and planning how to run.

`MemoryMonitor` polls `mx.get_active_memory()` every 50 ms from a background thread
and records `mx.get_peak_memory()` per stage; mean-active is the trapezoidal integral
of the samples over the render time.

`plan_memory` picks how to run the stages (stream the text encoder or hold it, keep the
transformer across stages or reload it, token chunks, VAE strips or tiles, encoding in strips) from estimates of each
stage's footprint: the cheapest plan in time that fits the budget. Three kinds of budget:
  None      no limit: everything resident, each part run the fastest measured way (the
            hungriest)
  "auto"    the default: only what costs no time (block-by-block evaluation, the text
            encoder streamed and gone before denoising, nothing held that a later stage
            does not need), capped by the device's own memory (`device_cap`)
  bytes     the cheapest plan whose estimated peak fits; refused up front if none does
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import mlx.core as mx

from .errors import BonsaiError
from .execution import Execution
from .kernels import BLOCK_MOMENTS_VALUES, DEFAULT_CONFIG
from .vae import _MAX_SCORES as VAE_MAX_SCORES  # attention score elements per query chunk of the mid block
from .vae_strips import encode_held_bytes, held_bytes, up_strips

GB = 1e9
AUTO = "auto"
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value) -> int:
    """1500000000, "1.5GB", "1500MB", "1.5 GiB" -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise BonsaiError(f"memory budget {value!r} is not a size; write e.g. 1.5GB, 1500MB or 1610612736, "
                              "or 'auto' / 'none'")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not n > 0 or not math.isfinite(n):
        raise BonsaiError(f"memory budget must be a positive size, got {value!r}")
    return int(n)


def parse_budget(value):
    """None / "none" -> None (no limit), "auto" -> AUTO, a size -> bytes."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    return parse_bytes(value)


def device_cap() -> int:
    """The memory the auto plan may use on this device: 80% of what the device recommends
    for one process's working set on Apple GPUs (MLX's max_recommended_working_set_size),
    80% of the GPU's memory on CUDA, half the machine's RAM on the CPU."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "total_memory", "memory_size"):
        if info.get(key):
            return int(0.8 * info[key])
    try:
        return int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def reclaims_cache() -> bool:
    """Whether MLX's allocator here frees cached buffers before active plus cached memory
    passes the memory limit: its Metal and CUDA allocators do, at every allocation the cache
    cannot serve; the CPU-only build's allocator does not (it bounds the cache's size only)."""
    cuda = getattr(mx, "cuda", None)
    return mx.metal.is_available() or bool(cuda and cuda.is_available())


def budget_limits(budget, estimate: int, reclaim: bool | None = None, held: int = 0) -> tuple[int | None, int | None]:
    """(memory limit, cache limit) for a run under `budget` (bytes, AUTO or None) whose plan
    is estimated at `estimate` bytes, with `held` bytes of MLX memory active as it starts;
    None leaves a limit alone.

    Freed buffers that MLX keeps for reuse are not active memory but still the process's
    memory on a unified-memory device, so a byte budget bounds active plus cached bytes.
    Where the allocator reclaims its cache at the memory limit (`reclaims_cache`), the limit
    is the budget and the cache may take whatever the run's active memory leaves free of it:
    a chunked step reuses its buffers instead of asking the device for new ones each time.
    Elsewhere only the cache's size can be bounded, to the headroom the plan leaves.

    The auto plan has no budget of its own. Where the allocator reclaims, its estimate plus
    what was already held stands in for one (without a limit MLX's cache grows toward most
    of the device's memory): what the estimate does not count (another model, the caller's
    arrays) then never pushes active memory over the limit, where MLX would wait on the
    work in flight. MLX's defaults stay elsewhere, and for an unconstrained run (None)."""
    reclaim = reclaims_cache() if reclaim is None else reclaim
    if budget == AUTO:
        return (estimate + held,) * 2 if reclaim and estimate else (None, None)
    if budget is None:
        return None, None
    if reclaim:
        return budget, budget
    return None, max(budget - estimate, 0)


class MlxLimits:
    """MLX's memory limit and buffer-cache limit (None leaves one alone) while a run is
    inside the block, restored afterwards, also on errors and cancellation.

    The limits are process-wide, so the runs inside share one record: the newest run's
    limits hold while it is inside, an older run's come back when it leaves, and the
    limits from before the first run come back when the last one leaves, in whatever order
    they leave. A limit that something else changed meanwhile stays as they set it.
    `paused()` lifts the memory limit while the run waits on its caller between steps: work
    the caller does then is not held to the run's limit."""

    _lock = threading.Lock()
    _inside: list = []  # the runs inside and not paused, oldest first
    _saved: dict = {}  # setter -> (the value from before, the value last set)

    def __init__(self, memory: int | None = None, cache: int | None = None):
        self.values = {mx.set_memory_limit: memory, mx.set_cache_limit: cache}

    def __enter__(self):
        with self._lock:
            self._inside.append(self)
            self._apply()
        memory = self.values[mx.set_memory_limit]
        # An allocator trims its cache only when it allocates: buffers cached before the run
        # that already put it over its limit are dropped now.
        if memory is not None and mx.get_active_memory() + mx.get_cache_memory() > memory:
            mx.clear_cache()
        return self

    def __exit__(self, *exc):
        with self._lock:
            if self in self._inside:
                self._inside.remove(self)
            self._apply()

    @contextmanager
    def paused(self):
        memory = self.values[mx.set_memory_limit]
        with self._lock:
            self.values[mx.set_memory_limit] = None
            self._apply()
        try:
            yield
        finally:
            with self._lock:
                self.values[mx.set_memory_limit] = memory
                self._apply()

    @classmethod
    def _apply(cls):
        for f in (mx.set_memory_limit, mx.set_cache_limit):
            want = next((r.values[f] for r in reversed(cls._inside) if r.values[f] is not None), None)
            if want is not None:
                current = f(want)
                before, ours = cls._saved.get(f, (current, current))
                cls._saved[f] = (current if current != ours else before, want)  # theirs, if changed
            elif f in cls._saved:
                before, ours = cls._saved.pop(f)
                current = f(before)
                if current != ours:  # changed meanwhile: theirs stays
                    f(current)


# ---------------------------------------------------------------------------- measuring

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
    # The most active plus cached bytes seen by the samples: what the process held of MLX's
    # memory, the buffers kept for reuse included (sampled, so it can miss a short peak).
    sampled_footprint_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return max((s.peak_bytes for s in self.stages), default=0)

    @property
    def mean_active_bytes(self) -> float:
        return trapezoid_mean(self.samples)

    def as_dict(self) -> dict:
        return {
            "peak_gb": self.peak_bytes / GB, "mean_active_gb": self.mean_active_bytes / GB,
            "sampled_footprint_gb": self.sampled_footprint_bytes / GB,
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
        self._sampling = threading.Lock()  # the sampler thread and stage() both take samples
        self._stop = threading.Event()
        self._thread = None
        self._t0 = 0.0

    def _sample(self):
        # The two figures are read one after the other while buffers move between them: a
        # buffer freed into the cache in between would count twice in active + cached, so
        # the active figure is read on both sides and the smaller sum kept.
        with self._sampling:
            active, cached, after = mx.get_active_memory(), mx.get_cache_memory(), mx.get_active_memory()
            self.report.samples.append((time.perf_counter() - self._t0, active))
            self.report.sampled_footprint_bytes = max(self.report.sampled_footprint_bytes, cached + min(active, after))

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

    @contextmanager
    def stage(self, name: str):
        mx.synchronize()
        mx.reset_peak_memory()
        t0 = time.perf_counter() - self._t0
        self._sample()
        try:
            yield
        finally:
            mx.synchronize()
            self._sample()
            t1 = time.perf_counter() - self._t0
            inside = [(t, a) for t, a in self.report.samples if t0 <= t <= t1]
            self.report.stages.append(StageMemory(name, t1 - t0, mx.get_peak_memory(), trapezoid_mean(inside)))


# ---------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class MemoryPlan:
    stream_text_encoder: bool = False  # read encoder layers one at a time, release after use
    keep_text_encoder: bool = True  # resident between generations (else gone before denoising)
    transformer_in_text: bool = True  # resident while the prompt is encoded
    transformer_in_decode: bool = True  # resident while the image is decoded
    vae_tile: int | None = None  # pixels per tile side; None decodes whole
    token_chunk: int | None = None  # tokens per pass through the token-wise parts
    attention_rows: int | None = None  # query rows per attention call; None = one call
    sync: bool = False  # evaluate block by block (bounded activations, a sync per block)
    overlap: bool = False  # with sync: two parts in flight, so the device never waits for the host
    vae_strip: int | None = None  # image rows per strip of a stage-by-stage decode (vae_strips); not with vae_tile
    vae_encode_strip: int | None = None  # image rows per strip of a stage-by-stage encode of editing images
    hidden_parts: int = 1  # passes over the MLP hidden units (Execution.hidden_parts)
    # On the packed kernels' slab path, decode each matrix as one slab (the executor builds the
    # forward under kernels.tuned(kernels.whole_slabs(...)): a cap of its largest packed matrix,
    # the slab path from WHOLE_SLAB_MIN_M rows): no slab outputs to concatenate, fewer launches,
    # a larger decoded scratch. Else slabs of at most SLAB_ELEMENTS.
    whole_slabs: bool = False
    vae_overlap: bool | None = None  # two VAE parts (blocks, strips) in flight; None: as `overlap`
    vae_sync: bool | None = None  # evaluate the VAE block by block; None: as `sync`
    text_sync: bool | None = None  # evaluate a resident text encoder layer by layer; None: as `sync`
    # The transformer's modulation layers and context embedder (transformer.ON_DISK_LAYERS)
    # resident through the run. Else every step's modulations and the prompt's text tokens are
    # computed before denoising (a "modulation" stage) and the layers are left on disk until new
    # sigmas or a new prompt need them (Models.modulations, Models.text_tokens).
    keep_modulation: bool = True
    estimated_peak_bytes: int = 0
    stage_estimates: dict = field(default_factory=dict)
    part_bytes: int = 0  # the largest part of a paced step, estimated (with_estimate)
    # The paced decode's flush margin, estimated (with_estimate): its largest part, or for a whole
    # decode two blocks in flight under the flush the second block's share (`_flushed_decode`).
    vae_part_bytes: int = 0

    @property
    def execution(self) -> Execution:
        """How the transformer runs. Two parts in flight, a block's attention is a part of its
        own (Execution.attention_apart), but for blocks that join their parts
        (`paced_execution`): the device starts the attention while the host builds the rest of
        the block. On an H200 (c66) whole blocks with each packed matrix one slab
        stepped in 0.94 / 0.96x the time of one part a block at 512 / 1024 px (binary; ternary
        0.94 / 0.98x) and peaked no higher; with the kernels' slabs they peaked up to 0.3 GB
        higher (ternary 512 px), under the estimate, which counts two whole blocks in flight."""
        return Execution(self.token_chunk, self.attention_rows, self.sync, self.overlap,
                         hidden_parts=self.hidden_parts, attention_apart=self.sync and self.overlap)

    def paced_execution(self, held: int = 0) -> Execution:
        """How the transformer runs to stay under its denoising estimate, `held` bytes of MLX
        memory that the estimate does not count (the caller's, under AUTO) on top. Paced, a
        part could start on top of finished parts whose buffers the back-end has not released
        yet (MLX's CUDA back-end releases them from a worker thread, which can fall several
        parts behind): once active memory is above the estimate less one part (`part_bytes`),
        the pacer waits for the device and its releases first. A plan without estimates (a
        caller's own) runs as it is. Where the flush holds the step to its estimate
        (`flush_measured`), blocks of up to JOIN_UPTO tokens in MLP passes join their parts
        (`Execution.joins`)."""
        ex = _flushing(self.execution, self.stage_estimates.get("denoising"), held, self.part_bytes)
        return replace(ex, join_upto=JOIN_UPTO if ex.flush_above is not None and flush_measured() else 0)

    def paced_vae_execution(self, held: int = 0) -> Execution:
        """How the VAE decodes to stay under its decoding estimate, as `paced_execution`. One
        part at a time, each is built while the one before runs (`Execution.ahead`) where the
        flush holds the stage to its estimate (`flush_measured`), and evaluated before the next
        is built elsewhere."""
        ex = _flushing(self.vae_execution, self.stage_estimates.get("decoding"), held, self.vae_part_bytes)
        return replace(ex, ahead=ex.flush_above is not None and not ex.overlap and flush_measured())

    @property
    def vae_execution(self) -> Execution:
        """How the VAE decodes and encodes: block by block like the transformer, with two
        parts in flight or not on its own."""
        return Execution(sync=self.sync if self.vae_sync is None else self.vae_sync,
                         overlap=self.overlap if self.vae_overlap is None else self.vae_overlap)

    @property
    def text_layer_by_layer(self) -> bool:
        """Whether a resident text encoder is evaluated layer by layer (a streamed one always is)."""
        return self.sync if self.text_sync is None else self.text_sync

    @property
    def releases_transformer(self) -> bool:
        return not (self.transformer_in_text and self.transformer_in_decode)


def _flushing(ex: Execution, estimate: int | None, held: int, part: int) -> Execution:
    if not estimate or not part or not ex.sync:
        return ex
    return replace(ex, flush_above=max(estimate + held - part, 0))


def flush_measured() -> bool:
    """Whether plans may count on the pacer's flush to stay under a byte budget: measured on
    MLX's CUDA back-end (docs/benchmarks.md, c36-c39). On Metal, `mx.synchronize` waits for
    the command buffers but is not known to wait for the handlers that release their buffers;
    on the CPU nothing is released late."""
    cuda = getattr(mx, "cuda", None)
    return bool(cuda and cuda.is_available())


# No limit: everything resident, nothing estimated, each part run the fastest measured way.
# The transformer runs block by block with two blocks in flight: a step took 0.84-0.96x the
# time of one graph over the whole forward (c44, c47: H200, 512 and 1024 px), where MLX holds
# every block's activations at once, and each block's attention a part of its own another
# 0.94-0.98x (c66; `MemoryPlan.execution`); with every packed matrix one slab. The VAE
# decodes in one graph: block by block with two blocks in flight, a 1024 px decode took 1.12x
# as long alone (c48) and 1.3x in generations (c47); so does the text encoder: layer by
# layer, a new prompt's encode took 1.2-1.5x as long (c47).
UNCONSTRAINED = MemoryPlan(sync=True, overlap=True, whole_slabs=True, vae_sync=False, text_sync=False)


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
    text_stream_bytes: int  # two of the largest layers (the next one is read ahead) and the prompt's embedding rows
    text_hidden: int
    text_heads: int
    text_len: int
    vae_bytes: int
    vae_mid_channels: int
    # Measured on this device (see calibrate_vae): peak scratch of the decoder's up path
    # per output pixel of the window it runs on, and of the mid block per latent pixel,
    # each plus a fixed part.
    vae_up_fixed: float = 0.0
    vae_up_per_pixel: float = 0.0
    vae_mid_fixed: float = 0.0
    vae_mid_per_pixel: float = 0.0
    # Strip decoding: the whole tensors it holds at its peak per image pixel (from the
    # decoder's channels, vae_strips.held_bytes), and its measured peak scratch beyond them,
    # fixed plus per pixel of a strip's window ((strip + STRIP_HALO) rows x the width).
    vae_held_per_pixel: float = 0.0
    vae_strip_fixed: float = 0.0
    vae_strip_per_pixel: float = 0.0
    fused_attention: bool = True  # the transformer's attention never materialises its scores
    # The fewest tokens from which the packed linears take the kernels' slab path (each
    # output made in parts, then concatenated, beside a decoded slab); 0: none does.
    slab_tokens: int = 0
    whole_slab_tokens: int = 0  # the same under a plan with whole slabs (kernels.WHOLE_SLAB_MIN_M)
    text_dequant_bytes: int = 0  # dense weights alive at once when the encoder dequantizes per matmul
    dtype_bytes: int = 2
    cached_prompt_bytes: int = 0  # prompt embeddings and their text tokens kept between generations
    prompt_bytes: int = 0  # one prompt's embeddings (what a prompt encoded ahead holds until its generation)
    # Measured like the decoder (calibrate_vae_encoder), only when images are to be encoded:
    # the encoder's peak scratch, fixed plus per input pixel.
    vae_enc_fixed: float = 0.0
    vae_enc_per_pixel: float = 0.0
    # Strip encoding, like strip decoding: the whole tensors held at its peak per image pixel
    # (vae_strips.encode_held_bytes) and its measured scratch beyond them, fixed plus per
    # pixel of a strip's window. Its mid block runs whole at the latent's resolution, as
    # the decoder's does (vae_mid_*: the same block for every FLUX.2 VAE).
    vae_enc_held_per_pixel: float = 0.0
    vae_enc_strip_fixed: float = 0.0
    vae_enc_strip_per_pixel: float = 0.0
    latent_channels: int = 128  # of a token (the transformer's input)
    # GroupNorm statistics of the VAE's 16-bit activations reduced as read (vae.group_stats on
    # a GPU back-end's column-moments kernel): no float32 row blocks to count. Else (float32,
    # the CPU, or plans for a device that may not run the kernel) up to Execution.reduce_block
    # float32 elements a reduction.
    vae_moments_kernel: bool = False
    lora: bool = False  # LoRA adapters on the transformer's linears (their weights are in transformer_bytes)
    packed_format: str = ""  # of the transformer's packed linears ("" dense): the step costs differ (COST_DIT)
    # Bytes of the transformer's modulation layers and context embedder that a plan can leave on
    # disk (MemoryPlan.keep_modulation); 0 where they cannot be read again as loaded (models
    # built from objects, packed modulation layers).
    modulation_bytes: int = 0
    # Reading them again, what the two weights that hold the most hold beside their results: the
    # checkpoint's tensor where the file holds a weight in another dtype than the pipeline's, and
    # once more where the weight is made anew from it (TransformerSource.cast_read_bytes; 0 where
    # every weight is read as it is).
    modulation_cast_bytes: int = 0


OVERHEAD = 48 * 2**20  # allocator slack, small arrays, ids, schedules, kept step modulations (16 MB at most)
SLAB_ELEMENTS = DEFAULT_CONFIG.slab_max_elements  # weights per decoded slab at most
SLAB_SCRATCH = 2 * SLAB_ELEMENTS  # one decoded slab of 16-bit weights
VAE_MARGIN = 104  # pixels of context a decoder tile needs on each side (FLUX.2 VAE)
STRIP_HALO = 2  # rows beyond a full-resolution strip that its 3x3 convolutions read
SAFETY = 1.10
# Blocks of up to this many tokens in MLP passes, two parts in flight, join their attention and
# last pass to the passes' parts (`Execution.join_upto`): on an H200 (c80) 512 px steps (1,536
# tokens) took 0.79-0.82x the time (binary) and 0.95-0.98x (ternary), 1024 px steps (4,608)
# 1.00-1.03x; between them unmeasured.
JOIN_UPTO = 2048
OVERLAP_BLOCKS, OVERLAP_PARTS, OVERLAP_DECODER, STRICT_WHOLE, STRICT_CHUNKED = 4, 3, 2, 2, 1.4  # see `estimate`
# A whole decode block by block, two blocks in flight, over the calibrated (strict) scratch:
# the blocks' temporaries do not peak together; measured 1.05-1.31x strict on an H200
# (h200-profile-strips-c6.json, -c7.json: 512 and 1024 px, float16 and bfloat16) and 1.14x
# on this project's CPU.
OVERLAP_WHOLE_DECODE = 1.4
# Whole decodes two blocks in flight that fit a byte budget only with the pacer's flush, up to
# this many output pixels (`_flushed_decode`). The flush's margin is the second block's share,
# not a whole block: below it, the peak rests on that share and on MLX's memory limit, which
# waits on the work in flight. Measured at 512 px (h200-plan-variants-c85-*-512.json, -c86-,
# h200-generate-c87-*.json: the decoding peaks of one block at a time); larger decodes, with
# larger blocks against the margin, are not.
FLUSHED_WHOLE_DECODE = 512 * 512
# `_strip_bytes`'s floors on a strip's scratch per pixel of its window, in held bytes per
# image pixel: (evaluated strip by strip, per part with two in flight). Fitted to the H200
# profile of the strips as they run now (h200-profile-strips-c7.json,
# h200-profile-encode-c7.json: 512 and 1024 px, float16 and bfloat16, first and repeated
# calls): decoding took up to 26.2 held bytes per window pixel strict and 13.1 per part two
# in flight, encoding 12.4 and 12.4 (512 held bytes per pixel). MLX's CUDA convolutions keep
# about as much scratch strict as two in flight, so strict strips save no memory there; on
# this project's CPU they do.
STRIP_DECODE = (28.0, 14.0)
STRIP_ENCODE = (13.0, 13.0)
TOKEN_CHUNKS = (None, 4096, 2048, 1536, 1024, 512, 256)
# Chunks planned with the MLP in passes only: 1536-token chunks in one pass peaked at 1.27-1.32 GB
# above the weights at 1024 px, at their estimate (h200-part-peaks-c34-*.json).
PASSES_ONLY = (1536,)
HIDDEN_PARTS = (1, 2, 4, 8)
VAE_STRIPS = (256, 128, 64, 32, 16)
VAE_TILES = (1024, 768, 512, 384, 256, 128)
ATTENTION_ROWS = (None, 1024, 512, 256)
# What a choice costs in time, in rough seconds per generation (H200 measurements in
# docs/benchmarks.md): plans are tried cheapest first. Tiles are dearest: exact tiles
# re-run the decoder's up path once per GroupNorm to share whole-image statistics. Strips
# compute what the whole decode computes, plus a halo row per convolution and an
# evaluation per strip: the smaller, the more evaluations.
COST_STREAM_TEXT = 0.5
# The reload: 0.32 s binary, 0.65 s ternary in a 1024 px generation on an H200
# (h200-generate-c12-*.json).
COST_RELOAD_TRANSFORMER = 0.5
# Modulation layers left on disk: read again (0.34 GB at klein 4B's shapes) whenever a
# generation's sigmas are not among the last few computed (a new size or step count), free
# otherwise. A new schedule's modulations took 145-169 ms read from disk against 2-4 ms with
# the layers resident (H200, both formats; h200-modulation-reads-c53-*.json).
COST_RELOAD_MODULATION = 0.15
# Token chunks, hidden-unit passes and strips: 4 steps at 1024 px, two parts in flight,
# over block-by-block evaluation: 2048- / 1024- / 512-token chunks +27 / +59 / +90 ms a
# step for binary (h200-profile-dit-c12.json, -c13-*.json), 2 / 4 / 8 passes +15 / +37 /
# +90 ms (h200-profile-dit-c3.json); 256-token chunks are not measured since the host's
# share per chunk fell, and keep the older, higher figure;
# 256- / 128- / 64- / 32-row decode strips +17 / +31 / +50 / +54 ms over the whole decode
# block by block, 1024 px, float16 (h200-profile-strips-c6.json).
COST_STRICT = 0.25  # the device idles at every evaluation while the host builds the next part
# The VAE strict, over two parts in flight: +21 ms for a whole 1024 px decode block by block,
# +30 / +51 / +76 / +143 ms in 256- / 128- / 64- / 32-row strips (h200-profile-strips-c6.json).
# Paced with the flush on MLX's CUDA back-end, one part at a time runs ahead
# (`paced_vae_execution`); decodes alone, without the flush, took 0.74-0.97x strict's time
# ahead (h200-profile-strips-c77.json, -c78.json): these costs overcharge it there.
COST_STRICT_VAE = {None: 0.02, 256: 0.013, 128: 0.02, 64: 0.025, 32: 0.09, 16: 0.18}
COST_TOKEN_CHUNK = {None: 0, 4096: 0.1, 2048: 0.11, 1536: 0.11, 1024: 0.24, 512: 0.36, 256: 1.0}
COST_ATTENTION_ROWS = {None: 0, 1024: 0.1, 512: 0.2, 256: 0.4}
COST_HIDDEN_PARTS = {1: 0, 2: 0.06, 4: 0.15, 8: 0.36}
COST_PARTS_IN_CHUNKS = 0.2  # both at once cost more than the two apart (2048 tokens, 4 passes: +0.5 s)
# A step in parts that fits a byte budget only with one part at a time, the pacer flushing
# before many parts (`flushed_estimate`), by packed format and the tokens beside the prompt's:
# each flush idles the device while the host builds the next part, which costs a step bound by
# the host (512 px) most. At 512 px passes over all tokens took 1.06-1.23x (binary) and
# 0.61-0.71x (ternary) the time of 512-token chunks there (h200-plan-variants-c36-*-512-flush.json),
# whose costs (COST_TOKEN_CHUNK, COST_DIT) bracket it. At 1024 px (4096 image tokens) binary's
# flushed passes over all tokens denoised in 0.02-0.07 s less than the 1536-token chunks in 2
# passes of the same calls (h200-plan-variants-c69-binary-1024.json, -c71-): their cost,
# COST_HIDDEN_PARTS[2] and this, is the chunks' COST_DIT less about that. Larger binary steps
# too: at 1280 px (2.8 GB) and 1536 px (3.4 GB) the flushed passes denoised in 0.81-0.86x and
# 0.91x the time of the 2048-token chunks that the 512 px figure would plan there
# (h200-plan-variants-c72-binary-1280.json, -1536.json). Ternary's flushed passes at 1024 px denoised in
# 0.028 s less to 0.001 s more in c69-c71, its decode after them taking 1.0-1.5x as long; in
# c82 (h200-plan-variants-c82-ternary-1024.json, generations 2 and 3) in 0.367 s against the
# 1536-token chunks' 0.402-0.458 s, decoding in 0.088-0.089 s against 0.084-0.087 s; planned
# so, the ternary 1024 px target denoised in 1.16-1.21x the time of `none` in the same process
# (h200-generate-c84-ternary.json, -c86-ternary-1024.json) where c81's 1536-token chunks took
# 1.28-1.31x. Token chunks and steps of fewer tokens (whose flushing is not measured) take the 512 px figure,
# COST_FLUSHING_DEFAULT.
COST_FLUSHING = {"binary": {4096: 0.01}, "ternary": {4096: 0.01}}
COST_FLUSHING_DEFAULT = 0.4
# A decode two parts in flight (strips, or whole block by block) that fits a byte budget only
# with the pacer's flush (`_flushed_decode`): it flushes where active memory nears the budget,
# at the decode's peaks, not at every part as a strict decode waits: this share of what running
# it strict adds (COST_STRICT_VAE).
COST_FLUSHING_VAE = 0.5
# A packed model's step with slabs of at most SLAB_ELEMENTS weights against one slab per
# matrix: whole blocks two in flight took 2.3-2.9 ms more a step at 512 px and 4.6-5.4 ms at
# 1024 px for binary, 3.3-5.3 / 4.6-4.8 ms for ternary (c45, H200); 4 steps.
COST_SPLIT_SLABS = 0.01
# (token chunk, hidden passes) measured per packed format, where they differ from the sums
# above (whose single-pass chunks are binary's): the kernels take M = 1024 rows on the slab
# path for ternary and the fused GEMM for binary, and the fused ternary GEMM is the slower
# one at M = 512 (4 steps at 1024 px, two parts in flight, over whole blocks;
# h200-profile-dit-c12.json, -c13-*.json). 2048-token chunks with the MLP in passes are the
# fast chunked setting: 102-113 ms a step (2 passes) and 117-131 ms (4) against 80-84 ms whole
# (h200-slab-variants-c27-*.json, h200-steps-c29-*-new.json). Other formats and the dense
# transformer use the sums.
# 1536-token chunks (three equal chunks at 1024 px, where 2048-token ones leave a third of
# 512) step in 95-96 ms whole, 100-102 ms with the MLP in 2 passes and 107-118 ms in 4
# (h200-part-peaks-c34-*.json.steps.json; 2048-token chunks 96-111 and 107-117 ms there).
COST_DIT = {
    "binary": {(2048, 2): 0.09, (2048, 4): 0.15, (1536, 1): 0.065, (1536, 2): 0.09, (1536, 4): 0.15,
               (1024, 2): 0.29, (1024, 4): 0.36},
    "ternary": {(2048, 1): 0.12, (2048, 2): 0.11, (2048, 4): 0.17, (1536, 1): 0.055, (1536, 2): 0.09,
                (1536, 4): 0.10, (1024, 1): 0.34, (512, 1): 0.70, (1024, 2): 0.26, (1024, 4): 0.37},
}
COST_VAE_TILE = {None: 0, 1024: 20, 768: 25, 512: 30, 384: 40, 256: 60, 128: 120}
COST_VAE_STRIP = {None: 0, 256: 0.017, 128: 0.031, 64: 0.05, 32: 0.054, 16: 0.1}


def _attention_scores(heads: int, rows: int, cols: int) -> int:
    return heads * rows * cols * 4


def vae_scores_bytes(latent_px: int) -> int:
    """The mid block's attention scores for one query chunk: 16-bit scores, float32
    softmax and probabilities (no fused kernel takes its 512-wide head)."""
    rows = min(latent_px, max(1, VAE_MAX_SCORES // latent_px))
    return rows * latent_px * 10


def _text_activations(fp: Footprint) -> int:
    """One prompt's activations in the text encoder: a layer's, float32-wide, and its
    attention scores. c89 measured 90 MB a prompt above the weights, streamed or resident,
    for 1 to 32 prompts in one encode (h200-text-batch-c89.json)."""
    return fp.text_len * fp.text_hidden * 4 * 10 + _attention_scores(fp.text_heads, fp.text_len, fp.text_len)


def estimate(fp: Footprint, width: int, height: int, plan: MemoryPlan, cfg_batches: int = 1,
             images: tuple = ()) -> dict:
    """Bytes at the peak of each stage under `plan` (run block by block: `plan.sync`, with
    the VAE and a resident text encoder block by block too: `vae_sync`, `text_sync` not False).
    `images`: (width, height) of the images the transformer is conditioned on (references,
    the init image), each encoded by the VAE in a stage of its own and joining the image
    tokens at every step."""
    return _stage_bytes(_terms(fp, width, height, plan, cfg_batches, images))


def flushed_estimate(fp: Footprint, width: int, height: int, plan: MemoryPlan, cfg_batches: int = 1,
                     images: tuple = ()) -> tuple[int, int] | None:
    """For a step with the MLP in passes, two parts at a time, run with the pacer's
    flush at its estimate less one part (`MemoryPlan.paced_execution`): the denoising stage's
    bytes with one part at a time (what the flush falls back to: the least the budget must
    hold) and with two in flight (where it seldom needs to flush). `estimate` counts three
    parts, the third for a finished part whose buffers the back-end has not released yet;
    the flush releases those before a part would start over the budget. None for other plans."""
    return _flushed_bytes(_terms(fp, width, height, plan, cfg_batches, images))


def _stage_bytes(terms: "_Terms") -> dict:
    return {k: int(weights + SAFETY * modelled + OVERHEAD) for k, (weights, modelled) in terms.stages.items()}


def _part_bytes(terms: "_Terms") -> tuple[int, int]:
    """Bytes of the largest part a paced denoising step starts (a block's temporaries, or a
    chunk's or pass's and its slab) and of a part of the decode's up path (a block, or a
    strip's scratch), with the safety factor: what one part adds to what is live when it
    starts."""
    return int(SAFETY * terms.part), int(SAFETY * terms.vae_part)


def _flushed_bytes(terms: "_Terms") -> tuple[int, int] | None:
    if terms.flushed is None:
        return None
    weights = terms.stages["denoising"][0]
    return tuple(int(weights + SAFETY * (terms.flushed + n * terms.part) + OVERHEAD) for n in (1, 2))


def _flushed_decode(terms: "_Terms") -> tuple[int, int] | None:
    """For a decode two parts in flight (strips, or whole block by block), run with the
    pacer's flush at the budget less one part (`MemoryPlan.paced_vae_execution`): the decoding
    stage's bytes with one part at a time (what the flush falls back to: the least the budget
    must hold) and what the part in flight beside it adds (the flush's margin: a strip's
    bytes, or the second block's share of a whole decode's). None for other plans."""
    if terms.vae_flushed is None:
        return None
    weights = terms.stages["decoding"][0]
    modelled, one = terms.vae_flushed
    return int(weights + SAFETY * modelled + OVERHEAD), int(SAFETY * one)


class _Terms(NamedTuple):
    stages: dict  # stage: (weights it holds, modelled bytes)
    part: float  # the largest part of a denoising step
    flushed: float | None  # a step with the MLP in passes, two parts at a time: its denoising bytes without a part
    vae_part: float  # the largest part of the decode
    # A decode two parts in flight: its decoding bytes with one part at a time, and what the
    # second part adds (a strip's scratch as a strict decode counts it, or a whole decode's
    # second block: `_flushed_decode`).
    vae_flushed: tuple[float, float] | None = None


def _terms(fp: Footprint, width: int, height: int, plan: MemoryPlan, cfg_batches: int, images: tuple) -> _Terms:
    """The modelled terms of `estimate`, `flushed_estimate` and a plan's parts (`with_estimate`)."""
    s = fp.dtype_bytes
    L_img, L_ref = _image_tokens(width, height), _extra_tokens(images)
    L = L_img + L_ref + fp.text_len
    D, F = fp.transformer_dim, fp.transformer_mlp
    c = min(plan.token_chunk or L, L)
    # A block in one or two token chunks is counted as whole (the chunk as all its tokens):
    # no chunk above 0.44 L was profiled, and two 1024-token chunks of a 1536-token block
    # peaked at 0.92x the whole block on an H200 (h200-profile-dit-c8.json).
    c = L if 2 * c >= L else c
    # Held for every token inside a block (transformer.py): its input and modulated input,
    # q, k, v, the attention output, the branch output, the residual sum and the result.
    held = 9 * L * D * s
    # One chunk: pass 1 (q/k/v rows of the projection, float32 RoPE copies) and pass 2
    # (MLP rows, SwiGLU, [attention | MLP] and to_out), counted together. In hidden parts,
    # the MLP rows and SwiGLU exist for one part's units at a time (gate, up, product).
    h = max((c1 - c0 for c0, c1 in Execution(hidden_parts=plan.hidden_parts).hidden_spans(F)), default=0)  # widest pass
    mlp = 2 * F + F if plan.hidden_parts <= 1 else 3 * h
    chunk = c * ((3 * D + mlp + (D + F) + D) * s + 3 * D * 4)
    # The plain-MLX packed matmul: float32 x, two dequantized 512-column slabs, two float32
    # partial sums (packed_linear.packed_matmul_reference). Kernels need nothing beyond y.
    N = fp.transformer_max_out
    matmul = 2 * c * N * 4 + 2 * N * 512 * 4 + c * (D + F) * 4 if fp.reference_matmul else 0
    # A LoRA adapter's update (x A^T) B^T and the sum with the base output, beside the base's.
    matmul += 2 * c * N * s if fp.lora else 0
    # A chunk on the slab path: the widest output of a linear that takes more than one slab
    # (over SLAB_ELEMENTS weights) once more, as its parts and their concatenation. The
    # linears, as (output rows, inputs): the projection's q/k/v rows, the single block's
    # output projection, the double block's attention and MLP output projections, and the MLP
    # rows, all 2F at once or an MLP pass's gate and up rows (separate linears of h rows).
    # The q/k/v rows run as three one-slab linears of D rows (transformer.ParallelAttention)
    # and are counted as one of 3D rows: with it, ternary steps in 1024-token chunks with the
    # MLP in 2 passes peaked at 0.97x the denoising estimate (0.79 GB above the weights, 0.92x
    # of the modelled part; h200-part-peaks-c29-ternary-new.json), and the same setting
    # measured 0.45-0.79 GB across c29, c31 and c32.
    # One decoded slab (SLAB_SCRATCH) per block in flight, for whole blocks; in parts, one per
    # step: the profiles of chunked steps peak no higher with 32 MB slabs than with 16 MB ones
    # (ternary 1024-token chunks, MLP in 4 passes, 1024 px: 0.48-0.56 GB against 0.50-0.61 GB
    # in the same call), while whole blocks at 512 px peak 0.05-0.2 GB higher (h200-profile-c24-*).
    # Whole slabs (`MemoryPlan.whole_slabs`): the largest matrix decoded, nothing concatenated;
    # whole blocks with them peaked lower than with 16M-weight slabs (c45), so this count,
    # which adds the larger slab to every block in flight, is above what they hold. Steps with
    # the MLP in 2 passes over all tokens peaked as high with them as with the kernels' slabs
    # (0.38 / 0.88 GB above the weights at 512 / 1024 px, binary; h200-profile-dit-c53.json).
    linears = ((3 * D, D), (D, D + F), (D, D), (D, F), (2 * F if plan.hidden_parts <= 1 else h, D))
    from_tokens = fp.whole_slab_tokens if plan.whole_slabs else fp.slab_tokens
    on_slab = bool(from_tokens) and c >= from_tokens
    cap = max(n * k for n, k in linears) if plan.whole_slabs else SLAB_ELEMENTS
    slab = c * max((n for n, k in linears if n * k > cap), default=0) * s if on_slab else 0
    scratch = 2 * cap if on_slab else 0  # one decoded slab of 16-bit weights (SLAB_SCRATCH at the kernels' cap)
    rows = plan.attention_rows or L
    scores = 0 if fp.fused_attention else 2 * _attention_scores(fp.transformer_heads, rows, L)
    resident = fp.vae_bytes + fp.cached_prompt_bytes
    # Parts whose temporaries live at once. Overlapped, MLX allocates a part's buffers when
    # it is queued and frees them when the device is done with it, so two to three blocks'
    # temporaries coexist, each holding all its intermediates, not only the live ones: on
    # an H200 a block-by-block 4-step run at 512 / 1024 px peaked 1.22 / 2.84 GB above the
    # weights overlapped against 0.30 / 1.00 GB of the terms above, hence 4 (examples/
    # profile_speed.py, docs/benchmarks.md). In token chunks or hidden-unit passes the
    # parts in flight are those, not blocks: the block's held tensors and about three parts'
    # temporaries, the slab path's included (there 1.10 / 0.52 / 0.43 GB for binary 2048- /
    # 1024- / 512-token chunks at 1024 px against 1.40 / 0.69 / 0.47 GB counted so, and
    # 0.89 GB for ternary 1024-token chunks, on the slab path, against 0.85 GB, which the
    # safety factor covers; h200-profile-dit-c3.json, -c8.json). 2.7 would let binary
    # 1024-token chunks under a 1.9 GB budget at 1024 px, but a first generation with
    # 512-token chunks peaked 0.2 GB above its second there (h200-generate-c5-binary.json),
    # over that count. The decoder's parts are smaller: 2.
    # Strict, a block run whole or in one or two token chunks (or in hidden passes over all
    # its tokens) peaked at 1.3-2.1x these terms there (0.62 GB at 512 px against 0.30),
    # smaller token chunks at 1.2-1.3x.
    acts, parts = held + chunk + matmul + scores, c < L or plan.hidden_parts > 1
    part = chunk + matmul + slab + scores if parts else acts + scratch
    if plan.overlap:
        acts = held + OVERLAP_PARTS * part + scratch if parts else OVERLAP_BLOCKS * part
    else:
        acts = STRICT_WHOLE * (acts + scratch) if c == L else STRICT_CHUNKED * (acts + slab) + scratch
    # Encoded condition tokens (float32) and, per CFG batch, their embedding, beside the text's.
    refs = L_ref * fp.latent_channels * 4 + cfg_batches * L_ref * D * s
    text_act = _text_activations(fp)
    # The mid block runs once on the whole latent. A tile's up path runs on the tile plus a
    # margin as wide as the decoder's receptive field on each side (so tiles only pay off on
    # images much larger than 2 * VAE_MARGIN), beside the mid block's output and the
    # float32 image accumulators.
    tile = plan.vae_tile or max(width, height)
    th, tw = (min(tile + 2 * VAE_MARGIN, height), min(tile + 2 * VAE_MARGIN, width)) if plan.vae_tile else (height, width)
    latent_px = (height // 8) * (width // 8)
    vae_overlap = plan.vae_execution.overlap
    in_flight = (OVERLAP_DECODER if plan.vae_tile else OVERLAP_WHOLE_DECODE) if vae_overlap else 1
    mid_block = fp.vae_mid_fixed + fp.vae_mid_per_pixel * latent_px
    mid = in_flight * mid_block + vae_scores_bytes(latent_px)
    up_block = fp.vae_up_fixed + fp.vae_up_per_pixel * th * tw  # a block of the up path's scratch
    up_stats = _stats_bytes(fp, th * tw * fp.vae_mid_channels, tiled=bool(plan.vae_tile))
    up = latent_px * fp.vae_mid_channels * s + in_flight * up_block + in_flight * up_stats + height * width * 4 * 4 * 2
    if plan.vae_strip:
        # Strips: the whole tensors of the widest stage and a strip's scratch per part in
        # flight (`_strip_bytes`), the mid output's statistics in float32 row blocks (where the
        # moments kernel does not reduce them as read), and the image's float32 copies.
        strips = lambda overlap: _strip_bytes(fp.vae_held_per_pixel, fp.vae_strip_fixed,  # noqa: E731
                                              fp.vae_strip_per_pixel, width, height, plan.vae_strip, overlap,
                                              STRIP_DECODE)
        others = (_stats_bytes(fp, latent_px * fp.vae_mid_channels) + height * width * 4 * 4 * 2
                  + _strip_moments_bytes(fp, height, plan.vae_strip))
        up = strips(vae_overlap) + others
    # Each stage: the weights it holds, whose bytes are exact, and what is modelled
    # (activations, scratch), to which the safety factor applies. The VAE (small) stays
    # through every stage; editing images are encoded one at a time, after the text, with
    # what the text stage left resident.
    kept_text = fp.text_resident_bytes if plan.keep_text_encoder and not plan.stream_text_encoder else 0
    in_text = resident + fp.transformer_bytes * plan.transformer_in_text
    stages = {"text_encoding": (in_text + (fp.text_stream_bytes if plan.stream_text_encoder else fp.text_resident_bytes),
                                text_act + fp.text_dequant_bytes)}
    if images:
        stages["image_encoding"] = (in_text + kept_text, max(_encode_bytes(fp, w, h, plan) for w, h in images)
                                    + L_ref * fp.latent_channels * 4)
    inputs = cfg_batches * fp.text_len * D * s * 2 + L_img * fp.latent_channels * 4 * 3 + refs
    # Modulation layers left on disk are read for the modulation stage (every step's
    # modulations: 104 KB a step at klein's shapes, up to 16 MB kept, in OVERHEAD) and gone
    # before denoising; a reload of the transformer reads them too, before that stage. A file
    # in another dtype than the pipeline's, or a BFL file's output norm, holds file tensors
    # beside the copies made from them then.
    blocks = fp.transformer_bytes - (0 if plan.keep_modulation else fp.modulation_bytes)
    if not plan.keep_modulation:
        stages["modulation"] = (resident + fp.transformer_bytes + kept_text, inputs + fp.modulation_cast_bytes)
    stages["denoising"] = (resident + blocks + kept_text, acts + inputs)
    flushed = held + scratch + inputs if plan.sync and plan.overlap and plan.hidden_parts > 1 else None
    stages["decoding"] = (resident + blocks * plan.transformer_in_decode + kept_text, max(mid, up))
    # The decode's parts after its first (the mid block, which starts on what the denoising
    # left, released when the stage began): a block of the up path, or a strip's scratch.
    vae_part = (_strip_part(fp.vae_held_per_pixel, fp.vae_strip_fixed, fp.vae_strip_per_pixel, width,
                            plan.vae_strip, vae_overlap, STRIP_DECODE) if plan.vae_strip
                else up_block)
    vae_flushed = None
    if plan.vae_strip and vae_overlap and plan.vae_execution.sync:
        one = _strip_part(fp.vae_held_per_pixel, fp.vae_strip_fixed, fp.vae_strip_per_pixel, width, plan.vae_strip,
                          False, STRIP_DECODE)
        vae_flushed = max(mid_block + vae_scores_bytes(latent_px), strips(False) + others), one
    elif not plan.vae_tile and vae_overlap and plan.vae_execution.sync and width * height <= FLUSHED_WHOLE_DECODE:
        # A whole decode two blocks in flight: one block at a time it is the up path's
        # scratch once; the second block in flight adds what OVERLAP_WHOLE_DECODE counts.
        one = up_block + up_stats
        vae_flushed = max(mid_block + vae_scores_bytes(latent_px), up - (in_flight - 1) * one), (in_flight - 1) * one
    return _Terms(stages, part, flushed, vae_part, vae_flushed)


def _strip_bytes(held_per_pixel: float, fixed: float, per_pixel: float, width: int, height: int, rows: int,
                 overlap: bool, floors: tuple[float, float]) -> float:
    """Peak bytes of a strip decode or encode: the whole tensors it holds at its peak
    (`held_per_pixel` per image pixel) and a strip's scratch per part in flight, fixed plus
    per pixel of its window at its heaviest stage, at least `floors` (strict, per part two in
    flight) times the held bytes per pixel: STRIP_DECODE, STRIP_ENCODE. The calibration
    measures small windows; on an H200 full-width strips took 2-3x that per window pixel."""
    return (held_per_pixel * width * height
            + (OVERLAP_DECODER if overlap else 1) * _strip_part(held_per_pixel, fixed, per_pixel, width, rows, overlap,
                                                                floors))


def _strip_part(held_per_pixel: float, fixed: float, per_pixel: float, width: int, rows: int, overlap: bool,
                floors: tuple[float, float]) -> float:
    """One strip's scratch (`_strip_bytes`)."""
    floor = floors[1] if overlap else floors[0]
    return fixed + max(per_pixel, floor * held_per_pixel) * (rows + STRIP_HALO) * width


def _encode_bytes(fp: Footprint, width: int, height: int, plan: MemoryPlan) -> float:
    """Peak bytes of encoding one `width` x `height` image beyond what stays resident: whole
    (the encoder's calibrated scratch), or in strips as `estimate` counts a strip decode:
    the whole tensors of the encoder's widest stage, a strip's scratch per part in flight,
    and the float32 pixels and their 2x - 1 copy; or, when larger, the mid block at the
    latent's resolution (its input, the decoder's calibrated mid-block scratch, its
    attention scores and, where the moments kernel does not run, its statistics' float32 row
    blocks)."""
    if not plan.vae_encode_strip:
        return fp.vae_enc_fixed + fp.vae_enc_per_pixel * width * height
    s, latent_px = fp.dtype_bytes, (height // 8) * (width // 8)
    strips = (_strip_bytes(fp.vae_enc_held_per_pixel, fp.vae_enc_strip_fixed, fp.vae_enc_strip_per_pixel, width,
                           height, plan.vae_encode_strip, plan.vae_execution.overlap, STRIP_ENCODE)
              + width * height * 3 * 4 * 2 + _strip_moments_bytes(fp, height, plan.vae_encode_strip))
    mid = (latent_px * fp.vae_mid_channels * s + (OVERLAP_DECODER if plan.vae_execution.overlap else 1)
           * (fp.vae_mid_fixed + fp.vae_mid_per_pixel * latent_px) + vae_scores_bytes(latent_px)
           + _stats_bytes(fp, latent_px * fp.vae_mid_channels))
    return max(strips, mid)


def _strip_moments_bytes(fp: Footprint, height: int, rows: int) -> int:
    """The block-moments kernel's partial sums that a stage's strips hold until its merge
    (vae_strips._moments): two float32 outputs of about BLOCK_MOMENTS_VALUES values a strip,
    for the strips of the stage cut into `rows`-row strips (the most of any stage) and the
    next stage's first. None without the kernel (a strip's moments are a channel's sums)."""
    return 2 * 4 * BLOCK_MOMENTS_VALUES * (-(-height // rows) + 1) if fp.vae_moments_kernel else 0


def _stats_bytes(fp: Footprint, elements: int, tiled: bool = False) -> int:
    """The float32 row block a GroupNorm's statistics reduce over `elements` values at a time
    (vae.group_stats); none where the column-moments kernel reduces 16-bit values as read,
    except for tiles: a tile's statistics read a strided core of the tile, which the kernel's
    row-contiguous input copies first (not calibrated; the row block stands for it)."""
    return 0 if fp.vae_moments_kernel and not tiled else 4 * min(Execution().reduce_block, elements)


def _dit_cost(plan: MemoryPlan, fmt: str) -> float:
    """The measured cost of this (chunk, passes) for `fmt`, else the chunk's (measured for
    `fmt` or the sum's) plus the passes', but never above a smaller chunk's measured with
    the same passes: a larger chunk does the same work in fewer, larger matmuls."""
    measured, chunk, parts = COST_DIT.get(fmt, {}), plan.token_chunk, plan.hidden_parts
    if (chunk, parts) in measured:
        return measured[chunk, parts]
    cost = (measured.get((chunk, 1), COST_TOKEN_CHUNK[chunk]) + COST_HIDDEN_PARTS[parts]
            + COST_PARTS_IN_CHUNKS * (parts > 1 and bool(chunk)))
    return min([cost] + [v for (c, q), v in measured.items() if q == parts and c and (chunk is None or c < chunk)])


def plan_cost(plan: MemoryPlan, fmt: str = "") -> float:
    """Rough seconds a plan adds to a generation over the unconstrained run; `fmt`: the
    transformer's packed format (Footprint.packed_format)."""
    # The encoder is read again for every new prompt when it is streamed or not kept.
    reads_text = plan.stream_text_encoder or not plan.keep_text_encoder
    return (COST_STREAM_TEXT * reads_text + COST_RELOAD_TRANSFORMER * plan.releases_transformer
            + COST_RELOAD_MODULATION * (not plan.keep_modulation)
            + COST_STRICT * (plan.sync and not plan.overlap)
            + (COST_STRICT_VAE[plan.vae_strip] + COST_STRICT_VAE[plan.vae_encode_strip] * bool(plan.vae_encode_strip))
            * (plan.vae_execution.sync and not plan.vae_execution.overlap)
            + _dit_cost(plan, fmt) + COST_SPLIT_SLABS * (bool(fmt) and not plan.whole_slabs)
            + COST_ATTENTION_ROWS[plan.attention_rows]
            + COST_VAE_TILE[plan.vae_tile] + COST_VAE_STRIP[plan.vae_strip] + COST_VAE_STRIP[plan.vae_encode_strip])


def candidate_plans(width: int, height: int, fused_attention: bool = True, extra_tokens: int = 0,
                    encode_height: int = 0, fmt: str = "", slab_tokens: int = 0, modulation: bool = False,
                    text_len: int = 512):
    """Every budgeted plan for this size, cheapest in time first. Each streams the text
    encoder: a budgeted run reads it again for every new prompt, streamed or whole, and
    streamed it holds a layer or two instead of all of it. Attention chunks only
    where the attention materialises its scores (chunks cost memory next to a fused
    kernel); strips and tiles only smaller than the image. A plan decodes whole, in strips
    or in tiles. With images to encode (`encode_height`: the tallest), it encodes them whole
    or in strips lower than that. Steps over all tokens at once (whole blocks or MLP passes) of a
    packed `fmt` whose tokens reach the slab path with whole slabs (`slab_tokens`, 0: none) run
    with whole slabs or the kernels' slabs.
    With `modulation` (layers that can be read again) each plan is also offered with them left on disk.
    Tokens: the image's, `extra_tokens` (reference images') and `text_len` (the prompt's, padded)."""
    side, L = max(width, height), _image_tokens(width, height) + text_len + extra_tokens
    decodes = ([(None, None)] + [(None, s) for s in VAE_STRIPS if s < height]
               + [(t, None) for t in VAE_TILES if t < side])
    chunks = [c for c in TOKEN_CHUNKS if c is None or c < L]
    rows = ATTENTION_ROWS if not fused_attention else (None,)
    keeps = ((True, True), (True, False), (False, True), (False, False))
    encodes = [None] + [s for s in VAE_STRIPS if s < encode_height]
    plans = [MemoryPlan(True, False, in_text, in_decode, tile, chunk, r, sync=True, overlap=overlap,
                        vae_strip=strip, vae_encode_strip=enc, hidden_parts=parts, vae_overlap=vae_overlap)
             for in_text, in_decode in keeps
             for tile, strip in decodes for chunk in chunks for r in rows for overlap in (True, False)
             for enc in encodes for parts in HIDDEN_PARTS for vae_overlap in (None, not overlap)
             if parts > 1 or chunk not in PASSES_ONLY]
    if fmt and 0 < slab_tokens <= L:
        plans += [replace(p, whole_slabs=True) for p in plans if p.token_chunk is None]
    if modulation:
        plans += [replace(p, keep_modulation=False) for p in plans]
    return sorted(plans, key=lambda p: plan_cost(p, fmt))


def cheapest(plan: MemoryPlan, fp: Footprint, width: int, height: int) -> bool:
    """Whether `plan` costs as little time as any budgeted plan for this size can."""
    return plan_cost(plan, fp.packed_format) == _least_cost(fp, width, height)


@lru_cache(maxsize=64)
def _least_cost(fp: Footprint, width: int, height: int) -> float:
    return plan_cost(_candidates(fp, width, height, ())[0], fp.packed_format)


def with_estimate(plan: MemoryPlan, fp: Footprint, width: int, height: int, cfg_batches: int = 1,
                  images: tuple = ()) -> MemoryPlan:
    """`plan` with its estimates for this generation (what a run sets its limits from)."""
    return _estimated(plan, _terms(fp, width, height, plan, cfg_batches, images))


def _estimated(plan: MemoryPlan, terms: "_Terms", denoising: int | None = None,
               decoding: int | None = None) -> MemoryPlan:
    """`plan` with the estimates of its `terms`, the denoising stage's replaced by `denoising`
    when given, the decoding stage's by `decoding` (a strip decode that the flush keeps
    under it, its margin then a strip as a strict decode counts it)."""
    est = _stage_bytes(terms)
    if denoising is not None:
        est["denoising"] = denoising
    part, vae_part = _part_bytes(terms)
    if decoding is not None:
        est["decoding"], vae_part = decoding, _flushed_decode(terms)[1]
    return replace(plan, estimated_peak_bytes=max(est.values()), stage_estimates=est, part_bytes=part,
                   vae_part_bytes=vae_part)


def _image_tokens(width: int, height: int) -> int:
    return (width // 16) * (height // 16)


def _extra_tokens(images) -> int:
    return sum(_image_tokens(w, h) for w, h in images)


def _candidates(fp: Footprint, width: int, height: int, images):
    return candidate_plans(width, height, fp.fused_attention, _extra_tokens(images),
                           max((h for _, h in images), default=0), fp.packed_format, fp.whole_slab_tokens,
                           fp.modulation_bytes > 0, fp.text_len)


def _least(terms: "_Terms", est: dict, flush: bool) -> tuple[int | None, int | None]:
    """The least a byte budget must hold for the denoising and the decoding stage where the
    pacer's flush keeps them under it (one part at a time: `flushed_estimate`,
    `_flushed_decode`) and that is less than the stage's estimate (`est`, the terms' stage
    bytes); else None for the stage."""
    if not flush:
        return None, None
    step, decode = _flushed_bytes(terms), _flushed_decode(terms)
    return (step[0] if step and step[0] < est["denoising"] else None,
            decode[0] if decode and decode[0] < est["decoding"] else None)


def smallest_plan(fp: Footprint, width: int, height: int, cfg_batches: int = 1, images: tuple = (),
                  flush: bool | None = None) -> MemoryPlan:
    """The plan with the lowest estimated peak (the slowest, most frugal one); `flush` as in
    `plan_memory`."""
    flush = flush_measured() if flush is None else flush

    def needs(p):
        terms = _terms(fp, width, height, p, cfg_batches, images)
        return _estimated(p, terms, *_least(terms, _stage_bytes(terms), flush))

    def rank(p):  # lowest peak first; among equal peaks, the lowest other stages, then the cheapest
        e = p.stage_estimates
        return max(e.values()), sum(e.values()), plan_cost(p, fp.packed_format)

    return min((needs(p) for p in _candidates(fp, width, height, images)), key=rank)


def flushing_cost(plan: MemoryPlan, fmt: str, tokens: int) -> float:
    """What flushing before many parts adds to a generation with this many image (and
    reference) tokens under `plan` for the packed format `fmt` (COST_FLUSHING: steps over all
    tokens by the largest token count measured at or below theirs, where larger steps are the
    more bound by the device; token chunks and other formats COST_FLUSHING_DEFAULT)."""
    by_size = COST_FLUSHING.get(fmt, {})
    measured = [t for t in by_size if t <= tokens]
    return by_size[max(measured)] if measured and plan.token_chunk is None else COST_FLUSHING_DEFAULT


def _with_flush(plan: MemoryPlan, terms: "_Terms", est: dict, limit: int, flush: bool, fmt: str,
                tokens: int) -> tuple[float, MemoryPlan] | None:
    """(what the flush adds to the plan's cost, the plan with its estimates) where `plan` is
    over `limit` (its stage bytes `est`) but the pacer's flush keeps each stage over it under
    it: those stages' estimates are the limit. A step with two parts in flight under the limit
    seldom waits, with only one it often does (`flushing_cost` of `tokens`, the image's and the
    references'); a decode flushes at its peaks. None otherwise."""
    step, decode = _least(terms, est, flush)
    over = {k for k, v in est.items() if v > limit}
    if not over or not over <= {k for k, least in (("denoising", step), ("decoding", decode)) if least and least <= limit}:
        return None
    cost = (flushing_cost(plan, fmt, tokens) * ("denoising" in over and _flushed_bytes(terms)[1] > limit)
            + COST_FLUSHING_VAE * COST_STRICT_VAE[plan.vae_strip] * ("decoding" in over))
    return cost, _estimated(plan, terms, limit if "denoising" in over else None, limit if "decoding" in over else None)


def budgeted(plan: MemoryPlan, fp: Footprint, width: int, height: int, budget: int, cfg_batches: int = 1,
             images: tuple = (), flush: bool | None = None) -> MemoryPlan:
    """`plan` with the estimates it runs under at a byte `budget`: its own where they fit,
    the budget for the stages that fit only with the pacer's flush (as `plan_memory` gives
    them). A plan that does not fit keeps its own estimates."""
    terms = _terms(fp, width, height, plan, cfg_batches, images)
    flushed = _with_flush(plan, terms, _stage_bytes(terms), budget, flush_measured() if flush is None else flush,
                          fp.packed_format, _image_tokens(width, height) + _extra_tokens(images))
    return flushed[1] if flushed else _estimated(plan, terms)


def plan_memory(fp: Footprint, width: int, height: int, budget, cfg_batches: int = 1,
                images: tuple = (), flush: bool | None = None) -> MemoryPlan:
    """The cheapest plan in time whose estimated peak fits `budget` (bytes, or AUTO: the
    plans that stream the text encoder, under `device_cap()`). Refuses, naming the
    smallest budget that works, when none fits. `images`: see `estimate`. AUTO decodes whole
    where that fits, and encodes editing images in strips where the whole encode would
    be the run's peak (`_auto_encode`). `flush`: whether a byte budget may take a plan that
    fits only with the pacer's flush (a step: `flushed_estimate`; a strip decode two strips
    in flight: `_flushed_decode`); by default where that was measured (`flush_measured`).
    Plans are kept by their arguments (`_planned`): a search costs 54-150 ms of host time
    on this project's CPU at klein's shapes (examples/plan_time.py), which every generation
    would otherwise pay."""
    flush = flush_measured() if flush is None else flush
    images = tuple((int(w), int(h)) for w, h in images)
    plan = _planned(fp, width, height, budget, cfg_batches, images, flush, device_cap() if budget == AUTO else budget)
    return replace(plan, stage_estimates=dict(plan.stage_estimates))  # the kept plan's dict stays the planner's


def forget_plans() -> None:
    """Drop the plans kept by `plan_memory` (after changing this module's constants)."""
    _planned.cache_clear()
    _least_cost.cache_clear()


@lru_cache(maxsize=64)
def _planned(fp: Footprint, width: int, height: int, budget, cfg_batches: int, images: tuple, flush: bool,
             limit: int) -> MemoryPlan:
    auto = budget == AUTO
    flushing = None  # (cost, plan): the cheapest plan that fits a byte budget only with the pacer's flush
    tokens = _image_tokens(width, height) + _extra_tokens(images)  # beside the prompt's, in every step
    for p in _candidates(fp, width, height, images):
        cost = plan_cost(p, fp.packed_format)
        if flushing and cost > flushing[0]:
            return flushing[1]
        terms = _terms(fp, width, height, p, cfg_batches, images)
        est = _stage_bytes(terms)
        if max(est.values()) <= limit:
            if auto and images and not p.vae_encode_strip:
                p, est = _auto_encode(fp, width, height, p, est, cfg_batches, images, limit)
                return with_estimate(p, fp, width, height, cfg_batches, images)
            return _estimated(p, terms)
        flushed = _with_flush(p, terms, est, limit, flush and not auto, fp.packed_format, tokens)
        if flushed and (not flushing or cost + flushed[0] < flushing[0]):
            flushing = cost + flushed[0], flushed[1]
    if flushing:
        return flushing[1]
    best = smallest_plan(fp, width, height, cfg_batches, images, flush)
    need = math.ceil(best.estimated_peak_bytes / 1e6) / 1e3  # GB, rounded up so that it fits
    what = f"this device's memory ({limit / GB:.2f} GB usable)" if auto else f"a memory budget of {limit / GB:.2f} GB"
    refs = f" with {len(images)} conditioning image{'s' if len(images) > 1 else ''}" if images else ""
    raise BonsaiError(
        f"a {width}x{height} generation{refs} does not fit {what}: the smallest plan "
        f"({describe(best)}) needs about {need:.3f} GB "
        f"(peak stage: {max(best.stage_estimates, key=best.stage_estimates.get)}). "
        f"Use a budget of at least {need:.3f} GB or a smaller image."
    )


# Prompts one encode takes at most (`text_batch`). Streamed, an encode reads the encoder once
# for all of them: c89 took 0.70 s for one new prompt and 0.91-1.04 s for 16 (57-65 ms a
# prompt; resident 45 ms for one, 23 ms a prompt for 16). Each adds its activations (90 MB
# at klein's shapes) to the text stage.
MAX_TEXT_BATCH = 16


def text_batch(fp: Footprint, width: int, height: int, plan: MemoryPlan, prompts: int, budget,
               cfg_batches: int = 1, waiting: int = 0) -> int:
    """How many of `prompts` upcoming prompts one encode under `plan` (a plan for a
    generation of this size) takes: MAX_TEXT_BATCH at most with the `waiting` ones already
    encoded ahead (which `fp` counts), and 0 where fewer than two fit (a lone prompt is its
    generation's own encode). Each waits for its generation holding its embeddings
    (`Footprint.prompt_bytes`) through every stage. Under a byte budget every stage must
    still fit it; under AUTO the text stage must stay under the run's peak stage (and that
    under `device_cap()`), so encoding ahead costs the waiting embeddings' bytes and nothing
    more; with no budget (None), as many as MAX_TEXT_BATCH leaves room for."""
    n = min(prompts, MAX_TEXT_BATCH - waiting)
    if n < 2:
        return 0
    if budget is None:
        return n
    est = plan.stage_estimates or estimate(fp, width, height, plan, cfg_batches)
    others = max((v for k, v in est.items() if k != "text_encoding"), default=0)
    cap = device_cap() if budget == AUTO else budget
    for b in range(n, 1, -1):
        text = text_stage_bytes(fp, width, height, plan, b, cfg_batches)
        peak = others + b * fp.prompt_bytes  # each waits until its generation has planned
        if peak <= cap and text <= (peak if budget == AUTO else cap):
            return b
    return 0


def text_stage_bytes(fp: Footprint, width: int, height: int, plan: MemoryPlan, prompts: int,
                     cfg_batches: int = 1) -> int:
    """The text-encoding stage's peak under `plan` with `prompts` prompts in one encode: each
    beyond the first adds its activations and its embeddings twice (the layers it taps, then
    their concatenation)."""
    weights, modelled = _terms(fp, width, height, plan, cfg_batches, ()).stages["text_encoding"]
    more = (prompts - 1) * (_text_activations(fp) + 2 * fp.prompt_bytes)
    return int(weights + SAFETY * (modelled + more) + OVERHEAD)


def _auto_encode(fp: Footprint, width: int, height: int, plan: MemoryPlan, est: dict, cfg_batches: int,
                 images, limit: int) -> tuple[MemoryPlan, dict]:
    """`plan` encoding in the tallest strips that take the image-encoding stage under the
    run's other stages, when the whole encode is the run's peak (4-5 GB above the other
    stages for a 1024 px reference on an H200). 256-row strips cost about 24 ms a 1024 px
    image there, under 3% of a generation (docs/benchmarks.md). A strip plan that does not
    lower the run's peak, or does not fit `limit`, leaves the whole encode."""
    others = max(v for k, v in est.items() if k != "image_encoding")
    if est["image_encoding"] <= others:
        return plan, est
    tallest = max(h for _, h in images)
    for rows in (r for r in VAE_STRIPS if r < tallest):
        p = replace(plan, vae_encode_strip=rows)
        e = estimate(fp, width, height, p, cfg_batches, images)
        if e["image_encoding"] <= others or rows == VAE_STRIPS[-1]:
            return (p, e) if max(e.values()) < max(est.values()) and max(e.values()) <= limit else (plan, est)
    return plan, est


def describe(plan: MemoryPlan) -> str:
    if plan == UNCONSTRAINED:
        return ("no limit: everything resident, the transformer block by block with two blocks in flight "
                "and each packed matrix decoded whole, the text encoder and the VAE in one graph")
    text = "stream the text encoder" if plan.stream_text_encoder else "load the text encoder whole"
    parts = [text + ("" if plan.keep_text_encoder else ", gone before denoising")]
    if plan.transformer_in_text and plan.transformer_in_decode:
        parts.append("keep the transformer")
    else:
        away = [s for s, kept in (("text encoding", plan.transformer_in_text),
                                  ("decoding", plan.transformer_in_decode)) if not kept]
        parts.append(f"release the transformer during {' and '.join(away)} (reloaded before denoising)")
    parts.append(f"{plan.vae_tile}-pixel VAE tiles" if plan.vae_tile else
                 f"VAE decode in {plan.vae_strip}-row strips" if plan.vae_strip else "whole-image VAE decode")
    if plan.vae_encode_strip:
        parts.append(f"VAE encode in {plan.vae_encode_strip}-row strips")
    if not plan.keep_modulation:
        parts.append("every step's modulations and the prompt's text tokens first, their layers left on disk")
    if plan.hidden_parts > 1:
        parts.append(f"the MLPs in {plan.hidden_parts} passes over their hidden units")
    if plan.token_chunk:
        parts.append(f"{plan.token_chunk}-token chunks")
    if plan.attention_rows:
        parts.append(f"attention in chunks of {plan.attention_rows} queries")
    if plan.whole_slabs:
        parts.append("each packed matrix decoded whole")
    if plan.sync:
        parts.append("block by block" + (", two blocks in flight" if plan.overlap else ""))
        if plan.vae_overlap is not None and plan.vae_overlap != plan.overlap:
            parts.append("the VAE with two parts in flight" if plan.vae_overlap else "the VAE one part at a time")
        parts += [f"the {what} in one graph" for what, one in (("text encoder", plan.text_sync is False),
                                                               ("VAE", plan.vae_sync is False)) if one]
    return ", ".join(parts)


# ---------------------------------------------------------------------------- calibration

def calibration_runs() -> int:
    """Runs of each calibration measurement, of which the least counts. On a GPU back-end a
    run's peak may hold bytes that are not the measured function's steady scratch: on an
    H200, 10 of 23 calibrations of the full FLUX.2 VAE (one run each) fitted a strip scratch
    of 1.6-49 KB per window pixel against 5.5 KB in the others, which changed the plans chosen
    for one budget (docs/benchmarks.md, c59-c61). Every excess seen was upward; the least of
    three runs narrowed the fitted figures (c62) but did not always remove it: where it stays
    at the smaller window the strip slope comes out low, under the per-pixel floors that
    `_strip_part` applies (STRIP_DECODE x the held bytes: 7-14 KB at the FLUX.2 VAE's).
    On the CPU a calibration repeats to within kilobytes from the same cache state (and
    takes minutes at full size): one run."""
    return 1 if mx.default_device() == mx.cpu else 3


def _scratch_peak(fn, runs: int = 1) -> int:
    """Bytes `fn()` allocates at its peak beyond what was live before it, the least of `runs`."""
    peaks = []
    for _ in range(runs):
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(fn())
        mx.synchronize()
        peaks.append(mx.get_peak_memory() - base)
    return min(peaks)


def _fit_line(x0: float, x1: float, y0: float, y1: float) -> tuple[float, float]:
    """(fixed, slope) of the line through two measurements, neither below zero."""
    slope = max(y1 - y0, 0) / (x1 - x0)
    return max(y0 - slope * x0, 0.0), slope


def vae_held_per_pixel(vae) -> float:
    """Bytes per image pixel of the whole tensors a strip decode holds at its peak."""
    f = vae.decoder_factor
    return held_bytes(vae.config, f, f, vae.dtype.size) / f**2


def conservative_vae_scratch(config) -> dict:
    """`calibrate_vae`'s figures without measuring, chosen above what was measured for
    the full FLUX.2 VAE in float16 (output channels 128, mid 512): on an H200 2.6 KB per
    output pixel and 5.6 MB + 2.9 KB per latent pixel (docs/results/h200-generate-4dd7b93.json),
    on this project's CPU 4.9 KB per output pixel and 24 MB fixed; strips on this CPU, in
    float32 (its convolutions unfold 3x3 patches of 256 channels: 9.2 KB per pixel), 11.3
    KB per pixel of a strip's window and no fixed part. Scaled with the channels of the last
    up block and of the mid block for other decoders."""
    c_out, c_mid = config.decoder_channels[0], config.decoder_channels[-1]
    return {"vae_up_fixed": 0.0, "vae_up_per_pixel": 64.0 * c_out, "vae_mid_fixed": 65536.0 * c_mid,
            "vae_mid_per_pixel": 16.0 * c_mid, "vae_strip_fixed": 32768.0 * c_mid,
            "vae_strip_per_pixel": 96.0 * c_out}


def calibrate_vae(vae, runs: int | None = None, flush: bool = True) -> dict:
    """Peak decoder scratch on this device and dtype, as Footprint's figures: the up path's
    fixed bytes and bytes per output pixel, the mid block's fixed bytes and bytes per latent
    pixel, and a strip decode's fixed bytes and bytes per pixel of a strip's window beyond
    the whole tensors it holds (`vae_strips.held_bytes`). Each is fitted to two measured
    runs block by block, one part evaluated before the next is built (on MLX's CUDA back-end
    planned decodes run ahead under the pacer's flush, which holds them to the estimate): the
    up path on 16x16 and 32x32 latent windows, the mid block on 16x16 and 32x32 latents (less its attention's measured
    scratch: `estimate` adds scores for the real size), strips of f and 2f rows at the
    heaviest stage (`vae_strips.stage_rows`) over 8x16 and 8x32 latents (windows of
    (8 + 2) x 128 and (16 + 2) x 256 pixels). Each measurement is the least of `runs`
    runs (None: `calibration_runs()`). With `flush`, each part waits for the device and its
    buffer releases before the next part is built (`Execution.flush_above` 0), so a part's
    peak holds no bytes of the part before that the back-end has yet to release: on an H200,
    24 of 24 calibrations of the full FLUX.2 VAE in three processes gave the same figures so,
    one run or three, where without it one run's up path ranged over 2,336-4,278 bytes per
    pixel and three runs' over 2,603-3,168 (h200-calibration-spread-c85-*.json).
    Backends differ by several x (MLX's CPU convolution unfolds 3x3 patches, GPU kernels
    do not), so this is measured; it resets the peak-memory counter. Where the GroupNorm
    statistics reduce float32 row blocks (no moments kernel), the blocks are bounded in size,
    not in pixels: they are measured here at a block small enough to be bounded at these
    sizes too, and `estimate` adds the real block. It decodes a 256x256 window: seconds on a
    GPU, about 5 minutes for the full FLUX.2 VAE on MLX's Linux CPU wheel (its convolutions
    run at 1-2 GFLOP/s), so plans that can do with `conservative_vae_scratch` use that
    instead."""
    dec, runs = vae.decoder, runs or calibration_runs()
    ex = Execution(sync=True, reduce_block=1 << 16, flush_above=0 if flush else None)
    C_lat, C_mid = vae.config.latent_channels, vae.config.decoder_channels[-1]
    up, mid, strips = [], [], []
    for side in (16, 32):
        z = mx.zeros((1, side, side, C_lat), dtype=vae.dtype)
        h = mx.zeros((1, side, side, C_mid), dtype=vae.dtype)
        q = mx.zeros((1, 1, side * side, C_mid), dtype=vae.dtype)
        mx.eval(z, h, q)
        # The mid block less its attention's scratch (not its output) as measured at this
        # size: the scores grow as L^2 here but are chunked at real sizes, where `estimate`
        # adds its own (generous) model of them.
        sdpa = max(_scratch_peak(lambda: mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0), runs) - q.nbytes, 0)
        mid.append(_scratch_peak(lambda: dec.mid(z, ex.pace()), runs) - sdpa)
        up.append(_scratch_peak(lambda: dec.up(h, pace=ex.pace()), runs))
        del z, h, q
    f = vae.decoder_factor
    for rows in (1, 2):
        h = mx.zeros((1, 8, 16 * rows, C_mid), dtype=vae.dtype)
        mx.eval(h)
        held = held_bytes(vae.config, 8 * f, 16 * rows * f, vae.dtype.size)
        strips.append(_scratch_peak(lambda: up_strips(dec, h, rows * f, ex.pace()), runs) - held)
        del h
    windows = [(rows * f + STRIP_HALO) * 16 * rows * f for rows in (1, 2)]
    names = ("vae_up_fixed", "vae_up_per_pixel", "vae_mid_fixed", "vae_mid_per_pixel", "vae_strip_fixed",
             "vae_strip_per_pixel")
    return dict(zip(names, (*_fit_line((16 * f) ** 2, (32 * f) ** 2, *up), *_fit_line(16**2, 32**2, *mid),
                            *_fit_line(*windows, *strips))))


def vae_enc_held_per_pixel(vae) -> float:
    """Bytes per image pixel of the whole tensors a strip encode holds at its peak."""
    f = vae.encoder_factor
    return encode_held_bytes(vae.config, f, f, vae.dtype.size) / f**2


def calibrate_vae_encoder(vae) -> dict:
    """Peak scratch of `vae.encode` on this device and dtype, as Footprint's figures: whole
    (fixed bytes and bytes per input pixel, fitted to encodes of 128x128 and 256x256 images
    in one graph, as the executor runs it) and in strips (fixed bytes and bytes per pixel
    of a strip's window beyond the whole tensors it holds, `vae_strips.encode_held_bytes`,
    fitted like `calibrate_vae`'s strips: f and 2f rows at the heaviest stage over 8 x 16
    and 8 x 32 latents, block by block), each the least of `calibration_runs()` runs. It
    resets the peak-memory counter."""
    whole, strips, f, runs = [], [], vae.encoder_factor, calibration_runs()
    for side in (128, 256):
        x = mx.zeros((1, side, side, 3), dtype=mx.float32)
        mx.eval(x)
        whole.append(_scratch_peak(lambda: vae.encode(x), runs))
        del x
    ex = Execution(sync=True, reduce_block=1 << 16)
    for rows in (1, 2):
        x = mx.zeros((1, 8 * f, 16 * rows * f, 3), dtype=mx.float32)
        mx.eval(x)
        held = encode_held_bytes(vae.config, 8 * f, 16 * rows * f, vae.dtype.size)
        strips.append(_scratch_peak(lambda: vae.encode(x, strip=rows * f, execution=ex), runs) - held)
        del x
    windows = [(rows * f + STRIP_HALO) * 16 * rows * f for rows in (1, 2)]
    names = ("vae_enc_fixed", "vae_enc_per_pixel", "vae_enc_strip_fixed", "vae_enc_strip_per_pixel")
    return dict(zip(names, (*_fit_line(128**2, 256**2, *whole), *_fit_line(*windows, *strips))))
