"""Runs the stages of a generation as a memory plan says: text encoding -> (reloading the
transformer) -> (every step's modulations) -> denoising -> (releasing the transformer) ->
decoding. The plan decides what is resident in each stage and how the models execute
(`MemoryPlan.execution`); this module only follows it and measures."""

from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .errors import BonsaiError, NonFiniteError, WeightsError
from .lora import LoraSet
from .memory import (AUTO, Footprint, MemoryMonitor, MemoryPlan, budget_limits, calibrate_vae, calibrate_vae_encoder,
                     conservative_vae_scratch, MlxLimits, vae_enc_held_per_pixel, vae_held_per_pixel)
from .packed_linear import PackedLinear, auto_backend
from .results import GenerationResult, StepEvent, to_pil
from .scheduler import denoise, first_step, flux2_sigmas, noised
from .transformer import MODULATION_LAYERS, ON_DISK_LAYERS, Modulations
from .vae import moments_in_kernel

# Prompt embeddings kept between generations, most recent last: a repeated prompt (several
# seeds, a --count run) is not encoded again. 8 MB each at klein's shapes, and 3 MB of text
# tokens once a generation has computed them (Models.text_tokens).
PROMPT_CACHE = 4
# Pixels shared by neighbouring VAE tiles. Exact tiles (full context, whole-image GroupNorm
# statistics) equal the untiled decode up to float rounding, so a narrow cross-fade is
# enough; wide overlaps only multiply the tiles.
VAE_TILE_OVERLAP = 16
# Bytes of step modulations kept, the schedules run lately (whose runs need no modulation
# layers), within the estimates' OVERHEAD: 157 steps at klein 4B's shapes in bfloat16 (104 KB
# a step; a 4-step schedule is 418 KB). A longer schedule is computed a window of that many
# steps at a time as its steps come, and not kept.
MODULATION_CACHE_BYTES = 16 << 20


def image_ids(h: int, w: int) -> mx.array:
    """(t, h, w, l) = (0, i, j, 0) for the latent grid, row-major."""
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    z = np.zeros(h * w, np.int32)
    return mx.array(np.stack([z, i.reshape(-1), j.reshape(-1), z], axis=-1).astype(np.int32))


def reference_ids(grids: list[tuple[int, int]]) -> mx.array:
    """(t, i, j, 0) over each reference image's latent grid, row-major, t = 10, 20, ... per
    image in order (Flux2KleinPipeline's _prepare_image_ids)."""
    parts = []
    for n, (h, w) in enumerate(grids):
        i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        t = np.full(h * w, 10 * (n + 1))
        parts.append(np.stack([t, i.reshape(-1), j.reshape(-1), np.zeros(h * w, np.int64)], axis=-1))
    return mx.array(np.concatenate(parts).astype(np.int32))


def text_ids(length: int) -> mx.array:
    z = np.zeros(length, np.int32)
    return mx.array(np.stack([z, z, z, np.arange(length, dtype=np.int32)], axis=-1))


def dtype_name(dtype) -> str:
    return str(dtype).rpartition(".")[2]  # "bfloat16", not "mlx.core.bfloat16"


def all_finite(x: mx.array) -> bool:
    return bool(mx.all(mx.isfinite(x)))


def nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def fused_attention(dtype) -> bool:
    """Whether MLX runs the transformer's attention (head dim 128, no mask) as one fused
    kernel that never holds the scores: Metal's does for 16- and 32-bit floats; CUDA's
    goes through cuDNN, for float16/bfloat16 only; the CPU back-end materialises them."""
    import os

    if mx.default_device() == mx.cpu:
        return False
    if mx.metal.is_available():
        return True
    return dtype in (mx.float16, mx.bfloat16) and os.environ.get("MLX_CUDA_USE_CUDNN_SDPA", "1") != "0"


def runs_on(layer: PackedLinear) -> str:
    """The backend a packed layer's matmul runs on: its own, or what "auto" picks here."""
    return auto_backend() if layer.backend == "auto" else layer.backend


def slab_tokens(packed, dtype, whole: bool = False, on_gpu: bool = False) -> int:
    """The fewest tokens from which one of the packed linears takes the GPU kernels' slab
    path (16-bit activations only), with the kernels' slabs or, `whole`, with whole slabs
    (kernels.WHOLE_SLAB_MIN_M); 0 when none can: what `memory.estimate` counts a chunk's
    slab scratch from. `on_gpu`: as if every packed linear ran on a GPU's kernels (plans
    made here for another device)."""
    gpu = [m.fmt for m in packed if on_gpu or runs_on(m) in ("metal", "cuda")]
    if not gpu or dtype not in (mx.float16, mx.bfloat16):
        return 0
    from . import kernels  # the GPU kernels' module: loaded only where they run

    rows = kernels.WHOLE_SLAB_MIN_M if whole else kernels.DEFAULT_CONFIG.slab_min_m
    return min(rows[fmt] for fmt in gpu)


def packed_info(model, dtype, on_gpu: bool = False) -> dict:
    """What the planner and `slab_tuning` need from a model's packed linears: the slab path's
    token thresholds (`slab_tokens`, with and without whole slabs) and the most weights of
    any packed matrix."""
    packed = [m for _, m in model.named_modules() if isinstance(m, PackedLinear)]
    return {"slab_tokens": slab_tokens(packed, dtype, on_gpu=on_gpu),
            "whole_slab_tokens": slab_tokens(packed, dtype, whole=True, on_gpu=on_gpu),
            "largest_packed": max((m.out_features * m.in_features for m in packed), default=0)}


def slab_tuning(info: dict, plan: MemoryPlan):
    """A context for the plan's forwards: with whole slabs, the kernels' config for them
    (`kernels.whole_slabs`: the slab cap raised to the transformer's largest packed matrix,
    so every matrix and row range the slab path meets is decoded as one slab, and the slab
    path from fewer rows); otherwise, or where no packed linear takes the slab path (`info`:
    Models.transformer_info), nothing changes."""
    if not (plan.whole_slabs and info["slab_tokens"]):
        return nullcontext()
    from . import kernels  # the GPU kernels' module: loaded only where they run

    return kernels.tuned(kernels.whole_slabs(info["largest_packed"]))


def _encoded(te, prompts: list[str], max_length: int, plan: MemoryPlan) -> mx.array:
    """Embeddings [len(prompts), L, D] of `prompts` as `plan` runs the encoder, evaluated and
    checked finite. Several prompts run layer by layer under any plan: one graph over every
    layer held each layer's activations of each prompt (16 GB for 16 prompts beside none's 5.2
    GB peak at 512 px, c90), where layer by layer 16 took 23 ms a prompt against one alone's
    45 ms in one graph (c89)."""
    sync = plan.text_layer_by_layer or len(prompts) > 1
    emb = te.encode(prompts, max_length=max_length, stream=plan.stream_text_encoder, sync=sync)
    mx.eval(emb)
    if not all_finite(emb):
        raise NonFiniteError(
            f"text encoding produced NaN or Inf in {dtype_name(emb.dtype)}: "
            + ("Qwen3's activations exceed float16's range; use dtype bfloat16 (the default) or float32"
               if emb.dtype == mx.float16 else "the text encoder's weights may hold NaN or Inf"),
            "text encoding")
    return emb


class Prompts:
    """Prompt embeddings kept between generations (PROMPT_CACHE, most recent last) and, once a
    generation has computed them, their text tokens (the context embedder of them): a repeated
    prompt is neither encoded nor embedded again. A prompt's tokens go with its embeddings;
    they are kept by the identity of embeddings the cache holds, which no other array can take
    while it holds them. Prompts encoded ahead (`ahead`) wait apart until their generation
    takes them into the cache; the footprint reserves room for as many as have waited at once
    (`reserved`) until the last is taken, so the generations of one batch plan alike (one plan
    search, kept, for all of them)."""

    def __init__(self):
        self._embeddings: OrderedDict = OrderedDict()  # (prompt, length, dtype) -> embeddings
        self._tokens: dict = {}  # id(kept embeddings) -> their text tokens
        self._ahead: dict = {}  # (prompt, length, dtype) -> embeddings no generation has used yet
        self._reserved = 0  # the most that have waited at once since none waited

    def embeddings(self, te, prompt: str, max_length: int, plan: MemoryPlan) -> mx.array:
        key = (prompt, max_length, te.dtype)
        if key in self._ahead:
            self._keep(key, self._ahead.pop(key))
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
            return self._embeddings[key]
        emb = _encoded(te, [prompt], max_length, plan)
        self._keep(key, emb)
        return emb

    def ahead(self, te, prompts: list[str], max_length: int, plan: MemoryPlan) -> list[str]:
        """Encode those of `prompts` not kept yet in one encode (one read of a streamed
        encoder for all of them); each waits, as a copy of its own, for its generation.
        Returns the prompts encoded."""
        new = [p for p in dict.fromkeys(prompts) if not self.kept(p, max_length, te.dtype)]
        if new:
            emb = _encoded(te, new, max_length, plan)
            rows = [mx.array(emb[i:i + 1]) for i in range(len(new))]  # copies: each freed on its own
            del emb
            mx.eval(rows)
            since = self.reserved  # none waited: a new batch's count
            self._ahead.update(((p, max_length, te.dtype), r) for p, r in zip(new, rows))
            self._reserved = max(since, len(self._ahead))
        return new

    def kept(self, prompt: str, max_length: int, dtype) -> bool:
        return (prompt, max_length, dtype) in self._embeddings or self.waits(prompt, max_length, dtype)

    def waits(self, prompt: str, max_length: int, dtype) -> bool:
        """Whether `prompt` was encoded ahead and no generation has taken it yet."""
        return (prompt, max_length, dtype) in self._ahead

    @property
    def waiting(self) -> int:
        """Prompts encoded ahead that no generation has used yet."""
        return len(self._ahead)

    @property
    def reserved(self) -> int:
        """Prompts whose embeddings the footprint counts as waiting: the most that have waited
        at once since none waited. Never fewer than wait now; a generation that takes one
        leaves the footprint, and so its plan, as it was for the batch's first."""
        return self._reserved if self._ahead else 0

    def _keep(self, key, emb: mx.array) -> None:
        self._embeddings[key] = emb
        while len(self._embeddings) > PROMPT_CACHE:
            _, gone = self._embeddings.popitem(last=False)
            self._tokens.pop(id(gone), None)

    def tokens(self, emb: mx.array, model, source: str = "") -> mx.array:
        """context_embedder(emb) [1, L, D] in `model`'s dtype, evaluated; from the cache when
        `emb` is kept embeddings whose tokens were computed."""
        kept = any(e is emb for e in self._embeddings.values())
        if kept and id(emb) in self._tokens:
            return self._tokens[id(emb)]
        try:
            tokens = model.context_embedder(emb.astype(model.dtype))
            mx.eval(tokens)
        except (RuntimeError, OSError) as e:  # a lazy read of a checkpoint that changed on disk
            raise WeightsError(f"the context embedder could not be read again from {source} ({e}): was the "
                               "checkpoint changed or removed? Load the pipeline again") from None
        if kept:
            self._tokens[id(emb)] = tokens
        return tokens

    def forget_tokens(self) -> None:
        """Drop every kept prompt's tokens (the context embedder changed: a LoRA adapter)."""
        self._tokens.clear()


class Models:
    """The loaded models, what is resident now, and the prompt embeddings kept."""

    def __init__(self, transformer, text_encoder, vae, transformer_loader: Callable | None = None,
                 max_sequence_length: int = 512):
        self.transformer, self.text_encoder, self.vae = transformer, text_encoder, vae
        self.max_sequence_length = max_sequence_length
        self._loader = transformer_loader  # re-reads the transformer after a plan released it
        packed = [m for _, m in transformer.named_modules() if isinstance(m, PackedLinear)]
        self.transformer_info = {
            "bytes": nbytes(transformer), "config": transformer.config, "dtype": transformer.dtype,
            **packed_info(transformer, transformer.dtype),
            "packed_format": packed[0].fmt if len({m.fmt for m in packed}) == 1 else "",
            "reference_matmul": any(runs_on(m) == "reference" for m in packed)}
        # What a plan that leaves the modulation layers and the context embedder on disk
        # (ON_DISK_LAYERS) frees: 0 where they cannot be read again (no files, or layers that
        # are not plain 16/32-bit linears, e.g. packed ones).
        leaves = [m for n in ON_DISK_LAYERS for _, m in transformer[n].named_modules() if not m.children()]
        plain = all(type(m) is nn.Linear and mx.issubdtype(m.weight.dtype, mx.floating) for m in leaves)
        self.transformer_info["modulation_bytes"] = (sum(nbytes(transformer[n]) for n in ON_DISK_LAYERS)
                                                     if plain and hasattr(transformer_loader, "lazy_weights") else 0)
        # reading them again, file tensors beside their cast or rearranged copies (`_computed`)
        cast = getattr(transformer_loader, "cast_read_bytes", None)
        self.transformer_info["modulation_cast_bytes"] = (cast(ON_DISK_LAYERS)
                                                          if cast and self.transformer_info["modulation_bytes"] else 0)
        # one step's Modulations: the double blocks' 6 + 6, the single blocks' 3, the output norm's 2 vectors
        self.transformer_info["modulation_step_bytes"] = 17 * transformer.config.inner_dim * transformer.dtype.size
        self.prompts = Prompts()
        self._modulations: OrderedDict = OrderedDict()
        self._vae_fit = self._vae_enc_fit = None
        self.loras = LoraSet()  # adapters, put back on the transformer whenever it is read again

    def release_transformer(self) -> None:
        self.check_plan(MemoryPlan(transformer_in_decode=False))
        self.transformer = None
        mx.clear_cache()

    def load_transformer(self):
        if self.transformer is None:
            self.transformer = self._loader()
            self.loras.apply(self.transformer)
        return self.transformer

    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Read, check and apply a LoRA; a bad file changes nothing."""
        info = self.transformer_info
        lora = self.loras.load(path, scale, info["config"], info["dtype"], name)
        self._apply_loras()
        return lora.name

    def set_lora_scale(self, name: str, scale: float) -> None:
        self.loras.set_scale(name, scale)
        self._apply_loras()

    def unload_lora(self, name: str | None = None) -> None:
        self.loras.remove(name)
        self._apply_loras()

    def _apply_loras(self) -> None:
        self.loras.apply(self.transformer)
        self._modulations.clear()  # an adapter may change the modulation layers
        self.prompts.forget_tokens()  # and the context embedder

    def modulations(self, sigmas: list[float], keep: bool = True) -> Callable[[int], Modulations]:
        """step i -> the Modulations of the step at sigmas[i]. A schedule whose modulations fit
        MODULATION_CACHE_BYTES is computed at once and kept (run again, it needs no modulation
        layers); a longer one is computed a window of steps at a time as the steps come. The
        layers are read where they were on disk; `keep` False leaves them and the context
        embedder (ON_DISK_LAYERS) on disk afterwards (their weights lazy reads of the checkpoint
        again), else they stay as they are."""
        if not keep:
            self.check_plan(MemoryPlan(keep_modulation=False))
        step_bytes = self.transformer_info["modulation_step_bytes"]
        window = max(1, MODULATION_CACHE_BYTES // step_bytes)
        if len(sigmas) > window:
            current: dict = {}

            def step(i: int) -> Modulations:
                w0 = i - i % window
                if w0 not in current:
                    current.clear()
                    current[w0] = self._computed(sigmas[w0:w0 + window], keep)
                return current[w0][i - w0]

            step(0)
            return step
        key = tuple(sigmas)
        steps = self._modulations.get(key)
        if steps is None:
            steps = self._modulations[key] = self._computed(sigmas, keep)
            while sum(map(len, self._modulations.values())) * step_bytes > MODULATION_CACHE_BYTES:
                self._modulations.popitem(last=False)
        else:
            self._modulations.move_to_end(key)
            if not keep:  # they may have been read since (a direct call of the transformer reads them)
                self._to_disk()
        return steps.__getitem__

    def _computed(self, sigmas: list[float], keep: bool) -> list[Modulations]:
        model = self.transformer
        mods = model.modulations(mx.array(sigmas, dtype=mx.float32), model.dtype)
        steps = [mods.step(i) for i in range(len(sigmas))]
        try:
            # Layers left on disk are lazy reads of the checkpoint: read one weight at a time, a
            # weight the file holds in another dtype (or a BFL file's output norm, made anew from
            # its tensor) lives beside the copy made from it, and beside the one before it where
            # the device frees buffers after eval returns (Metal frees a command buffer's inputs
            # in its completion handler): two at most.
            for _, w in tree_flatten([model[n].parameters() for n in MODULATION_LAYERS]):
                mx.eval(w)
            mx.eval(steps)
        except (RuntimeError, OSError) as e:  # a lazy read of a checkpoint that changed on disk
            raise WeightsError(f"the modulation layers could not be read again from {getattr(self._loader, 'path', '')} "
                               f"({e}): was the checkpoint changed or removed? Load the pipeline again") from None
        if not keep:
            self._to_disk(read=True)
        return steps

    def check_plan(self, plan: MemoryPlan) -> None:
        """Refuse, before any work, a plan that needs what these models cannot do."""
        if plan.releases_transformer and self._loader is None:
            raise BonsaiError("this pipeline was built from objects, not files: it cannot release its transformer, "
                              "so a plan must keep it")
        if not plan.keep_modulation and not self.transformer_info["modulation_bytes"]:
            raise BonsaiError("this pipeline's modulation layers cannot be read again from files (a pipeline built "
                              "from objects, or packed modulation layers), so a plan must keep them "
                              "(keep_modulation=True)")

    def _to_disk(self, read: bool = False) -> None:
        """Make the modulation layers and the context embedder (ON_DISK_LAYERS) lazy reads of
        the checkpoint again. MLX's cached buffers
        go back to the system only where weights were dropped: `read` (just read), or layers
        that held memory (read since, by a direct call of the transformer or a plan that keeps
        them). Layers still on disk free nothing, and the buffers a generation left for the
        next one to reuse stay."""
        lazy = self._loader.lazy_weights(ON_DISK_LAYERS)
        # the file's name of each held weight: a LoRA adapter wraps the layer whose weight it is
        held = {k: (k.replace(".base.", "."), v.shape) for k, v in tree_flatten(self.transformer.parameters())
                if k.startswith(ON_DISK_LAYERS)}
        for name, shape in held.values():
            if name not in lazy or lazy[name].shape != shape:
                raise WeightsError(f"the checkpoint of this pipeline's transformer no longer holds {name} as "
                                   f"{list(shape)}: was it changed on disk? Load the pipeline again")
        mx.synchronize()  # buffers the device still releases would otherwise move the count
        before = mx.get_active_memory()
        self.transformer.update(tree_unflatten([(key, lazy[name]) for key, (name, _) in held.items()]))
        if read or mx.get_active_memory() < before:
            mx.clear_cache()

    def encode(self, prompt: str, plan: MemoryPlan) -> mx.array:
        """Prompt embeddings [1, L, D], from the cache when this prompt was encoded lately."""
        return self.prompts.embeddings(self.text_encoder, prompt, self.max_sequence_length, plan)

    def encode_ahead(self, prompts: list[str], plan: MemoryPlan) -> list[str]:
        """Encode `prompts` (those not kept yet) in one encode under `plan`, to wait for their
        generations (Prompts.ahead); the encoder is evicted after where `plan` does not keep it."""
        done = self.prompts.ahead(self.text_encoder, prompts, self.max_sequence_length, plan)
        if not plan.keep_text_encoder:
            self.text_encoder.evict()
        return done

    def text_tokens(self, emb: mx.array) -> mx.array:
        """A prompt's text tokens (Prompts.tokens). The context embedder is read where it was on
        disk, and stays until `modulations(keep=False)` leaves it there again."""
        return self.prompts.tokens(emb, self.transformer, getattr(self._loader, "path", ""))

    def footprint(self, calibrated: bool = True, encoder: bool = False) -> Footprint:
        """What the planner needs to know. `calibrated`: the VAE's scratch measured on this
        device (once; seconds on a GPU, minutes on MLX's CPU wheel at full size), else
        the conservative figures (memory.conservative_vae_scratch). `encoder` adds the VAE
        encoder's measured scratch (measured once, when first asked for: only editing
        encodes images)."""
        if encoder:
            self.vae.read_encoder()  # resident from the plan on, as every stage of an edit counts it
        if encoder and self._vae_enc_fit is None and self.vae.has_encoder:
            self._vae_enc_fit = calibrate_vae_encoder(self.vae)
        enc_fit = self._vae_enc_fit if encoder and self._vae_enc_fit else {}
        if calibrated and self._vae_fit is None:
            self._vae_fit = calibrate_vae(self.vae)
        vae_fit = self._vae_fit if calibrated else conservative_vae_scratch(self.vae.config)
        return models_footprint(self, vae_fit, enc_fit, moments=calibrated and moments_in_kernel(self.vae.dtype))


def models_footprint(models: Models, vae_fit: dict, enc_fit: dict, moments: bool) -> Footprint:
    """The Footprint of `models` with the VAE's scratch figures `vae_fit` (and the encoder's,
    `enc_fit`, or none), `moments`: whether its GroupNorm statistics come from the moments
    kernel (`Models.footprint`)."""
    cfg, te = models.transformer_info["config"], models.text_encoder
    layers = [te.weight_bytes(i) for i in range(te.config.num_layers_needed)]
    args = te.config.args
    prompt_bytes = models.max_sequence_length * te.config.output_dim * te.dtype.size
    return Footprint(
        transformer_bytes=models.transformer_info["bytes"] + models.loras.nbytes, transformer_dim=cfg.inner_dim,
        transformer_mlp=cfg.mlp_hidden_dim, transformer_heads=cfg.num_attention_heads,
        transformer_max_out=3 * cfg.inner_dim + 2 * cfg.mlp_hidden_dim,
        reference_matmul=models.transformer_info["reference_matmul"],
        text_resident_bytes=te.weight_bytes(None) + sum(layers),
        # streamed, the embedding table's rows of the prompt's ids only; one layer is read ahead
        text_stream_bytes=2 * max(layers, default=0)
        + models.max_sequence_length * -(-te.weight_bytes(None) // args.vocab_size),
        text_hidden=args.hidden_size, text_heads=args.num_attention_heads, text_len=models.max_sequence_length,
        vae_bytes=nbytes(models.vae), vae_mid_channels=models.vae.config.decoder_channels[-1],
        vae_held_per_pixel=vae_held_per_pixel(models.vae), **vae_fit,
        vae_moments_kernel=moments,
        fused_attention=fused_attention(models.transformer_info["dtype"]),
        slab_tokens=models.transformer_info["slab_tokens"],
        whole_slab_tokens=models.transformer_info["whole_slab_tokens"],
        # the widest layer's dense weight, twice (MLX may dequantize the next before the last is freed)
        text_dequant_bytes=2 * max(args.intermediate_size, args.num_attention_heads * args.head_dim)
        * args.hidden_size * te.dtype.size if te.dequantize_matmuls else 0,
        dtype_bytes=models.transformer_info["dtype"].size,
        # the kept prompts' embeddings and their text tokens, and the embeddings of prompts encoded ahead
        cached_prompt_bytes=PROMPT_CACHE * (prompt_bytes + models.max_sequence_length * cfg.inner_dim
                                            * models.transformer_info["dtype"].size)
        + models.prompts.reserved * prompt_bytes,
        prompt_bytes=prompt_bytes,
        **enc_fit, vae_enc_held_per_pixel=vae_enc_held_per_pixel(models.vae) if enc_fit else 0.0,
        latent_channels=cfg.in_channels,
        lora=any(lora.scale != 0 for lora in models.loras),
        packed_format=models.transformer_info["packed_format"],
        modulation_bytes=models.transformer_info["modulation_bytes"],
        modulation_cast_bytes=models.transformer_info["modulation_cast_bytes"],
    )


@dataclass
class Request:
    """One generation's arguments, already checked (see BonsaiPipeline.stream)."""
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance: float
    use_cfg: bool
    seed: int | None
    noise: mx.array  # [1, L, C] float32
    model: str
    preview: Callable | None = None  # x0 tokens -> PIL image, after every `preview_every` steps
    preview_every: int = 1
    # Editing (images.py prepares them): reference pixels [h, w, 3] in [0, 1]; the image to
    # repaint [H, W, 3] with its per-token mask (1 repaints; None: everywhere) and strength.
    references: list = field(default_factory=list)
    init_image: np.ndarray | None = None
    mask: np.ndarray | None = None
    strength: float = 1.0

    @property
    def start(self) -> int:
        """Steps of the schedule skipped: the run starts from the init image noised to the next."""
        return first_step(self.steps, self.strength) if self.init_image is not None else 0

    @property
    def conditions(self) -> list:
        """The images the transformer sees beside the noise: the init image first (diffusers'
        inpainting conditions on it), then the references."""
        return ([self.init_image] if self.init_image is not None else []) + list(self.references)


def encode_ahead(models: Models, prompts: list[str], plan: MemoryPlan, budget: int | str | None = None) -> list[str]:
    """Encode upcoming `prompts` in one encode as the text stage of `plan` runs it, under the
    same MLX limits as a generation with `plan` (see `run`); they wait for their generations."""
    models.check_plan(plan)
    active = mx.get_active_memory()
    with MlxLimits(*budget_limits(budget, plan.estimated_peak_bytes, held=active)):
        if not plan.transformer_in_text and models.transformer is not None:
            models.release_transformer()
        return models.encode_ahead(prompts, plan)


def run(models: Models, req: Request, plan: MemoryPlan,
        budget: int | str | None = None) -> Iterator[StepEvent | GenerationResult]:
    """The stages of one generation under `plan`: a StepEvent after every denoising step,
    then the GenerationResult. Closing the generator stops it between steps. `budget`
    (bytes, AUTO or None) sets MLX's memory and buffer-cache limits for the run with the
    plan's estimate (memory.budget_limits); under AUTO the plan must be the one chosen for
    this request, or the budget None."""
    models.check_plan(plan)
    te, timings, t_start = models.text_encoder, {}, time.perf_counter()
    active = mx.get_active_memory()
    memory_limit, cache_bytes = budget_limits(budget, plan.estimated_peak_bytes, held=active)
    held = active if budget == AUTO else 0  # the caller's arrays, which auto's estimate does not count
    ex = plan.paced_execution(held)
    limits = MlxLimits(memory_limit, cache_bytes)
    with limits, MemoryMonitor() as mon:
        with mon.stage("text_encoding"):
            if not plan.transformer_in_text and models.transformer is not None:
                models.release_transformer()
            cond = models.encode(req.prompt, plan)
            neg = models.encode(req.negative_prompt or "", plan) if req.use_cfg else None
            if not plan.keep_text_encoder:
                te.evict()  # gone before denoising starts
        timings["text_encoding_s"] = time.perf_counter() - t_start

        encoded = []
        if req.conditions:
            t = time.perf_counter()
            with mon.stage("image_encoding"):
                for pixels in req.conditions:  # one image's activations at a time
                    encoded.append(models.vae.encode(mx.array(pixels[None]), strip=plan.vae_encode_strip,
                                                     execution=plan.vae_execution))
                    mx.eval(encoded[-1])
            timings["image_encoding_s"] = time.perf_counter() - t

        if models.transformer is None:
            t = time.perf_counter()
            with mon.stage("loading"):
                models.load_transformer()
            timings["transformer_load_s"] = time.perf_counter() - t

        h, w = req.height // 16, req.width // 16
        sigmas = flux2_sigmas(req.steps, h * w)[req.start:]
        index, step_mods, tokens = {s: i for i, s in enumerate(sigmas[:-1])}, None, None
        if not plan.keep_modulation:  # a stage of its own: the layers are read for it, then left on disk
            t = time.perf_counter()
            with mon.stage("modulation"):
                tokens = [models.text_tokens(e) for e in (cond, neg) if e is not None]
                step_mods = models.modulations(sigmas[:-1], keep=False)  # and the context embedder
            timings["modulation_s"] = time.perf_counter() - t

        t_denoise = time.perf_counter()
        with mon.stage("denoising"):
            model = models.transformer
            dtype = model.dtype
            step_mods = step_mods or models.modulations(sigmas[:-1])
            tokens = tokens or [models.text_tokens(e) for e in (cond, neg) if e is not None]
            img, txt = image_ids(h, w), text_ids(cond.shape[1])
            refs = ref_ids = None
            if encoded:
                refs = mx.concatenate(encoded, axis=1).astype(dtype)
                ref_ids = reference_ids([(p.shape[0] // 16, p.shape[1] // 16) for p in req.conditions])
            ctx = model.prepare(cond, img, txt, refs, ref_ids, tokens=tokens[0])
            neg_ctx = None if neg is None else model.prepare(neg, img, txt, refs, ref_ids, tokens=tokens[1])

            def velocity(x, sigma):
                with slab_tuning(models.transformer_info, plan):
                    mods = step_mods(index[sigma])
                    v = model.forward(x.astype(dtype), mods, ctx, execution=ex).astype(mx.float32)
                    if neg_ctx is None:
                        return v
                    v_neg = model.forward(x.astype(dtype), mods, neg_ctx, execution=ex).astype(mx.float32)
                return v_neg + req.guidance * (v - v_neg)

            x, keep = req.noise, None
            if req.init_image is not None:  # image to image: from the image noised to the first sigma
                x0 = encoded[0]
                x = noised(x0, req.noise, sigmas[0])
                if req.mask is not None:  # inpainting: after each step the kept tokens are the image at that noise
                    m = mx.array(req.mask)[None, :, None]
                    keep = lambda x, s: (1 - m) * noised(x0, req.noise, s) + m * x  # noqa: E731
            n = len(sigmas) - 1
            for step in denoise(velocity, x, sigmas, keep):
                x = step.x
                if not all_finite(x):  # [1, L, C]: a cheap reduction next to a transformer forward
                    raise NonFiniteError(
                        f"denoising step {step.index + 1} of {n} produced NaN or Inf in {dtype_name(dtype)}: "
                        + ("the activations overflowed; run with dtype bfloat16 or float32 (--dtype)"
                           if dtype == mx.float16 else "the transformer's weights may hold NaN or Inf"),
                        "denoising", step.index + 1)
                event = StepEvent(step.index + 1, n, step.sigma, step.sigma_next, time.perf_counter() - t_start)
                if req.preview and ((step.index + 1) % max(1, req.preview_every) == 0 or step.index + 1 == n):
                    event.preview = req.preview(step.x0)
                with limits.paused():  # the caller's work between steps is not held to the run's limit
                    yield event
            del model, ctx, neg_ctx, step, encoded, step_mods, tokens
        timings["denoising_s"] = time.perf_counter() - t_denoise

        if not plan.transformer_in_decode:
            # A stage of its own, as the reload is: what the plan's choice to release costs
            # (returning the freed buffers, clear_cache) is not the decode's time.
            t = time.perf_counter()
            with mon.stage("releasing"):
                models.release_transformer()
            timings["transformer_release_s"] = time.perf_counter() - t
        t_decode = time.perf_counter()
        with mon.stage("decoding"):
            vae = models.vae
            images = vae.decode_tokens(x.astype(vae.dtype), req.height, req.width, tile_size=plan.vae_tile,
                                       overlap=VAE_TILE_OVERLAP, execution=plan.paced_vae_execution(held),
                                       strip=plan.vae_strip)
            mx.eval(images)
            if not all_finite(images):
                raise NonFiniteError(f"decoding produced NaN or Inf in {dtype_name(vae.dtype)}: the VAE's activations "
                                     "overflowed or its weights hold NaN or Inf; try vae_dtype float32", "decoding")
        timings["decoding_s"] = time.perf_counter() - t_decode
        timings["total_s"] = time.perf_counter() - t_start
    yield GenerationResult(
        image=to_pil(images)[0], prompt=req.prompt, negative_prompt=req.negative_prompt if req.use_cfg else None,
        seed=req.seed, steps=req.steps, guidance=req.guidance if req.use_cfg else 1.0, width=req.width,
        height=req.height, model=req.model, timings=timings, array=np.array(images.astype(mx.float32))[0],
        plan=plan,
        memory={**mon.report.as_dict(), "memory_limit_bytes": memory_limit, "cache_limit_bytes": cache_bytes},
        edit=edit_info(req), loras=[(lora.name, lora.source, lora.scale) for lora in models.loras],
    )


def edit_info(req: Request) -> dict:
    info = {"references": len(req.references)} if req.references else {}
    if req.init_image is not None:
        info.update(init_image=True, strength=req.strength, mask=req.mask is not None)
    return info
