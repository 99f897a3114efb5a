"""The demo model's parts as diffusers' and transformers' own classes (PyTorch), and the
conversions between the task's images, klein's latent tokens and prompt embeddings.

A run folder holds the parts under the names a diffusers klein pipeline uses:
tokenizer/, text_encoder/ (Qwen3ForCausalLM), vae/ (AutoencoderKLFlux2),
transformer/ (the full-precision DiT) and transformer-binary/, transformer-ternary/
(the QAT DiTs, weights already quantized).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import BonsaiError
from ..layouts import MODEL_DEFAULTS
from .configs import MAX_SEQUENCE_LENGTH, TEXT_LAYERS
from .scenes import IMAGE_SIZE
from .tokenizer import build_tokenizer, vocab_size

VAE_BLOCKS = 4  # klein's VAE depth: 8x down, then 2x2 patches -> one token per 16x16 pixels


def build_text_encoder(cfg: dict, tokenizer_dir: Path, seed: int):
    """A Qwen3ForCausalLM with transformers' own initialisation from `seed`; its lm_head is
    tied to the embeddings, so the checkpoint holds only what klein's encoder reads."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size(tokenizer_dir), tie_word_embeddings=True, rope_theta=1_000_000.0,
                         max_position_embeddings=4096, rms_norm_eps=1e-6, attention_bias=False, **cfg)
    return Qwen3ForCausalLM(config).float().eval()


def build_vae(cfg: dict, seed: int):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    return AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * VAE_BLOCKS,
                              up_block_types=("UpDecoderBlock2D",) * VAE_BLOCKS, **cfg).float()


def build_transformer(cfg: dict, seed: int):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(**cfg).float()


def save_part(module, path: Path) -> None:
    """Save a part in float16, the precision the exported pipeline ships in, so later stages
    train against exactly the weights users get (the QAT weights are exact in float16)."""
    import copy

    copy.deepcopy(module).to("cpu", torch.float16).save_pretrained(path, safe_serialization=True)


def prepare_text_side(run: Path, cfg: dict, seed: int) -> None:
    """Write tokenizer/ and text_encoder/ into the run folder once."""
    if not (run / "tokenizer" / "tokenizer.json").exists():
        build_tokenizer(run / "tokenizer")
    if not (run / "text_encoder" / "config.json").exists():
        save_part(build_text_encoder(cfg, run / "tokenizer", seed), run / "text_encoder")


def load_part(run: Path, part: str, device: str):
    """A saved part of the run, float32, on `device`, in eval mode."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    path = run / part
    if not path.is_dir():
        raise BonsaiError(f"{path} does not exist: run the stage that writes it first (see --help)")
    if part == "tokenizer":
        return AutoTokenizer.from_pretrained(path)
    cls = {"text_encoder": Qwen3ForCausalLM, "vae": AutoencoderKLFlux2}.get(part, Flux2Transformer2DModel)
    return cls.from_pretrained(path, torch_dtype=torch.float32).to(device).eval()


class PromptEmbeddings:
    """klein's prompt embeddings from the frozen encoder, computed by diffusers' own
    Flux2KleinPipeline._get_qwen3_prompt_embeds and kept per prompt (the task has a few
    hundred prompts)."""

    def __init__(self, text_encoder, tokenizer, device: str, max_length: int = MAX_SEQUENCE_LENGTH):
        self.text_encoder, self.tokenizer, self.device, self.max_length = text_encoder, tokenizer, device, max_length
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline

        new = sorted({p for p in prompts if p not in self.cache})
        if new:
            emb = Flux2KleinPipeline._get_qwen3_prompt_embeds(
                self.text_encoder, self.tokenizer, new, dtype=torch.float32, device=self.device,
                max_sequence_length=self.max_length, hidden_states_layers=TEXT_LAYERS)
            self.cache.update(zip(new, emb))
        return torch.stack([self.cache[p] for p in prompts])


def images_to_tensor(images: np.ndarray, device: str) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2], channel order (c, dy, dx) as klein's pipeline."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def bn_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


@torch.no_grad()
def latent_tokens(vae, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] -> the transformer's clean tokens [B, H/16 * W/16, 4C]: the
    posterior mode, 2x2 patches, normalised by the VAE's batch-norm statistics, packed
    row-major; the inverse of what the pipeline decodes."""
    z = patchify(vae.encode(images).latent_dist.mode())
    mean, std = bn_stats(vae)
    z = (z - mean) / std
    b, c, h, w = z.shape
    return z.reshape(b, c, h * w).permute(0, 2, 1)


def position_ids(batch: int, grid: int, text_length: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """klein's (t, h, w, l) ids: image tokens (0, i, j, 0) row-major, text tokens (0, 0, 0, k)."""
    i, j = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    z = torch.zeros(grid * grid, dtype=torch.long)
    img = torch.stack([z, i.reshape(-1), j.reshape(-1), z], dim=-1)
    zt = torch.zeros(text_length, dtype=torch.long)
    txt = torch.stack([zt, zt, zt, torch.arange(text_length)], dim=-1)
    return img.expand(batch, -1, -1).to(device), txt.expand(batch, -1, -1).to(device)


def export_pipeline(run: Path, out: Path, transformer_part: str, dtype: torch.dtype = torch.float16) -> Path:
    """A diffusers Flux2KleinPipeline (base model: 50 steps, guidance) from the run's parts."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    if out.exists():
        raise BonsaiError(f"{out} exists; choose a new folder")
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
        vae=load_part(run, "vae", "cpu").to(dtype), text_encoder=load_part(run, "text_encoder", "cpu").to(dtype),
        tokenizer=load_part(run, "tokenizer", "cpu"), transformer=load_part(run, transformer_part, "cpu").to(dtype),
        is_distilled=False)
    tmp = out.with_name(out.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    run_meta = json.loads((run / "run.json").read_text())
    (tmp / MODEL_DEFAULTS).write_text(json.dumps(
        {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "max_sequence_length": run_meta.get("max_length", 512)}, indent=2))
    tmp.rename(out)
    return out
