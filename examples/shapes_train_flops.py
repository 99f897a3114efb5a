"""Count the training FLOPs per sample of the shapes demo's full size with torch's
FlopCounterMode (on the CPU, batch 1), the figures behind docs/quality.md's GPU-time estimate.

    python examples/shapes_train_flops.py
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from bonsai_mlx.shapes.configs import MAX_SEQUENCE_LENGTH, SIZES
from bonsai_mlx.shapes.models import build_transformer, build_vae, position_ids


def gflop(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e9


def main() -> None:
    cfg = SIZES["full"]
    t, vae = build_transformer(cfg["transformer"], 0), build_vae(cfg["vae"], 0)
    tokens, c = 64, cfg["transformer"]["in_channels"]
    x, text = torch.randn(1, tokens, c), torch.randn(1, MAX_SEQUENCE_LENGTH, cfg["transformer"]["joint_attention_dim"])
    img_ids, txt_ids = position_ids(1, 8, MAX_SEQUENCE_LENGTH, "cpu")

    def dit():
        v = t(hidden_states=x, encoder_hidden_states=text, timestep=torch.rand(1), img_ids=img_ids, txt_ids=txt_ids,
              guidance=None, return_dict=False)[0]
        v.pow(2).mean().backward()

    image = torch.randn(1, 3, 128, 128)

    def vae_step():
        vae.decode(vae.encode(image).latent_dist.mean).sample.pow(2).mean().backward()

    def encode():
        with torch.no_grad():
            vae.encode(image)

    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"DiT {params(t):.1f}M parameters: forward + backward {gflop(dit):.1f} GFLOP per sample")
    print(f"VAE {params(vae):.1f}M parameters: forward + backward {gflop(vae_step):.1f} GFLOP per sample, "
          f"encode {gflop(encode):.1f} GFLOP")


if __name__ == "__main__":
    main()
