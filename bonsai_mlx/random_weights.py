"""A complete Bonsai Image pack of random weights at the real shapes.

Benchmarks must load a model "the way real weights load" (same files, key names, dtypes,
sizes) without downloading 3.4 GB. `write_random_pack(root)` writes the layout of
PrismML's MLX packs, plus the FLUX.2 VAE they leave out:

    root/model_index.json                 {"is_distilled": true, ...}
    root/transformer-packed-mflux/        config.json, quantization_config.json,
                                          diffusion_pytorch_model.safetensors
                                          (block linears as MLX affine bits=1|2, group 128)
    root/text_encoder-mlx-4bit/           config.json, model.safetensors (mlx-lm 4-bit, group 64)
    root/tokenizer/                       tokenizer.json, tokenizer_config.json (byte-level BPE)
    root/vae/                             config.json, diffusion_pytorch_model.safetensors

Every tensor is drawn with numpy a few tens of MB at a time and streamed straight into
its safetensors file, so no dense model is ever built: writing the 2.3 GB text encoder
holds one chunk, not the file. The same tensor plan gives the exact file sizes without
writing anything (`pack_file_sizes`).

Values: packed codes are random (binary bits uniform; ternary codes 0, 1, 2, never 3),
group scales s ~ U(0.75, 1.25) / sqrt(K) (about 0.018 at K = 3072); 16-bit weights are
N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2). The numbers mean nothing; they keep
activations finite so a benchmark exercises the real code paths.

    python -m bonsai_mlx.random_weights OUT [--format binary|ternary] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import zlib
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import numpy as np

from .config import KLEIN_4B, TransformerConfig
from .errors import ConfigError
from .layouts import OFFICIAL_PACK, OUR_PACK
from .weight_names import block_linear_names

GROUP_SIZE = 128  # Bonsai's scale group along K
PACK_BITS = {"binary": 1, "ternary": 2}  # bits of PrismML's MLX affine packs
TEXT_BITS, TEXT_GROUP_SIZE = 4, 64  # text_encoder-mlx-4bit: nn.quantize(bits=4, group_size=64)

# PrismML's layout, plus the VAE folder they leave out.
TRANSFORMER_DIR, TEXT_DIR, TOKENIZER_DIR = OFFICIAL_PACK.transformer, OFFICIAL_PACK.text_encoder, OFFICIAL_PACK.tokenizer
VAE_DIR = OUR_PACK.vae

# Qwen3-4B (not the 2507 build), in transformers' config.json names.
QWEN3_4B = dict(
    hidden_size=2560,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=9728,
    vocab_size=151936,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
)

# diffusers AutoencoderKLFlux2 defaults = the FLUX.2 VAE (~84 M parameters).
FLUX2_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    decoder_block_out_channels=None,
    layers_per_block=2,
    act_fn="silu",
    latent_channels=32,
    norm_num_groups=32,
    sample_size=1024,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
    batch_norm_eps=1e-4,
    batch_norm_momentum=0.1,
    patch_size=[2, 2],
)

# How the quantization_config.json of the official packs names the layers left 16-bit.
SKIP_PATTERNS = ["x_embedder", "context_embedder", "time_guidance_embed", "modulation", "norm_out", "proj_out"]

# Logical values drawn at once per tensor chunk: 16 M (64 MB of float32 scratch).
_CHUNK_VALUES = 1 << 24

_ITEMSIZE = {"U32": 4, "BF16": 2, "F16": 2, "F32": 4, "I64": 8}  # safetensors dtype names
_SPREAD_4BIT = math.sqrt((16**2 - 1) / 12)  # std of codes 0..15, so s * 4.61 = weight std


# ----------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class Tensor:
    """One tensor of a file: what to draw, not the data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype: U32, BF16, F16, F32, I64
    kind: str  # bits | trits | normal | norm | var | scale | zeros
    std: float = 0.0  # normal: standard deviation; scale: base group scale
    mul: float = 1.0  # scale: stored value = s * mul
    key: str = ""  # random stream; tensors sharing a key draw the same numbers

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


def _dense(name: str, shape: tuple[int, ...], dtype: str = "BF16") -> Tensor:
    """A 16-bit weight: N(0, 1/fan_in) for matrices and convs, ~1 for norm weights."""
    if len(shape) == 1:
        return Tensor(name, shape, dtype, "norm")
    return Tensor(name, shape, dtype, "normal", std=math.prod(shape[1:]) ** -0.5)


def transformer_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of a diffusers Flux2Transformer2DModel (dense layout [out, in])."""
    D, F, hd = cfg.inner_dim, cfg.mlp_hidden_dim, cfg.attention_head_dim
    s = {
        "x_embedder.weight": (D, cfg.in_channels),
        "context_embedder.weight": (D, cfg.joint_attention_dim),
        "double_stream_modulation_img.linear.weight": (6 * D, D),  # shift, scale, gate x (attn, mlp)
        "double_stream_modulation_txt.linear.weight": (6 * D, D),
        "single_stream_modulation.linear.weight": (3 * D, D),
        "norm_out.linear.weight": (2 * D, D),
        "proj_out.weight": (cfg.out_dim, D),
    }
    for emb in ["timestep_embedder"] + (["guidance_embedder"] if cfg.guidance_embeds else []):
        s[f"time_guidance_embed.{emb}.linear_1.weight"] = (D, cfg.timestep_guidance_channels)
        s[f"time_guidance_embed.{emb}.linear_2.weight"] = (D, D)
    for i in range(cfg.num_layers):
        p = f"transformer_blocks.{i}"
        for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            s[f"{p}.attn.{n}.weight"] = (D, D)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            s[f"{p}.attn.{n}.weight"] = (hd,)
        for ff in ("ff", "ff_context"):
            s[f"{p}.{ff}.linear_in.weight"] = (2 * F, D)  # SwiGLU: gate and value halves
            s[f"{p}.{ff}.linear_out.weight"] = (D, F)
    for i in range(cfg.num_single_layers):
        p = f"single_transformer_blocks.{i}.attn"
        s[f"{p}.to_qkv_mlp_proj.weight"] = (3 * D + 2 * F, D)
        s[f"{p}.to_out.weight"] = (D, D + F)  # applied to concat[attention, mlp]
        s[f"{p}.norm_q.weight"] = (hd,)
        s[f"{p}.norm_k.weight"] = (hd,)
    return s


def transformer_tensors(cfg: TransformerConfig, fmt: str) -> list[Tensor]:
    """The official MLX affine pack: a block linear P [N, K] becomes P.weight uint32
    [N, K*bits/32], P.scales and P.biases bf16 [N, K/128] with w = scales * code + biases:
    binary scales = 2s, biases = -s (code 1 = +s); ternary scales = s, biases = -s
    (code = t + 1). Everything else is plain bf16."""
    bits = PACK_BITS[fmt]
    packed = set(block_linear_names(cfg.num_layers, cfg.num_single_layers))
    out = []
    for name, shape in sorted(transformer_shapes(cfg).items()):
        base = name[: -len(".weight")]
        if base not in packed:
            out.append(_dense(name, shape))
            continue
        n, k = shape
        if k % GROUP_SIZE:
            raise ConfigError(f"{base}: K = {k} is not a multiple of {GROUP_SIZE}; it cannot be packed")
        s, g = k**-0.5, (n, k // GROUP_SIZE)
        out += [
            Tensor(f"{base}.weight", (n, k * bits // 32), "U32", "bits" if bits == 1 else "trits"),
            # scales and biases share `key`, so they hold the same s and the loader's
            # exact checks (scales == -2 * biases, or == -biases) hold bit for bit.
            Tensor(f"{base}.scales", g, "BF16", "scale", std=s, mul=2.0 if bits == 1 else 1.0, key=base),
            Tensor(f"{base}.biases", g, "BF16", "scale", std=s, mul=-1.0, key=base),
        ]
    return out


def _text_sizes(text) -> dict:
    if is_dataclass(text):
        text = asdict(text)
    t = {**QWEN3_4B, **dict(text)}
    # the input sizes (K) of the quantized layers: embedding/q/k/v/gate/up, o_proj, down_proj
    for k in (t["hidden_size"], t["num_attention_heads"] * t["head_dim"], t["intermediate_size"]):
        if k % TEXT_GROUP_SIZE:
            raise ConfigError(f"text encoder: K = {k} is not a multiple of the 4-bit group size {TEXT_GROUP_SIZE}")
    return t


def text_config(text, bos_token_id: int, eos_token_id: int) -> dict:
    """config.json as mlx-lm's save_config writes it for a 4-bit Qwen3 (keys sorted)."""
    t = _text_sizes(text)
    q = {"group_size": TEXT_GROUP_SIZE, "bits": TEXT_BITS, "mode": "affine"}
    cfg = {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "hidden_act": "silu",
        "initializer_range": 0.02, "max_window_layers": t["num_hidden_layers"], "model_type": "qwen3",
        "rope_scaling": None, "sliding_window": None, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, **t, "quantization": q, "quantization_config": q,
    }
    return dict(sorted(cfg.items()))


def text_tensors(text) -> list[Tensor]:
    """mlx-lm's quantized Qwen3 (`model.` keys): every Linear and the Embedding as 4-bit
    affine (weight uint32 [N, K/8], scales and biases bf16 [N, K/64]), norms bf16."""
    t = _text_sizes(text)
    H, I, hd = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    q_dim, kv_dim = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    quantized = {"model.embed_tokens": ((t["vocab_size"], H), 1.0)}  # O(1) embeddings, as Qwen's
    norms = {"model.norm.weight": (H,)}
    for i in range(t["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name, shape in ((f"{p}.self_attn.q_proj", (q_dim, H)), (f"{p}.self_attn.k_proj", (kv_dim, H)),
                            (f"{p}.self_attn.v_proj", (kv_dim, H)), (f"{p}.self_attn.o_proj", (H, q_dim)),
                            (f"{p}.mlp.gate_proj", (I, H)), (f"{p}.mlp.up_proj", (I, H)),
                            (f"{p}.mlp.down_proj", (H, I))):
            quantized[name] = (shape, shape[1] ** -0.5)
        norms.update({f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
                      f"{p}.self_attn.q_norm.weight": (hd,), f"{p}.self_attn.k_norm.weight": (hd,)})
    if not t["tie_word_embeddings"]:
        quantized["lm_head"] = ((t["vocab_size"], H), H**-0.5)
    out = [_dense(name, shape) for name, shape in norms.items()]
    for base, ((n, k), std) in quantized.items():
        s, g = std / _SPREAD_4BIT, (n, k // TEXT_GROUP_SIZE)
        out += [
            Tensor(f"{base}.weight", (n, k * TEXT_BITS // 32), "U32", "bits"),
            # w = s * (code - 7.5): centred, std `std` over uniform codes 0..15
            Tensor(f"{base}.scales", g, "BF16", "scale", std=s, mul=1.0, key=base),
            Tensor(f"{base}.biases", g, "BF16", "scale", std=s, mul=-7.5, key=base),
        ]
    return sorted(out, key=lambda x: x.name)


def vae_config(vae) -> dict:
    v = {**FLUX2_VAE, **dict(vae)}
    # Tiny configs usually change only the channel lists; keep the block types in step.
    if "down_block_types" not in vae:
        v["down_block_types"] = ["DownEncoderBlock2D"] * len(v["block_out_channels"])
    if "up_block_types" not in vae:
        v["up_block_types"] = ["UpDecoderBlock2D"] * len(v["decoder_block_out_channels"] or v["block_out_channels"])
    return {"_class_name": "AutoencoderKLFlux2", **v}


def vae_shapes(vae) -> dict[str, tuple[int, ...]]:
    """Every tensor of a diffusers AutoencoderKLFlux2 state dict, PyTorch layouts
    (conv [out, in, kh, kw]), encoder included as in the klein repo's vae/."""
    v = vae_config(vae)
    L, groups = v["latent_channels"], v["norm_num_groups"]
    enc = list(v["block_out_channels"])
    dec = list(v["decoder_block_out_channels"] or enc)
    s: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k):
        s[f"{name}.weight"], s[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cout, cin, 1)

    def mid(name, c):  # resnet, single-head attention, resnet
        resnet(f"{name}.resnets.0", c, c)
        if v["mid_block_add_attention"]:
            norm(f"{name}.attentions.0.group_norm", c)
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                s[f"{name}.attentions.0.{proj}.weight"] = (c, c)
                s[f"{name}.attentions.0.{proj}.bias"] = (c,)
        resnet(f"{name}.resnets.1", c, c)

    conv("encoder.conv_in", enc[0], v["in_channels"], 3)
    cin = enc[0]
    for i, c in enumerate(enc):
        for j in range(v["layers_per_block"]):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
        cin = c
        if i < len(enc) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
    mid("encoder.mid_block", enc[-1])
    norm("encoder.conv_norm_out", enc[-1])
    conv("encoder.conv_out", 2 * L, enc[-1], 3)  # mean and log-variance

    rev = dec[::-1]
    conv("decoder.conv_in", rev[0], L, 3)
    mid("decoder.mid_block", rev[0])
    prev = rev[0]
    for i, c in enumerate(rev):
        for j in range(v["layers_per_block"] + 1):  # decoder blocks have one resnet more
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else c, c)
        prev = c
        if i < len(rev) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
    norm("decoder.conv_norm_out", dec[0])
    conv("decoder.conv_out", v["out_channels"], dec[0], 3)

    if v["use_quant_conv"]:
        conv("quant_conv", 2 * L, 2 * L, 1)
    if v["use_post_quant_conv"]:
        conv("post_quant_conv", L, L, 1)
    # Latent normalization after the 2x2 patchify: 4 * latent channels.
    s["bn.running_mean"] = s["bn.running_var"] = (4 * L,)
    s["bn.num_batches_tracked"] = ()
    if any(c % groups for c in enc + dec):
        raise ConfigError(f"VAE channels {enc} / {dec} must be multiples of norm_num_groups={groups}")
    return s


def vae_tensors(vae) -> list[Tensor]:
    out = []
    for name, shape in sorted(vae_shapes(vae).items()):
        if name == "bn.num_batches_tracked":
            out.append(Tensor(name, shape, "I64", "zeros"))
        elif name == "bn.running_var":
            out.append(Tensor(name, shape, "BF16", "var"))
        elif name == "bn.running_mean" or (name.endswith(".bias") and len(shape) == 1):
            out.append(Tensor(name, shape, "BF16", "normal", std=0.1 if name.startswith("bn.") else 0.01))
        else:
            out.append(_dense(name, shape))
    return out


# ----------------------------------------------------------------------------- safetensors

def _header(tensors: list[Tensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads with spaces so tensor data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def safetensors_nbytes(tensors: list[Tensor], metadata: dict[str, str]) -> int:
    """Exact size of the file `write_safetensors` writes."""
    return len(_header(tensors, metadata)) + sum(t.nbytes for t in tensors)


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _draw(t: Tensor, rng: np.random.Generator, rows: int) -> np.ndarray:
    """Rows [rows, *shape[1:]] of `t` (the whole scalar for 0-d), as stored on disk."""
    shape = (rows,) + t.shape[1:] if t.shape else ()
    if t.kind == "zeros":
        return np.zeros(shape, {"I64": np.int64, "U32": np.uint32}[t.dtype])
    if t.kind == "bits":
        return np.frombuffer(rng.bytes(4 * math.prod(shape)), np.uint32).reshape(shape)
    if t.kind == "trits":
        # codes 0, 1, 2 (t = -1, 0, +1), never 3, as in the real ternary packs (the loader
        # rejects 3). (byte * 3) >> 8 maps a random byte to 0, 1, 2 with probabilities
        # 86, 85, 85 / 256: 5x faster than rng.integers, and uniform enough for a benchmark.
        b = np.frombuffer(rng.bytes(16 * math.prod(shape)), np.uint8)
        c = ((b.astype(np.uint16) * 3) >> 8).astype(np.uint8).reshape(-1, 4)
        packed = c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)  # 4 codes a byte, LSB first
        return packed.view("<u4").reshape(shape)  # little-endian bytes: code j at bits 2j..2j+1
    if t.kind == "normal":
        x = rng.standard_normal(shape, np.float32) * np.float32(t.std)
    elif t.kind == "norm":
        x = 1 + np.float32(0.1) * rng.standard_normal(shape, np.float32)
    elif t.kind == "var":
        x = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif t.kind == "scale":
        s = np.float32(t.std) * rng.uniform(0.75, 1.25, shape).astype(np.float32)
        # round s to bf16 first: 2s and -s are then exact in bf16 too
        x = (_bf16(s).astype(np.uint32) << 16).view(np.float32) * np.float32(t.mul)
    else:
        raise ValueError(f"unknown tensor kind {t.kind!r}")
    if t.dtype == "BF16":
        return _bf16(x)
    return x.astype({"F16": np.float16, "F32": np.float32}[t.dtype])


def write_safetensors(path: Path, tensors: list[Tensor], metadata: dict[str, str], seed: int = 0) -> int:
    """Stream `tensors` into `path` a chunk of rows at a time; returns the file size.
    Written to a temporary name and renamed at the end: a file that exists is complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(_header(tensors, metadata))
        for t in tensors:
            n_rows = t.shape[0] if t.shape else 1
            row_values = math.prod(t.shape[1:]) * (16 if t.kind == "trits" else 1)
            step = max(1, _CHUNK_VALUES // max(1, row_values))
            for i, r0 in enumerate(range(0, n_rows, step)):
                # one stream per (seed, key, chunk): chunks are reproducible on their own
                rng = np.random.default_rng([seed, zlib.crc32((t.key or t.name).encode()), i])
                f.write(memoryview(np.ascontiguousarray(_draw(t, rng, min(step, n_rows - r0)))).cast("B"))
    os.replace(tmp, path)
    return path.stat().st_size


# ----------------------------------------------------------------------------- tokenizer

# The Qwen3 template cut down to what klein uses (one user turn, generation prompt,
# thinking disabled); renders
# "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # added but not special in Qwen3


def _tokenizer():
    """Byte-level BPE with the 256 byte symbols and no merges: every prompt tokenizes
    (one token per byte), ids stay small, and nothing needs training or downloading."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok


def write_tokenizer(directory: Path) -> dict[str, int]:
    """tokenizer.json + tokenizer_config.json that transformers' AutoTokenizer loads as a
    fast Qwen2 tokenizer. Returns the ids of the special tokens and the vocabulary size."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "chat_template": CHAT_TEMPLATE,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": 131072, "padding_side": "right", "clean_up_tokenization_spaces": False,
        "split_special_tokens": False, "errors": "replace",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + THINK_TOKENS}
    return {**ids, "size": tok.get_vocab_size(with_added_tokens=True)}


# ----------------------------------------------------------------------------- the pack

_MLX_METADATA = {"format": "mlx"}  # what mx.save_safetensors / mlx-lm write
_PT_METADATA = {"format": "pt"}  # what diffusers' save_pretrained writes


def _files(fmt: str, transformer: TransformerConfig, text, vae):
    """(relative path, tensors, metadata) of every weight file of the pack."""
    if fmt not in PACK_BITS:
        raise ConfigError(f"fmt must be one of {sorted(PACK_BITS)}, got {fmt!r}")
    return [
        (f"{TRANSFORMER_DIR}/diffusion_pytorch_model.safetensors", transformer_tensors(transformer, fmt), _MLX_METADATA),
        (f"{TEXT_DIR}/model.safetensors", text_tensors(text), _MLX_METADATA),
        (f"{VAE_DIR}/diffusion_pytorch_model.safetensors", vae_tensors(vae), _PT_METADATA),
    ]


def _transformer_config(transformer) -> TransformerConfig:
    if isinstance(transformer, dict):
        return TransformerConfig.from_dict(transformer)
    return transformer


def pack_file_sizes(fmt: str = "binary", *, transformer=KLEIN_4B, text=QWEN3_4B, vae=FLUX2_VAE) -> dict[str, int]:
    """Exact bytes of each safetensors file `write_random_pack` would write, without
    writing (or drawing) anything."""
    return {rel: safetensors_nbytes(ts, meta) for rel, ts, meta in _files(fmt, _transformer_config(transformer), text, vae)}


def write_random_pack(root, fmt: str = "binary", *, transformer=KLEIN_4B, text=QWEN3_4B, vae=FLUX2_VAE,
                      seed: int = 0) -> Path:
    """Write a loadable Bonsai pack of random weights to `root` and return it.

    fmt: "binary" (MLX affine bits=1) or "ternary" (bits=2).
    transformer: a TransformerConfig (or its dict); every block linear's K must be a
    multiple of 128. text / vae: dicts whose keys override QWEN3_4B / FLUX2_VAE (a
    dataclass works for text). The same arguments and seed give the same bytes.
    Real shapes: about 0.97 GB (binary) or 1.43 GB (ternary) + 2.26 GB + 0.17 GB.
    """
    root = Path(root)
    transformer = _transformer_config(transformer)
    files = _files(fmt, transformer, text, vae)  # validates everything before writing
    root.mkdir(parents=True, exist_ok=True)

    tok = write_tokenizer(root / TOKENIZER_DIR)
    t = _text_sizes(text)
    if t["vocab_size"] < tok["size"]:
        raise ConfigError(f"text vocab_size {t['vocab_size']} is smaller than the tokenizer's {tok['size']} tokens")
    for d in (TRANSFORMER_DIR, TEXT_DIR, VAE_DIR):
        (root / d).mkdir(exist_ok=True)
    (root / TRANSFORMER_DIR / "config.json").write_text(json.dumps(transformer.to_dict(), indent=2))
    (root / TRANSFORMER_DIR / "quantization_config.json").write_text(json.dumps(
        {"bits": PACK_BITS[fmt], "group_size": GROUP_SIZE, "skip_patterns": SKIP_PATTERNS}, indent=2))
    (root / TEXT_DIR / "config.json").write_text(json.dumps(
        text_config(text, bos_token_id=tok["<|endoftext|>"], eos_token_id=tok["<|im_end|>"]), indent=4))
    (root / VAE_DIR / "config.json").write_text(json.dumps(vae_config(vae), indent=2))

    for rel, tensors, meta in files:
        write_safetensors(root / rel, tensors, meta, seed=seed)

    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "Flux2KleinPipeline",
        "is_distilled": True,
        # so nobody mistakes this for a model: the numbers are noise
        "bonsai_random_weights": {"format": fmt, "seed": seed},
    }, indent=2))
    return root


# A random LoRA's B ~ N(0, (LORA_B_STD^2) / rank), A ~ N(0, 1 / in): each layer's update
# is about LORA_B_STD of its output's scale, so activations stay finite.
LORA_B_STD = 0.1


def lora_tensors(transformer: TransformerConfig, rank: int) -> list[Tensor]:
    """A rank-`rank` LoRA on every block linear, in diffusers' keys
    (transformer.<module>.lora_A.weight [rank, in], .lora_B.weight [out, rank]), bf16."""
    shapes = transformer_shapes(transformer)
    out = []
    for name in block_linear_names(transformer.num_layers, transformer.num_single_layers):
        n, k = shapes[f"{name}.weight"]
        out += [Tensor(f"transformer.{name}.lora_A.weight", (rank, k), "BF16", "normal", std=k**-0.5),
                Tensor(f"transformer.{name}.lora_B.weight", (n, rank), "BF16", "normal", std=LORA_B_STD * rank**-0.5)]
    return out


def write_random_lora(path, rank: int = 16, *, transformer=KLEIN_4B, alpha: float | None = None,
                      seed: int = 0) -> Path:
    """Write a random LoRA file as diffusers saves one (`lora_tensors`, with PEFT's config in
    `lora_adapter_metadata`: r and lora_alpha, default alpha = rank: scale 1). About 3 MB
    per unit of rank at klein 4B's shapes."""
    if not (isinstance(rank, int) and rank >= 1):
        raise ConfigError(f"a LoRA's rank must be a positive integer, got {rank!r}")
    config = {"transformer.r": rank, "transformer.lora_alpha": rank if alpha is None else alpha}
    path = Path(path)
    write_safetensors(path, lora_tensors(_transformer_config(transformer), rank),
                      {"format": "pt", "lora_adapter_metadata": json.dumps(config)}, seed=seed)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write a Bonsai Image 4B pack of random weights at the real shapes.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--format", default="binary", choices=sorted(PACK_BITS))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    write_random_pack(a.out, a.format, seed=a.seed)
    for rel, n in pack_file_sizes(a.format).items():
        print(f"{n:>14,d}  {a.out / rel}")


if __name__ == "__main__":
    main()
