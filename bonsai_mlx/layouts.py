"""Where each on-disk layout keeps each component: every folder name is declared here once.

  official pack   PrismML's MLX packs: transformer-packed-mflux/ (MLX affine bits 1 or 2),
                  text_encoder-mlx-4bit/ (mlx-lm 4-bit), tokenizer/; no VAE
  our pack        what `convert` writes: the official pack's folders, the transformer in our
                  packed formats, the source's text encoder, tokenizer and VAE copied
  diffusers       a diffusers Flux2KleinPipeline: model_index.json, transformer/, text_encoder/,
                  tokenizer/, vae/
  bundle          what `export` writes for apps (docs/export-format.md): transformer/,
                  text_encoder/ (one file per layer), tokenizer/, vae/ (MLX layout), kernels/
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    name: str
    transformer: str
    text_encoder: str
    tokenizer: str
    vae: str | None


OFFICIAL_PACK = Layout("official pack", "transformer-packed-mflux", "text_encoder-mlx-4bit", "tokenizer", None)
OUR_PACK = Layout("our pack", "transformer-packed-mflux", "text_encoder-mlx-4bit", "tokenizer", "vae")
DIFFUSERS = Layout("diffusers", "transformer", "text_encoder", "tokenizer", "vae")
BUNDLE = Layout("bundle", "transformer", "text_encoder", "tokenizer", "vae")
LAYOUTS = (OFFICIAL_PACK, OUR_PACK, DIFFUSERS, BUNDLE)

MODEL_INDEX = "model_index.json"
# Optional, at a model's root: the size it was trained at and its prompt length in tokens
# ({"width", "height", "max_sequence_length"}), the defaults when a caller gives none.
MODEL_DEFAULTS = "bonsai.json"
# The package's demo keeps its ternary transformer beside the binary one, sharing the rest.
DEMO_TERNARY_TRANSFORMER = "transformer-ternary"
BUNDLE_KERNELS = "kernels"
BUNDLE_VECTORS = "vectors"


def _names(part: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(getattr(layout, part) for layout in LAYOUTS if getattr(layout, part)))


# Folders tried, in this order, when a directory holds a whole pipeline.
TRANSFORMER_SUBDIRS = _names("transformer")
ENCODER_SUBDIRS = _names("text_encoder")
TOKENIZER_SUBDIRS = _names("tokenizer")
VAE_SUBDIRS = _names("vae")
# What `convert` copies from its source besides the transformer (whichever of them exist).
PACK_COPIED = (*ENCODER_SUBDIRS, *TOKENIZER_SUBDIRS, *VAE_SUBDIRS, MODEL_INDEX, MODEL_DEFAULTS)
