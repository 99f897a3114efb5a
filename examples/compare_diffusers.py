"""The reference's times on this device: diffusers' FLUX.2 klein 4B DiT step, its VAE decode
and transformers' Qwen3-4B prompt encoding, on random weights at the real shapes.

Run it in the same device call as `python -m bonsai_mlx benchmark generate` (or
examples/profile_speed.py) so that every ratio in docs/benchmarks.md compares two figures
from one machine and one run. Needs torch with CUDA, diffusers and transformers.

    python examples/compare_diffusers.py --json ref.json [--sizes 512 1024] [--parts dit vae qwen3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

# klein 4B, in diffusers' config names (bonsai_mlx.config.KLEIN_4B.to_dict())
KLEIN_4B = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
                axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False)
# Qwen3-4B, the layers klein reads (hidden states 9, 18, 27)
QWEN3_4B = dict(hidden_size=2560, num_hidden_layers=27, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=9728, vocab_size=151936, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=True, max_position_embeddings=40960)


def timed(fn, runs=10, warmup=3) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "runs": runs}


@torch.no_grad()
def dit(sizes, txt_len=512) -> dict:
    from diffusers import Flux2Transformer2DModel

    with torch.device("cuda"):
        model = Flux2Transformer2DModel(**KLEIN_4B).to(torch.bfloat16).eval()
    out = {}
    for size in sizes:
        h = w = size // 16
        x = torch.randn(1, h * w, 128, device="cuda", dtype=torch.bfloat16)
        txt = torch.randn(1, txt_len, 7680, device="cuda", dtype=torch.bfloat16)
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        z = torch.zeros(h * w, dtype=torch.long)
        img_ids = torch.stack([z, ii.reshape(-1), jj.reshape(-1), z], -1).cuda()
        t_ids = torch.zeros(txt_len, 4, dtype=torch.long)
        t_ids[:, 3] = torch.arange(txt_len)
        t = torch.full((1,), 0.75, device="cuda", dtype=torch.bfloat16)
        out[f"dit_step_{size}"] = timed(lambda: model(x, txt, t, img_ids, t_ids.cuda(), return_dict=False))
        print(size, out[f"dit_step_{size}"], flush=True)
    del model
    torch.cuda.empty_cache()
    return out


@torch.no_grad()
def vae(sizes) -> dict:
    from diffusers import AutoencoderKLFlux2

    with torch.device("cuda"):
        model = AutoencoderKLFlux2().to(torch.float16).eval()
    out = {}
    for size in sizes:
        z = torch.randn(1, 32, size // 8, size // 8, device="cuda", dtype=torch.float16)
        out[f"vae_decode_{size}"] = timed(lambda: model.decode(z, return_dict=False))
        print(size, out[f"vae_decode_{size}"], flush=True)
    del model
    torch.cuda.empty_cache()
    return out


@torch.no_grad()
def qwen3(txt_len=512) -> dict:
    from transformers import Qwen3Config, Qwen3Model

    with torch.device("cuda"):
        model = Qwen3Model(Qwen3Config(**QWEN3_4B)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 151936, (1, txt_len), device="cuda")
    mask = torch.ones_like(ids)
    r = timed(lambda: model(ids, attention_mask=mask, output_hidden_states=True))
    print("qwen3", r, flush=True)
    del model
    torch.cuda.empty_cache()
    return {f"qwen3_encode_{txt_len}": r}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    ap.add_argument("--parts", nargs="+", choices=("dit", "vae", "qwen3"), default=["dit", "vae", "qwen3"])
    ap.add_argument("--json")
    a = ap.parse_args()
    import diffusers
    import transformers
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__}
    parts = {"dit": lambda: dit(a.sizes), "vae": lambda: vae(a.sizes), "qwen3": qwen3}
    for name in a.parts:
        res.update(parts[name]())
        if a.json:
            json.dump(res, open(a.json, "w"), indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
