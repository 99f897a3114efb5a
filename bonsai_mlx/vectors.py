"""Test vectors for a port of the bundle (`export --test-vectors`): small inputs and the
outputs our reference path computes from them, in float32 unless said, so a Swift port can
check each piece on its own. `vectors/vectors.json` lists them; each is one safetensors file.

  packed_linear_binary, packed_linear_ternary   y = x @ W.T for a random packed W [64, 256]
  double_block, single_block                    block 0 of the bundle's transformer
  sampler_step                                  the schedule for 4 steps at 64 tokens, one Euler step
  vae_tile                                      2x2 tokens -> a 32x32 image through the bundle's VAE
  prompt_tokens                                 one prompt's token ids and mask (int32)
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .execution import ONE_GRAPH
from .packed_linear import packed_matmul_reference
from .packing import pack_binary, pack_ternary
from .scheduler import euler_step, flux2_sigmas
from .transformer import rope_rotation

PROMPT = "a bonsai tree on a wooden desk, morning light"
F32 = mx.float32


def _float32(module) -> None:
    """Cast a module's floating parameters to float32, packed codes and their fp16 scales aside."""
    names = {k for k, _ in tree_flatten(module.parameters())}
    scales = {k for k in names if k.endswith(".scales") or k == "scales"}
    flat = [(k, v.astype(F32) if mx.issubdtype(v.dtype, mx.floating) and k not in scales else v)
            for k, v in tree_flatten(module.parameters())]
    module.update(tree_unflatten(flat))


def write_vectors(directory: Path, transformer, pipe, fmt: str, seed: int = 0) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    index = {}

    def save(name, what, arrays, **extra):
        mx.save_safetensors(str(directory / f"{name}.safetensors"), arrays)
        index[name] = {"file": f"vectors/{name}.safetensors", "what": what, **extra}

    for f in ("binary", "ternary"):
        s = (rng.uniform(0.5, 1.5, (64, 2)) / 16).astype(np.float16)
        pw = (pack_binary(rng.choice([-1, 1], (64, 256)), s) if f == "binary"
              else pack_ternary(rng.integers(-1, 2, (64, 256)), s))
        x = mx.array(rng.standard_normal((3, 256)).astype(np.float32))
        save(f"packed_linear_{f}", "y = x @ W.T, W packed as `packing` (docs/export-format.md)",
             {"x": x, "weight": pw.data, "scales": pw.scales, "y": packed_matmul_reference(x, pw)}, packing=f)

    cfg = transformer.config
    D, L_img, L_txt = cfg.inner_dim, 8, 4
    ids = mx.concatenate([mx.array([[0, 0, 0, i] for i in range(L_txt)], dtype=mx.int32),
                          mx.array([[0, i // 4, i % 4, 0] for i in range(L_img)], dtype=mx.int32)])
    rope = rope_rotation(ids, cfg.axes_dims_rope, cfg.rope_theta)
    normal = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    double, single = transformer.transformer_blocks[0], transformer.single_transformer_blocks[0]
    _float32(double)
    _float32(single)
    img, txt, mod_img, mod_txt = normal(1, L_img, D), normal(1, L_txt, D), normal(1, 6 * D) * 0.1, normal(1, 6 * D) * 0.1
    split = lambda m: mx.split(m[:, None], m.shape[-1] // D, axis=-1)  # noqa: E731
    out_img, out_txt = double(img, txt, split(mod_img), split(mod_txt), rope, ONE_GRAPH)
    save("double_block", "transformer_blocks.0(img, txt, temb_mod_img, temb_mod_txt, ids)",
         {"img": img, "txt": txt, "temb_mod_img": mod_img, "temb_mod_txt": mod_txt, "ids": ids,
          "out_img": out_img, "out_txt": out_txt}, packing=fmt, weights="transformer/model.safetensors")
    x, mod = normal(1, L_txt + L_img, D), normal(1, 3 * D) * 0.1
    save("single_block", "single_transformer_blocks.0(x = [txt | img], temb_mod, ids)",
         {"x": x, "temb_mod": mod, "ids": ids, "out": single(x, split(mod), rope, ONE_GRAPH)}, packing=fmt,
         weights="transformer/model.safetensors")

    sigmas = flux2_sigmas(4, 64)
    xs, v = normal(1, 64, cfg.in_channels), normal(1, 64, cfg.in_channels)
    save("sampler_step", "sigmas(steps=4, image tokens=64); x_next = x + (sigmas[1] - sigmas[0]) * v",
         {"sigmas": mx.array(sigmas, dtype=F32), "x": xs, "v": v, "x_next": euler_step(xs, v, sigmas[0], sigmas[1])})

    vae = pipe.vae
    vae32 = type(vae)(vae.config, has_encoder=vae.encoder_resident)
    vae32.update(tree_map(lambda p: p.astype(F32), vae.parameters()))
    tokens = normal(1, 4, vae.config.patched_channels)
    size = 4 * vae.decoder_factor
    save("vae_tile", f"decode_tokens: 2x2 tokens -> a {size}x{size} image in [0, 1] (float32 copy of the VAE)",
         {"tokens": tokens, "image": vae32.decode_tokens(tokens, size, size)})

    te = pipe.text_encoder
    tok_ids, mask = te.tokenize([PROMPT], max_length=pipe.max_sequence_length)
    save("prompt_tokens", "chat template + tokenizer, right-padded", {"ids": tok_ids, "mask": mask.astype(mx.int32)},
         prompt=PROMPT, max_length=pipe.max_sequence_length)
    (directory / "vectors.json").write_text(json.dumps(index, indent=1))
