"""Model sizes of the demo: keyword arguments of transformers' Qwen3Config, diffusers'
Flux2Transformer2DModel and AutoencoderKLFlux2, plus the training defaults of each stage.

Both sizes keep klein's interfaces: a Qwen3 with 28 layers tapped at (9, 18, 27), so the
pipeline's defaults apply; a DiT whose block linears have K a multiple of 128, so they pack;
and in_channels = 4 x the VAE's latent channels (2x2 patches).
"""

from __future__ import annotations

from ..errors import BonsaiError

TEXT_LAYERS = (9, 18, 27)
MAX_SEQUENCE_LENGTH = 32  # prompt tokens (the longest prompt has 22); the exported model says so in bonsai.json
IMAGE_SIZE_DEFAULT = 128

SIZES = {
    # For the GPU: 1.4M (frozen) text encoder, 9.8M DiT (8.5M in block linears) and 3.2M VAE
    # parameters. Sized so that the shipped demo (a packed DiT, text encoder and VAE in
    # float16) stays well under 20 MB.
    "full": {
        "text_encoder": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=28, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16),
        "transformer": dict(in_channels=64, num_layers=2, num_single_layers=6, attention_head_dim=64,
                            num_attention_heads=4, joint_attention_dim=3 * 64, timestep_guidance_channels=256,
                            mlp_ratio=3.0, axes_dims_rope=(16, 16, 16, 16), rope_theta=2000,
                            guidance_embeds=False),
        "vae": dict(block_out_channels=(32, 64, 96, 96), layers_per_block=2, latent_channels=16,
                    norm_num_groups=32),
        # Large batches cost little more per step than small ones at this size; the steps fit
        # about ten minutes of GPU time (docs/quality.md has the measured speeds).
        "train": {"vae": dict(steps=3000, batch=32, lr=3e-4), "dit": dict(steps=4000, batch=256, lr=5e-4),
                  "qat": dict(steps=1000, batch=256, lr=1e-4)},
    },
    # For tests on a CPU: the same topology, tiny widths.
    "tiny": {
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=28, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16),
        "transformer": dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
                            num_attention_heads=2, joint_attention_dim=3 * 32, timestep_guidance_channels=32,
                            mlp_ratio=2.0, axes_dims_rope=(16, 16, 16, 16), rope_theta=2000,
                            guidance_embeds=False),
        "vae": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4),
        "train": {"vae": dict(steps=4, batch=2, lr=1e-3), "dit": dict(steps=4, batch=2, lr=1e-3),
                  "qat": dict(steps=4, batch=2, lr=1e-3)},
    },
}


def size(name: str) -> dict:
    if name not in SIZES:
        raise BonsaiError(f"model size must be one of {sorted(SIZES)}, got {name!r}")
    return SIZES[name]
