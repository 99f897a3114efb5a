"""Every checkpoint-name mapping of the transformer, in one place.

Our module tree uses diffusers' names, so a diffusers checkpoint loads as is. Black
Forest Labs' original FLUX.2 checkpoints differ in three ways besides names: the
double blocks fuse q, k, v into one `qkv` matrix per stream, the RMSNorm weights are
called `scale`, and the final adaLN projection stores (shift, scale) where diffusers
stores (scale, shift).
"""

from __future__ import annotations

import re

import mlx.core as mx

from .errors import WeightsError

# Whole-prefix renames outside the blocks (BFL -> diffusers).
_TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}

_DOUBLE = {
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
_DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}

_SINGLE = {
    "linear1": "attn.to_qkv_mlp_proj",
    "linear2": "attn.to_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}

_BLOCK_KEY = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)\.(weight|scale|bias)$")

# The 100 block linears of klein 4B that Bonsai packs to binary / ternary (diffusers names,
# relative to a block). Everything else stays 16-bit.
DOUBLE_BLOCK_LINEARS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
)
SINGLE_BLOCK_LINEARS = ("attn.to_qkv_mlp_proj", "attn.to_out")


def block_linear_names(num_layers: int, num_single_layers: int) -> list[str]:
    """Module paths (no `.weight`) of every packable block linear."""
    names = [f"transformer_blocks.{i}.{n}" for i in range(num_layers) for n in DOUBLE_BLOCK_LINEARS]
    names += [f"single_transformer_blocks.{i}.{n}" for i in range(num_single_layers) for n in SINGLE_BLOCK_LINEARS]
    return names


def bfl_module_to_diffusers(name: str) -> tuple[str, ...] | None:
    """The diffusers module(s) of a BFL module path (no parameter suffix): one, or three for
    a double block's fused qkv (its rows split q, k, v in that order); None if unknown."""
    m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", name)
    if m is None:
        return (_TOP_LEVEL[name],) if name in _TOP_LEVEL else None
    kind, idx, inner = m.groups()
    if kind == "double_blocks":
        if inner in _DOUBLE_QKV:
            return tuple(f"transformer_blocks.{idx}.{n}" for n in _DOUBLE_QKV[inner])
        return (f"transformer_blocks.{idx}.{_DOUBLE[inner]}",) if inner in _DOUBLE else None
    return (f"single_transformer_blocks.{idx}.{_SINGLE[inner]}",) if inner in _SINGLE else None


def is_bfl_checkpoint(keys) -> bool:
    return any(k.startswith(("double_blocks.", "single_blocks.", "img_in.", "final_layer.")) for k in keys)


# Of the weights a plan reads again from a BFL file (the modulation layers), those that
# bfl_to_diffusers makes anew from the file's tensor rather than renaming it (the output norm's
# shift and scale halves, swapped): reading one holds the file's tensor beside the copy. (The
# double blocks' q, k and v are row slices of theirs: views, never read again.)
BFL_REARRANGED = frozenset({"norm_out.linear.weight", "norm_out.linear.bias"})


def bfl_to_diffusers(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Rename a BFL FLUX.2 state dict to diffusers names. Unknown keys pass through
    unchanged, so the loader reports them as unexpected instead of dropping them."""
    out = {}

    def put(name, w):
        if name in out:
            raise WeightsError(f"two weights of this BFL checkpoint map to {name}: it is not a FLUX.2 checkpoint")
        out[name] = w

    for key, w in weights.items():
        m = _BLOCK_KEY.match(key)
        if m and w.ndim:
            kind, idx, inner, param = m.groups()
            param = "weight" if param == "scale" else param
            if kind == "double_blocks" and inner in _DOUBLE_QKV:
                if w.shape[0] % 3:
                    put(key, w)  # left for the shape check to report
                    continue
                for name, part in zip(_DOUBLE_QKV[inner], mx.split(w, 3, axis=0)):
                    put(f"transformer_blocks.{idx}.{name}.{param}", part)
                continue
            table, prefix = (_DOUBLE, "transformer_blocks") if kind == "double_blocks" else (_SINGLE, "single_transformer_blocks")
            if inner in table:
                put(f"{prefix}.{idx}.{table[inner]}.{param}", w)
                continue
            put(key, w)
            continue
        base, _, param = key.rpartition(".")
        if base in _TOP_LEVEL and w.ndim:
            if base == "final_layer.adaLN_modulation.1":
                if w.shape[0] % 2:
                    put(key, w)  # left for the shape check to report
                    continue
                shift, scale = mx.split(w, 2, axis=0)
                w = mx.concatenate([scale, shift], axis=0)
            put(f"{_TOP_LEVEL[base]}.{param}", w)
        else:
            put(key, w)
    return out
