"""Random-weight packs: a tiny one must load and generate end to end through the same
loaders as PrismML's packs; the real-shape one is checked by size and layout only
(computed, never written), against the reference classes and PrismML's published sizes."""

from __future__ import annotations

import json
import math
import struct

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import bonsai_mlx
from bonsai_mlx import random_weights as rw
from bonsai_mlx.config import KLEIN_4B, TransformerConfig
from bonsai_mlx.packed_linear import PackedLinear
from bonsai_mlx.text_encoder import load_text_encoder
from bonsai_mlx.weight_names import block_linear_names

# Every block linear K (D = 128, F = 384, D + F = 512) is a multiple of 128.
TINY_TRANSFORMER = TransformerConfig(
    num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=64, axes_dims_rope=(16, 16, 16, 16),
    in_channels=16, joint_attention_dim=3 * 64, timestep_guidance_channels=64,
)
TINY_TEXT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=320)
TEXT_LAYERS = (1, 2, 3)
# 4 levels (x8) times the 2x2 patch = 16, the pipeline's factor; latents 4 -> 16 channels.
TINY_VAE = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4)
TINY = dict(transformer=TINY_TRANSFORMER, text=TINY_TEXT, vae=TINY_VAE)

MB = 1e6
HEADER_MAX = 1 << 18  # a safetensors header: ~110 bytes of JSON per tensor (904 in the text encoder)


def header_len(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


# ------------------------------------------------------ expected sizes, from the shapes alone

def transformer_data_bytes(cfg: TransformerConfig, bits: int) -> int:
    """Bytes of tensor data of an MLX affine pack of `cfg`, from our model's parameter shapes:
    packed block linears at bits/8 bytes a weight + bf16 scale and bias per 128; the rest bf16."""
    packed = set(block_linear_names(cfg.num_layers, cfg.num_single_layers))
    total = 0
    for name, p in tree_flatten(bonsai_mlx.Flux2Transformer(cfg).parameters()):  # lazy: nothing is computed
        if name.rpartition(".")[0] in packed:
            n, k = p.shape
            total += n * k * bits // 8 + 2 * 2 * n * k // 128
        else:
            total += 2 * p.size
    return total


def text_data_bytes(text: dict) -> int:
    """mlx-lm 4-bit (group 64) Qwen3: 0.5 byte a weight + bf16 scale and bias per 64 for the
    quantized layers, bf16 norms; counted on mlx-lm's own (lazy) model after nn.quantize."""
    from mlx_lm.models import qwen3

    cfg = {**rw.QWEN3_4B, **text, "model_type": "qwen3"}
    model = qwen3.Model(qwen3.ModelArgs.from_dict(cfg))
    nn.quantize(model, group_size=64, bits=4)
    total = 0
    for name, p in tree_flatten(model.parameters()):
        total += p.size * (4 if p.dtype == mx.uint32 else 2)  # float params are bf16 on disk
    return total


def vae_reference_shapes(vae: dict) -> dict:
    """diffusers' own AutoencoderKLFlux2 state dict shapes (meta device: no memory)."""
    import torch
    from diffusers import AutoencoderKLFlux2

    cfg = {k: v for k, v in rw.vae_config(vae).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = AutoencoderKLFlux2(**cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def vae_data_bytes(vae: dict) -> int:
    return sum(8 if k == "bn.num_batches_tracked" else 2 * math.prod(s) for k, s in vae_reference_shapes(vae).items())


# ------------------------------------------------------------------------ tiny packs, written

@pytest.fixture(scope="module", params=["binary", "ternary"])
def tiny_pack(request, tmp_path_factory):
    fmt = request.param
    return fmt, rw.write_random_pack(tmp_path_factory.mktemp(fmt), fmt, seed=1, **TINY)


def test_tiny_pack_generates(tiny_pack):
    fmt, root = tiny_pack
    pipe = bonsai_mlx.BonsaiPipeline.from_pretrained(root, text_layers=TEXT_LAYERS)
    assert pipe.is_distilled
    result = pipe.generate("a bonsai tree, studio light", width=64, height=64, steps=2, seed=0)
    assert result.image.size == (64, 64)
    assert result.array.shape == (64, 64, 3) and np.isfinite(result.array).all()
    assert result.array.std() > 0  # the weights did something

    packed = {name: m for name, m in pipe.transformer.named_modules() if isinstance(m, PackedLinear)}
    expected = block_linear_names(TINY_TRANSFORMER.num_layers, TINY_TRANSFORMER.num_single_layers)
    assert sorted(packed) == sorted(expected)
    assert {m.fmt for m in packed.values()} == {fmt}

    # loaded on its own: whether the pipeline keeps the encoder resident is its business
    enc = load_text_encoder(root, layers=TEXT_LAYERS)
    assert isinstance(enc.weights.embedding(), nn.QuantizedEmbedding)
    for block in map(enc.weights.layer, range(enc.config.num_layers_needed)):
        for lin in (block.self_attn.q_proj, block.self_attn.o_proj, block.mlp.down_proj):
            assert isinstance(lin, nn.QuantizedLinear) and (lin.bits, lin.group_size) == (4, 64)


def test_tiny_pack_files(tiny_pack):
    fmt, root = tiny_pack
    bits = rw.PACK_BITS[fmt]
    qc = json.loads((root / rw.TRANSFORMER_DIR / "quantization_config.json").read_text())
    assert qc["bits"] == bits and qc["group_size"] == 128 and qc["skip_patterns"]
    assert json.loads((root / "model_index.json").read_text())["is_distilled"] is True
    tcfg = json.loads((root / rw.TEXT_DIR / "config.json").read_text())
    assert tcfg["model_type"] == "qwen3" and tcfg["quantization"]["bits"] == 4 and tcfg["quantization"]["group_size"] == 64

    # sizes: header + exactly the bytes the shapes call for, and what pack_file_sizes predicts
    expected_data = {
        f"{rw.TRANSFORMER_DIR}/diffusion_pytorch_model.safetensors": transformer_data_bytes(TINY_TRANSFORMER, bits),
        f"{rw.TEXT_DIR}/model.safetensors": text_data_bytes(TINY_TEXT),
        f"{rw.VAE_DIR}/diffusion_pytorch_model.safetensors": vae_data_bytes(TINY_VAE),
    }
    predicted = rw.pack_file_sizes(fmt, **TINY)
    assert predicted.keys() == expected_data.keys()
    for rel, data in expected_data.items():
        size = (root / rel).stat().st_size
        assert size == predicted[rel], rel
        assert size - header_len(root / rel) == data, rel

    # the packed tensors are the official layout; codes are random (both values / all three used)
    w = mx.load(str(root / rw.TRANSFORMER_DIR / "diffusion_pytorch_model.safetensors"))
    p = "single_transformer_blocks.0.attn.to_qkv_mlp_proj"
    n, k = 3 * 128 + 2 * 384, 128
    assert w[f"{p}.weight"].dtype == mx.uint32 and w[f"{p}.weight"].shape == (n, k * bits // 32)
    assert w[f"{p}.scales"].dtype == mx.bfloat16 and w[f"{p}.scales"].shape == (n, 1)
    s = -w[f"{p}.biases"].astype(mx.float32)
    assert mx.all(w[f"{p}.scales"].astype(mx.float32) == (2 * s if bits == 1 else s)).item()
    words = np.array(w[f"{p}.weight"])
    codes = (words[..., None] >> (bits * np.arange(32 // bits, dtype=np.uint32))) & (2**bits - 1)
    counts = np.bincount(codes.ravel(), minlength=4)
    assert (counts[: 2 if bits == 1 else 3] > 0.3 * codes.size / (2 if bits == 1 else 3)).all()
    assert bits == 1 or counts[3] == 0
    assert 0.005 < float(s.mean()) < 0.2  # s ~ 1/sqrt(K) = 0.088 here; 0.018 at K = 3072
    assert w["x_embedder.weight"].dtype == mx.bfloat16


def test_tokenizer_renders_qwen3_template(tiny_pack):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_pack[1] / rw.TOKENIZER_DIR))
    text = tok.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    enc = tok([text], padding="max_length", truncation=True, max_length=512)
    ids = enc["input_ids"][0]
    assert len(ids) == 512 and max(ids) < TINY_TEXT["vocab_size"]
    assert tok.pad_token == "<|endoftext|>" and ids[-1] == tok.pad_token_id
    assert tok.decode(ids, skip_special_tokens=False).startswith(text)


def test_same_seed_same_bytes(tmp_path):
    tiny = dict(TINY, text=dict(TINY_TEXT, num_hidden_layers=1))
    a = rw.write_random_pack(tmp_path / "a", "ternary", seed=3, **tiny)
    b = rw.write_random_pack(tmp_path / "b", "ternary", seed=3, **tiny)
    for rel in rw.pack_file_sizes("ternary", **tiny):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_rejects_unpackable_shapes(tmp_path):
    bad = TransformerConfig(num_layers=1, num_single_layers=0, num_attention_heads=1, attention_head_dim=64,
                            axes_dims_rope=(16, 16, 16, 16))  # D = 64: not a multiple of 128
    with pytest.raises(bonsai_mlx.ConfigError, match="multiple of 128"):
        rw.write_random_pack(tmp_path, "binary", transformer=bad, text=TINY_TEXT, vae=TINY_VAE)
    with pytest.raises(bonsai_mlx.ConfigError):
        rw.write_random_pack(tmp_path, "int4", **TINY)
    assert not any(tmp_path.iterdir())  # nothing written before the checks


# ------------------------------------------------------------- real shapes, computed only

def test_real_shapes_match_the_reference_classes():
    import torch
    from diffusers import Flux2Transformer2DModel

    cfg = {k: v for k, v in KLEIN_4B.to_dict().items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = Flux2Transformer2DModel(**cfg)
    assert rw.transformer_shapes(KLEIN_4B) == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert rw.vae_shapes(rw.FLUX2_VAE) == vae_reference_shapes({})
    assert rw.vae_shapes(TINY_VAE) == vae_reference_shapes(TINY_VAE)


# PrismML's published on-disk sizes (MB = 1e6 bytes): transformer packs 965.2 / 1425.2 MB,
# text encoder ~2.28 GB; whole payload 3.42 / 3.88 GB (with a FLUX.2 VAE).
PUBLISHED = {"binary": 965.2 * MB, "ternary": 1425.2 * MB, "text": 2280 * MB,
             "total_binary": 3420 * MB, "total_ternary": 3880 * MB}


def test_real_pack_sizes():
    sizes = {fmt: rw.pack_file_sizes(fmt) for fmt in ("binary", "ternary")}
    tr = f"{rw.TRANSFORMER_DIR}/diffusion_pytorch_model.safetensors"
    te = f"{rw.TEXT_DIR}/model.safetensors"
    va = f"{rw.VAE_DIR}/diffusion_pytorch_model.safetensors"
    for fmt, bits in rw.PACK_BITS.items():
        header = sizes[fmt][tr] - transformer_data_bytes(KLEIN_4B, bits)
        assert 0 < header < HEADER_MAX  # all the rest is tensor data, exactly as the shapes say
        assert sizes[fmt][tr] == pytest.approx(PUBLISHED[fmt], rel=0.03)
        assert sum(sizes[fmt].values()) == pytest.approx(PUBLISHED[f"total_{fmt}"], rel=0.03)
    assert 0 < sizes["binary"][te] - text_data_bytes({}) < HEADER_MAX
    assert sizes["binary"][te] == pytest.approx(PUBLISHED["text"], rel=0.03)
    assert 0 < sizes["binary"][va] - vae_data_bytes({}) < HEADER_MAX
    # measured when written: binary 965,208,192 / ternary 1,425,271,416 / text 2,263,022,760 /
    # VAE 168,120,878 bytes
    assert (sizes["binary"][tr], sizes["ternary"][tr], sizes["binary"][te], sizes["binary"][va]) == (
        965_208_192, 1_425_271_416, 2_263_022_760, 168_120_878)


def test_random_lora_in_diffusers_keys_loads_on_every_block_linear(tmp_path):
    from bonsai_mlx.lora import check_lora, read_lora

    path = rw.write_random_lora(tmp_path / "r8.safetensors", 8, transformer=TINY_TRANSFORMER, alpha=4, seed=3)
    updates = read_lora(path)  # diffusers' keys, PEFT's config in the metadata: scale alpha / r
    check_lora(updates, TINY_TRANSFORMER, str(path))
    names = block_linear_names(TINY_TRANSFORMER.num_layers, TINY_TRANSFORMER.num_single_layers)
    assert sorted(updates) == sorted(names)
    assert all(u.a.shape[0] == 8 and u.b.shape[1] == 8 and u.scale == 0.5 for u in updates.values())
    assert path.stat().st_size == rw.safetensors_nbytes(rw.lora_tensors(TINY_TRANSFORMER, 8), {
        "format": "pt", "lora_adapter_metadata": json.dumps({"transformer.r": 8, "transformer.lora_alpha": 4})})
    # klein 4B: r (in + out) bf16 values on each of its 100 block linears, ~3 MB per unit of rank
    assert 3.0e6 < rw.safetensors_nbytes(rw.lora_tensors(KLEIN_4B, 1), {}) < 3.1e6
