"""Model sizes of the demo: keyword arguments of transformers' Qwen3Config, diffusers'
Flux2Transformer2DModel and AutoencoderKLFlux2, plus the training defaults of each stage.

Both sizes keep klein's interfaces: a Qwen3 with 28 layers tapped at (9, 18, 27), so the
pipeline's defaults apply; a DiT whose block linears have K a multiple of 128, so they pack;
and in_channels = 4 x the VAE's latent channels (2x2 patches).
"""

from __future__ import annotations

from ..errors import BonsaiError

TEXT_LAYERS = (9, 18, 27)
MAX_SEQUENCE_LENGTH = 512  # the pipeline pads every prompt to this

SIZES = {
    # For the GPU: 5.6M (frozen) text encoder, 22.1M DiT and 5.3M VAE parameters.
    "full": {
        "text_encoder": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=28, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=32),
        "transformer": dict(in_channels=64, num_layers=2, num_single_layers=6, attention_head_dim=64,
                            num_attention_heads=6, joint_attention_dim=3 * 128, timestep_guidance_channels=256,
                            mlp_ratio=3.0, axes_dims_rope=(16, 16, 16, 16), rope_theta=2000,
                            guidance_embeds=False),
        "vae": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, latent_channels=16,
                    norm_num_groups=32),
        # Sized for one GPU session (docs/quality.md estimates the time): counted with torch's
        # FlopCounterMode, a training sample costs 41.9 GFLOP in the VAE stage and 57.6 in the
        # DiT and QAT stages (53.3 DiT forward + backward at 64 image + 512 text tokens, 4.3 VAE encode).
        "train": {"vae": dict(steps=3000, batch=32, lr=2e-4), "dit": dict(steps=16000, batch=64, lr=3e-4),
                  "qat": dict(steps=3000, batch=64, lr=1e-4)},
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
