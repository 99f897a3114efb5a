"""FLUX.2 [klein] diffusion transformer in MLX.

Mirrors diffusers' `Flux2Transformer2DModel`: same parameter names (so checkpoints load
by name), same call signature and the same numerics where they matter (timestep cast,
float64 RoPE tables, float32 RoPE application, fp16 clipping).

Shapes: B batch, L_txt / L_img tokens, D = heads * head_dim, F = MLP hidden.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .attention import sdpa
from .config import TransformerConfig
from .execution import ONE_GRAPH, Execution, Pace, by_chunks
from .packed_linear import PackedLinear

FP16_MAX = 65504.0


def timestep_embedding(t: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding [B, dim] of t [B], cos half first (diffusers flip_sin_to_cos)."""
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = t.astype(mx.float32)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


def rope_tables(ids: mx.array, axes_dims: tuple[int, ...], theta: float) -> tuple[mx.array, mx.array]:
    """cos, sin tables [L, head_dim/2] for position ids [L, n_axes].

    Computed in float64 with numpy, as the reference does on the CPU, then rounded to
    float32: positions up to a few thousand times high frequencies need the precision.
    """
    pos = np.asarray(ids.astype(mx.float32), dtype=np.float32).astype(np.float64)
    angles = []
    for i, d in enumerate(axes_dims):
        inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))  # [d/2]
        angles.append(np.outer(pos[:, i], inv_freq))  # [L, d/2]
    ang = np.concatenate(angles, axis=-1)
    return mx.array(np.cos(ang).astype(np.float32)), mx.array(np.sin(ang).astype(np.float32))


def rope_rotation(ids: mx.array, axes_dims: tuple[int, ...], theta: float) -> tuple[mx.array, mx.array]:
    """`rope_tables` laid out for `apply_rope`: cos and signed sin [L, head_dim/2, 2] float32,
    so that rotating the pair (x0, x1) is x * cos + swap(x) * sin with sin = (-s, +s)."""
    cos, sin = rope_tables(ids, axes_dims, theta)
    return mx.stack([cos, cos], axis=-1), mx.stack([-sin, sin], axis=-1)


def _rope_fn(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    B, L, H, Dh = x.shape
    xp = x.reshape(B, L, H, Dh // 2, 2)
    # the pair swapped is a strided view of x: the compiled kernel reads x twice, writes once
    out = xp.astype(mx.float32) * cos[:, None] + xp[..., ::-1].astype(mx.float32) * sin[:, None]
    return out.reshape(B, L, H, Dh).astype(x.dtype)


_rope = mx.compile(_rope_fn)


def apply_rope(x: mx.array, rotation: tuple[mx.array, mx.array]) -> mx.array:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x [B, L, H, Dh] in float32 by the angles
    of `rope_rotation` for these L positions (one fused pass over x)."""
    return _rope(x, *rotation)


def layer_norm(x: mx.array, eps: float) -> mx.array:
    return mx.fast.layer_norm(x, None, None, eps)


# Elementwise chains around the matmuls, compiled: each runs as one kernel instead of a
# kernel (and a full-size temporary) per operation.
@lru_cache(maxsize=None)
def _modulator(eps: float):
    return mx.compile(lambda x, shift, scale: (1 + scale) * mx.fast.layer_norm(x, None, None, eps) + shift)


def modulate(x: mx.array, shift: mx.array, scale: mx.array, eps: float) -> mx.array:
    return _modulator(eps)(x, shift, scale)


@mx.compile
def swiglu_pair(a: mx.array, b: mx.array) -> mx.array:
    return nn.silu(a) * b


def swiglu(x: mx.array) -> mx.array:
    """silu of x's first half times its second half (the gate rows, then the up rows)."""
    return swiglu_pair(*mx.split(x, 2, axis=-1))


@mx.compile
def gated_add(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    return x + gate * y


def clip_fp16(x: mx.array) -> mx.array:
    return mx.clip(x, -FP16_MAX, FP16_MAX) if x.dtype == mx.float16 else x


def attention(q: mx.array, k: mx.array, v: mx.array, rows: int | None = None) -> mx.array:
    """q, k, v [B, L, H, Dh] -> [B, L, H*Dh], full (unmasked) attention; `rows` queries at a
    time where the backend materialises the scores (see attention.sdpa)."""
    B, L, H, Dh = q.shape
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    o = sdpa(q, k, v, Dh**-0.5, rows)
    return o.transpose(0, 2, 1, 3).reshape(B, L, H * Dh)


def linear_rows(linear, x: mx.array, r0: int, r1: int) -> mx.array:
    """x @ W[r0:r1].T (+ bias): output rows of a linear are independent, so a fused
    projection can run part by part without computing (or holding) the other parts."""
    if isinstance(linear, PackedLinear) or hasattr(linear, "rows"):  # packed layers, LoRA adapters
        return linear.rows(r0, r1)(x)
    if type(linear) is nn.Linear:
        y = x @ linear.weight[r0:r1].T
        return y + linear.bias[r0:r1].astype(y.dtype) if "bias" in linear else y
    # Any other layer type: correct, without the saving (the whole projection runs for each
    # range; no layer of the transformer takes this path).
    return linear(x)[..., r0:r1]


def swiglu_rows(linear, x: mx.array, hidden: int, ex: Execution, row0: int = 0,
                head: mx.array | None = None, pace: Pace | None = None) -> mx.array:
    """swiglu of a projection's rows [row0, row0 + 2 * hidden) (gate rows, then up rows),
    after `head` along the features when given ([head | swiglu], what the single block's
    output projection reads). In `ex.hidden_parts` passes: each computes the gate and up
    rows of its hidden units for every token of x and writes its columns into one buffer,
    so the [.., 2 * hidden] projection output never exists whole and each weight row is
    read once.
    `pace`: the block's pacer where it joins its parts (`Execution.joins`): the first pass's
    part computes `head` too (no part's result yet), and the last pass runs in the caller's
    next part."""
    spans = ex.hidden_spans(hidden)
    if len(spans) == 1:
        m = swiglu(linear_rows(linear, x, row0, row0 + 2 * hidden))
        return m if head is None else mx.concatenate([head, m], axis=-1)
    h0 = 0 if head is None else head.shape[-1]
    joins = pace is not None
    out, pace = ex.buffer((*x.shape[:-1], h0 + hidden), x.dtype), pace or ex.pace()
    if head is not None:
        out.write_columns(0, h0, head)
    for i, (c0, c1) in enumerate(spans):
        part = swiglu_pair(linear_rows(linear, x, row0 + c0, row0 + c1),
                           linear_rows(linear, x, row0 + hidden + c0, row0 + hidden + c1))
        written = out.write_columns(h0 + c0, h0 + c1, part)
        if not joins:
            pace(written, wait=(part,))
        elif i < len(spans) - 1:
            joined = (head,) if i == 0 and head is not None else ()
            pace(written, *joined, wait=(part, *joined))
    return out.value


def gated_ff(ff, x, shift, scale, gate, eps, ex: Execution, pace: Pace | None = None):
    """x + gate * ff(modulate(x)): token-wise, so it runs `ex.token_chunk` tokens at a time,
    bounding the [chunk, 2F] intermediate instead of holding [L, 2F]. `pace`: see swiglu_rows."""
    return by_chunks(lambda xc: gated_add(xc, gate, ff(modulate(xc, shift, scale, eps), ex, pace)), x, ex)


class TimestepEmbedder(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class TimeGuidanceEmbed(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.channels = cfg.timestep_guidance_channels
        self.timestep_embedder = TimestepEmbedder(self.channels, cfg.inner_dim)
        if cfg.guidance_embeds:
            self.guidance_embedder = TimestepEmbedder(self.channels, cfg.inner_dim)

    def __call__(self, t: mx.array, guidance: mx.array | None, dtype) -> mx.array:
        temb = self.timestep_embedder(timestep_embedding(t, self.channels).astype(dtype))
        if guidance is not None and "guidance_embedder" in self:
            temb = temb + self.guidance_embedder(timestep_embedding(guidance, self.channels).astype(dtype))
        return temb


class Modulation(nn.Module):
    """SiLU -> Linear(D -> 3*sets*D); computed once per timestep, shared by all blocks of a kind."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.linear = nn.Linear(dim, 3 * sets * dim, bias=False)

    def __call__(self, temb: mx.array) -> list[mx.array]:
        mod = self.linear(nn.silu(temb))[:, None, :]  # [B, 1, 3*sets*D]
        return mx.split(mod, mod.shape[-1] // temb.shape[-1], axis=-1)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array, ex: Execution = ONE_GRAPH, pace: Pace | None = None) -> mx.array:
        return self.linear_out(swiglu_rows(self.linear_in, x, self.hidden, ex, pace=pace))


def _block_inputs(ex: Execution, chunked: bool, after: tuple) -> tuple:
    """What a block's attention waits for once started, where the block runs its MLP in passes
    over all its tokens: `after`, the block's inputs as the part before returned them (not
    their modulated copies, which the attention's own part computes: MLX signals a part's
    arrays when all of it is done, so waiting on one would idle the device until the attention
    finished). Its q, k and v are no part of their own there (the wait they made); without
    this the passes would start while the block before still runs, up to five parts in flight
    on a device that runs them in order, where the estimate counts three. Elsewhere nothing:
    token chunks pace their q, k and v, and whole blocks with the attention apart (two parts a
    block) keep at most four half blocks in flight: two whole blocks, as `estimate` counts."""
    return after if ex.hidden_parts > 1 and not chunked else ()


class JointAttention(nn.Module):
    """Attention of the double-stream block: separate projections per stream, one softmax."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        D, Dh = cfg.inner_dim, cfg.attention_head_dim
        self.heads, self.eps = cfg.num_attention_heads, cfg.eps
        self.to_q = nn.Linear(D, D, bias=False)
        self.to_k = nn.Linear(D, D, bias=False)
        self.to_v = nn.Linear(D, D, bias=False)
        self.to_out = [nn.Linear(D, D, bias=False)]
        self.add_q_proj = nn.Linear(D, D, bias=False)
        self.add_k_proj = nn.Linear(D, D, bias=False)
        self.add_v_proj = nn.Linear(D, D, bias=False)
        self.to_add_out = nn.Linear(D, D, bias=False)
        self.norm_q = nn.RMSNorm(Dh, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(Dh, eps=cfg.eps)
        self.norm_added_q = nn.RMSNorm(Dh, eps=cfg.eps)
        self.norm_added_k = nn.RMSNorm(Dh, eps=cfg.eps)

    def __call__(self, img: mx.array, txt: mx.array, rope: tuple[mx.array, mx.array], ex: Execution,
                 after: tuple = (), joins: bool = False):
        """q, k, v of both streams (text first) are written chunk by chunk into [B, L, H, Dh]
        buffers: the float32 RoPE temporaries exist for one chunk at a time, nothing is
        concatenated. Returns the image and text outputs. `joins`: the attention runs in the
        part of the MLP pass that first reads it (`Execution.joins`)."""
        B, L_txt, D = txt.shape
        L = L_txt + img.shape[1]
        bufs = [ex.buffer((B, L, self.heads, D // self.heads), txt.dtype) for _ in range(3)]
        chunked = ex.chunked(max(L_txt, img.shape[1]))
        pace = ex.pace(ex.in_parts(max(L_txt, img.shape[1])), after=_block_inputs(ex, chunked, after))
        for x, off, pq, pk, pv, nq, nk in (
                (txt, 0, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k),
                (img, L_txt, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)):
            for r0, r1 in ex.chunks(x.shape[1]):
                xc, rot, rows = x[:, r0:r1], tuple(t[off + r0:off + r1] for t in rope), (off + r0, off + r1)
                parts = (apply_rope(nq(pq(xc).reshape(B, r1 - r0, self.heads, -1)), rot),
                         apply_rope(nk(pk(xc).reshape(B, r1 - r0, self.heads, -1)), rot),
                         pv(xc).reshape(B, r1 - r0, self.heads, -1))
                writes = [b.write(*rows, p) for b, p in zip(bufs, parts)]
                if chunked:  # token by token; whole, q, k and v run in the attention's part
                    pace(*writes, wait=parts)
        o = attention(*(b.value for b in bufs), ex.attention_rows)  # [B, L_txt + L_img, D]
        del bufs
        if not joins:
            pace(o)  # the output projections' chunks all read it
        return by_chunks(self.to_out[0], o[:, L_txt:], ex), by_chunks(self.to_add_out, o[:, :L_txt], ex)


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.eps = cfg.eps
        self.attn = JointAttention(cfg)
        self.ff = FeedForward(cfg.inner_dim, cfg.mlp_hidden_dim)
        self.ff_context = FeedForward(cfg.inner_dim, cfg.mlp_hidden_dim)

    def __call__(self, img, txt, mod_img, mod_txt, rope, ex: Execution = ONE_GRAPH):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod_img
        c_shift_a, c_scale_a, c_gate_a, c_shift_m, c_scale_m, c_gate_m = mod_txt
        # Joined (`Execution.joins`), one pacer runs the block's parts: the attention and the
        # image's first pass once the block's inputs are done, the text's first pass, the
        # rest in the block's end.
        joined = ex.pace(after=(img, txt)) if ex.joins(img.shape[1] + txt.shape[1]) else None
        attn_img, attn_txt = self.attn(modulate(img, shift_a, scale_a, self.eps),
                                       modulate(txt, c_shift_a, c_scale_a, self.eps), rope, ex, after=(img, txt),
                                       joins=joined is not None)
        img = gated_ff(self.ff, gated_add(img, gate_a, attn_img), shift_m, scale_m, gate_m, self.eps, ex, joined)
        txt = gated_ff(self.ff_context, gated_add(txt, c_gate_a, attn_txt), c_shift_m, c_scale_m, c_gate_m,
                       self.eps, ex, joined)
        return img, clip_fp16(txt)


class ParallelAttention(nn.Module):
    """Single-stream block body: one fused projection feeds attention and the MLP in parallel."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        D, F = cfg.inner_dim, cfg.mlp_hidden_dim
        self.heads, self.dim, self.hidden = cfg.num_attention_heads, D, F
        self.to_qkv_mlp_proj = nn.Linear(D, 3 * D + 2 * F, bias=False)
        self.to_out = nn.Linear(D + F, D, bias=False)
        self.norm_q = nn.RMSNorm(cfg.attention_head_dim, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(cfg.attention_head_dim, eps=cfg.eps)

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array], ex: Execution, after: tuple = ()) -> mx.array:
        """x [B, L, D]. The fused projection and the MLP are token-wise and run in two passes
        over the projection's rows (q, k, v rows before attention, MLP rows after it), token
        chunk by token chunk, so only q, k, v, the attention output and the result ([B, L, 5D]
        in all) are ever held for every token, never the MLP's [B, L, 2F] / [B, L, F]."""
        B, L, _ = x.shape
        D, proj = self.dim, self.to_qkv_mlp_proj
        bufs = [ex.buffer((B, L, self.heads, D // self.heads), x.dtype) for _ in range(3)]
        chunked, joins = ex.chunked(L), ex.joins(L)
        # Joined (`Execution.joins`), the attention runs in the first pass's part (the MLP does
        # not read it), which waits for the block's inputs, and the last pass in the block's end.
        pace = ex.pace(ex.in_parts(L), after=_block_inputs(ex, chunked, after))
        for r0, r1 in ex.chunks(L):
            # q, k and v as three row ranges of the projection: each is its own output (no
            # parts to concatenate, nothing to copy for the head split).
            xc = x[:, r0:r1]
            qc, kc, vc = (linear_rows(proj, xc, i * D, (i + 1) * D).reshape(B, r1 - r0, self.heads, -1)
                          for i in range(3))
            rot = tuple(t[r0:r1] for t in rope)
            parts = (apply_rope(self.norm_q(qc), rot), apply_rope(self.norm_k(kc), rot), vc)
            writes = [b.write(r0, r1, p) for b, p in zip(bufs, parts)]
            if chunked:  # whole, q, k and v run in the attention's part
                pace(*writes, wait=parts)
        o = attention(*(b.value for b in bufs), ex.attention_rows)
        del bufs  # q, k, v die with the attention's evaluation
        if not joins:
            pace(o)
        out = ex.buffer((B, L, D), x.dtype)
        for r0, r1 in ex.chunks(L):
            y = self.to_out(swiglu_rows(proj, x[:, r0:r1], self.hidden, ex, 3 * D, head=o[:, r0:r1],
                                        pace=pace if joins else None))
            written = out.write(r0, r1, y)
            if chunked:  # whole, the output projection runs in the part that ends the block
                pace(written, wait=(y,))
        return out.value


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.eps = cfg.eps
        self.attn = ParallelAttention(cfg)

    def __call__(self, x, mod, rope, ex: Execution = ONE_GRAPH):
        shift, scale, gate = mod
        return clip_fp16(gated_add(x, gate, self.attn(modulate(x, shift, scale, self.eps), rope, ex, after=(x,))))


class NormOut(nn.Module):
    """AdaLayerNormContinuous: the projection's first half is SCALE, the second SHIFT."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim, bias=False)

    def modulation(self, temb: mx.array) -> list[mx.array]:
        """[scale, shift], each [B, 1, D]."""
        return mx.split(self.linear(nn.silu(temb))[:, None, :], 2, axis=-1)

    def __call__(self, x: mx.array, mod: list[mx.array]) -> mx.array:
        scale, shift = mod
        return modulate(x, shift, scale, self.eps)


class Modulations(NamedTuple):
    """What a forward needs of its timestep: the modulations of the double blocks' image and
    text streams, of the single blocks and of the output norm, each a list of [B, 1, D]
    arrays. They depend on the timestep only, so a sampler computes every step's at once
    (`Flux2Transformer.modulations` over all its sigmas) and takes each step's with `step`."""
    img: list[mx.array]
    txt: list[mx.array]
    single: list[mx.array]
    out: list[mx.array]

    def step(self, i: int) -> "Modulations":
        """The modulations of timestep i of a batch of timesteps, as a batch of one."""
        return Modulations(*([m[i:i + 1] for m in part] for part in self))


# The layers that turn a timestep into its Modulations, by module path: 16-bit weights that a
# plan can leave on disk while the blocks run (executor.Models). At klein 4B's shapes they are
# 170M weights, 0.34 GB in bfloat16: 38% of the binary transformer's bytes.
MODULATION_LAYERS = ("time_guidance_embed", "double_stream_modulation_img", "double_stream_modulation_txt",
                     "single_stream_modulation", "norm_out")
# The layer that turns a prompt's embeddings into its text tokens (Context.txt), once per
# prompt: 16-bit weights (47 MB in bfloat16 at klein 4B's shapes) that a plan leaves on disk
# with the modulation layers.
PROMPT_LAYERS = ("context_embedder",)
# Every layer a plan can leave on disk: each is read only before the blocks run.
ON_DISK_LAYERS = MODULATION_LAYERS + PROMPT_LAYERS


class Context(NamedTuple):
    """What a forward needs of the prompt, the reference images and the positions, the same
    at every step."""
    txt: mx.array  # context_embedder(encoder_hidden_states) [B, L_txt, D]
    rope: tuple[mx.array, mx.array]  # rope_rotation for the text, image, then reference positions
    ref: mx.array | None = None  # x_embedder(reference tokens) [1, L_ref, D], after the image tokens


class Flux2Transformer(nn.Module):
    """`model(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids) -> [B, L_img, C_out]`.

    A sampler calls `prepare` once per generation (the text embedding and the RoPE angles do
    not change between steps), `modulations` once for all its timesteps, and `forward` once
    per step."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        D = cfg.inner_dim
        self.time_guidance_embed = TimeGuidanceEmbed(cfg)
        self.double_stream_modulation_img = Modulation(D, 2)
        self.double_stream_modulation_txt = Modulation(D, 2)
        self.single_stream_modulation = Modulation(D, 1)
        self.x_embedder = nn.Linear(cfg.in_channels, D, bias=False)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, D, bias=False)
        self.transformer_blocks = [DoubleStreamBlock(cfg) for _ in range(cfg.num_layers)]
        self.single_transformer_blocks = [SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers)]
        self.norm_out = NormOut(D, cfg.eps)
        self.proj_out = nn.Linear(D, cfg.out_dim, bias=False)

    @property
    def dtype(self):
        layer = self.x_embedder
        while "base" in layer:  # a LoRA adapter's wrapped layer
            layer = layer.base
        return layer.weight.dtype

    def __call__(self, hidden_states: mx.array, encoder_hidden_states: mx.array, timestep: mx.array,
                 img_ids: mx.array, txt_ids: mx.array, guidance: mx.array | None = None,
                 execution: Execution = ONE_GRAPH) -> mx.array:
        check_inputs(self.config, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids)
        ctx = self.prepare(encoder_hidden_states, img_ids, txt_ids)
        timestep = mx.broadcast_to(mx.array(timestep).reshape(-1), (hidden_states.shape[0],))
        return self.forward(hidden_states, self.modulations(timestep, hidden_states.dtype, guidance), ctx, execution)

    def prepare(self, encoder_hidden_states: mx.array, img_ids: mx.array, txt_ids: mx.array,
                reference: mx.array | None = None, reference_ids: mx.array | None = None,
                tokens: mx.array | None = None) -> Context:
        """`reference` [1, L_ref, C]: clean latent tokens of reference images with their
        `reference_ids` (t, i, j, 0), t = 10, 20, ... per image. They join the image tokens
        at every step, as Flux2KleinPipeline appends them, and are embedded once here (the
        embedding is token-wise, so that equals embedding them with the image each step).
        `tokens`: context_embedder(encoder_hidden_states) where the caller computed it
        already (a sampler whose context embedder is on disk while the blocks run)."""
        # Batched ids are assumed equal across the batch, as in the reference.
        ids = [t[0] if t.ndim == 3 else t for t in (txt_ids, img_ids)]
        if reference is not None:
            ids.append(reference_ids[0] if reference_ids.ndim == 3 else reference_ids)
        rope = rope_rotation(mx.concatenate(ids, axis=0), self.config.axes_dims_rope, self.config.rope_theta)
        ref = None if reference is None else self.x_embedder(reference)
        return Context(self.context_embedder(encoder_hidden_states) if tokens is None else tokens, rope, ref)

    def modulations(self, timestep: mx.array, dtype, guidance: mx.array | None = None) -> Modulations:
        """The Modulations of timesteps [B] (sigmas in [0, 1]) for activations of `dtype`."""
        # The reference rounds sigma to the activation dtype before scaling by 1000.
        timestep = mx.array(timestep).reshape(-1)
        temb = self.time_guidance_embed(
            timestep.astype(dtype) * 1000,
            None if guidance is None else mx.array(guidance).reshape(-1).astype(dtype) * 1000,
            dtype,
        )
        return Modulations(self.double_stream_modulation_img(temb), self.double_stream_modulation_txt(temb),
                            self.single_stream_modulation(temb), self.norm_out.modulation(temb))

    def forward(self, hidden_states: mx.array, mods: Modulations, ctx: Context,
                execution: Execution = ONE_GRAPH) -> mx.array:
        """One denoising step at the timestep of `mods` (a batch of one, or one per sample).
        `execution` says whether to evaluate block by block (MLX otherwise schedules the
        whole forward at once and holds many blocks' activations together: 12 GB at
        1024x1024 on an H200 against 1.2 GB block by block) and in token chunks."""
        ex = execution
        mod_img, mod_txt, mod_single = mods.img, mods.txt, mods.single
        img, txt = self.x_embedder(hidden_states), ctx.txt
        L_img = img.shape[1]
        if ctx.ref is not None:  # reference tokens ride along; only the image tokens come out
            img = mx.concatenate([img, mx.broadcast_to(ctx.ref, (img.shape[0], *ctx.ref.shape[1:]))], axis=1)

        pace = ex.pace()
        for block in self.transformer_blocks:
            img, txt = block(img, txt, mod_img, mod_txt, ctx.rope, ex)
            pace(img, txt)

        L_txt = txt.shape[1]
        x = mx.concatenate([txt, img], axis=1)
        for block in self.single_transformer_blocks:
            x = block(x, mod_single, ctx.rope, ex)
            pace(x)

        return self.proj_out(self.norm_out(x[:, L_txt:L_txt + L_img], mods.out))


def check_inputs(cfg: TransformerConfig, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids):
    """Shape checks with messages that name the argument, before any work starts."""

    def fail(msg):
        raise ValueError(f"Flux2Transformer: {msg}")

    if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
        fail(f"hidden_states must be [B, L_img, {cfg.in_channels}], got {list(hidden_states.shape)}")
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.joint_attention_dim:
        fail(f"encoder_hidden_states must be [B, L_txt, {cfg.joint_attention_dim}], "
             f"got {list(encoder_hidden_states.shape)}")
    B, L_img, _ = hidden_states.shape
    if encoder_hidden_states.shape[0] != B:
        fail(f"batch sizes differ: hidden_states has {B}, encoder_hidden_states has {encoder_hidden_states.shape[0]}")
    n_axes = len(cfg.axes_dims_rope)
    for name, ids, L in (("img_ids", img_ids, L_img), ("txt_ids", txt_ids, encoder_hidden_states.shape[1])):
        if ids.ndim not in (2, 3) or ids.shape[-2] != L or ids.shape[-1] != n_axes:
            fail(f"{name} must be [{L}, {n_axes}] or [B, {L}, {n_axes}], got {list(ids.shape)}")
    t = mx.array(timestep)
    if t.size not in (1, B):
        fail(f"timestep must be a scalar or have one value per batch element ({B}), got shape {list(t.shape)}")
    if not mx.issubdtype(hidden_states.dtype, mx.floating):
        fail(f"hidden_states must be floating point, got {hidden_states.dtype}")
