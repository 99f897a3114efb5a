"""Text to image: prompt -> Qwen3 embeddings -> flow-matching denoise -> VAE decode.

Matches diffusers' `Flux2KleinPipeline` given the same initial noise. The stages run one
after another (`stream` yields between denoising steps), so a caller can show progress
and previews, and cancel between steps.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np
from PIL import Image, PngImagePlugin

from .errors import BonsaiError, WeightsError
from .loading import load_transformer
from .scheduler import flux2_sigmas
from .text_encoder import load_text_encoder
from .vae import load_vae

# Known names for `from_pretrained`; anything with a "/" is taken as a Hugging Face repo id.
MODELS = {
    "bonsai-binary": "prism-ml/bonsai-image-binary-4B-mlx-1bit",
    "bonsai-ternary": "prism-ml/bonsai-image-ternary-4B-mlx-2bit",
}
# PrismML's packs ship no VAE; they decode with BFL's small decoder.
DEFAULT_VAE_REPO = "black-forest-labs/FLUX.2-small-decoder"
# What a pipeline reads; repos also hold root-level single-file checkpoints we never need.
_PIPELINE_FILES = ["model_index.json"] + [
    f"{d}/*" for d in ("transformer-packed-mflux", "transformer", "text_encoder-mlx-4bit", "text_encoder",
                       "tokenizer", "vae")]
_VAE_FILES = ["*.json", "*.safetensors", "vae/*"]

MIN_SIZE, MAX_SIZE = 64, 2048  # pixels per side; the multiple-of-16 rule is the VAE's x the 2x2 patch
MAX_STEPS = 1000


@dataclass
class StepEvent:
    step: int  # 1-based
    steps: int
    sigma: float  # noise level the step started from
    sigma_next: float
    elapsed: float  # seconds since generation started
    preview: Image.Image | None = None


@dataclass
class GenerationResult:
    image: Image.Image
    prompt: str
    negative_prompt: str | None
    seed: int | None
    steps: int
    guidance: float
    width: int
    height: int
    model: str
    timings: dict = field(default_factory=dict)
    array: np.ndarray | None = None  # float32 [H, W, 3] in [0, 1], before 8-bit rounding

    def metadata(self) -> dict:
        return {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
            "steps": self.steps, "guidance": self.guidance, "width": self.width, "height": self.height,
            "model": self.model, "timings": self.timings, "software": "bonsai-mlx",
        }

    def save(self, path: str | Path) -> Path:
        """Write a PNG with the settings in its text chunks, atomically: the image appears
        complete or not at all, never half-written."""
        path = Path(path)
        info = PngImagePlugin.PngInfo()
        for k, v in self.metadata().items():
            info.add_text(k, v if isinstance(v, str) else json.dumps(v))
        info.add_text("parameters", json.dumps(self.metadata()))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            self.image.save(tmp, format="PNG", pnginfo=info)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


class Cancelled(BonsaiError):
    """Raised by `generate` when its `cancel` callback asked to stop."""


def check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise BonsaiError(f"{name} must be an integer number of pixels, got {v!r}")
        if v % 16:
            lo, hi = v // 16 * 16, v // 16 * 16 + 16
            raise BonsaiError(f"{name}={v} is not a multiple of 16 (the VAE and 2x2 patching need it); try {lo} or {hi}")
        if not MIN_SIZE <= v <= MAX_SIZE:
            raise BonsaiError(f"{name}={v} is outside the supported range {MIN_SIZE}..{MAX_SIZE} pixels")


def image_ids(h: int, w: int) -> mx.array:
    """(t, h, w, l) = (0, i, j, 0) for the latent grid, row-major."""
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    z = np.zeros(h * w, np.int32)
    return mx.array(np.stack([z, i.reshape(-1), j.reshape(-1), z], axis=-1).astype(np.int32))


def text_ids(length: int) -> mx.array:
    z = np.zeros(length, np.int32)
    return mx.array(np.stack([z, z, z, np.arange(length, dtype=np.int32)], axis=-1))


def to_pil(images: mx.array) -> list[Image.Image]:
    """[B, H, W, 3] floats in [0, 1] -> 8-bit images, rounded as diffusers does."""
    a = np.array(images.astype(mx.float32))
    return [Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8)) for x in a]


class BonsaiPipeline:
    def __init__(self, transformer, text_encoder, vae, *, is_distilled: bool = True, model: str = "local",
                 max_sequence_length: int = 512):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.vae = vae
        self.is_distilled = is_distilled
        self.model = model
        self.max_sequence_length = max_sequence_length

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, *, dtype=mx.float16, vae=None,
                        quantize: str | None = None, backend: str = "auto", text_layers=(9, 18, 27),
                        revision: str | None = None, cache_dir: str | None = None) -> "BonsaiPipeline":
        """Load a pipeline from a local directory or a Hugging Face repo id.

        Accepted layouts: PrismML's MLX packs (`transformer-packed-mflux/`,
        `text_encoder-mlx-4bit/`, `tokenizer/`; no VAE inside, so `vae` or the small
        decoder from the Hub is used) and diffusers FLUX.2 klein pipelines
        (`model_index.json`, `transformer/`, `text_encoder/`, `tokenizer/`, `vae/`).
        `quantize` packs a dense transformer's block linears on load.
        """
        root = resolve_model(path_or_repo_id, revision=revision, cache_dir=cache_dir)
        is_distilled = True
        index = root / "model_index.json"
        if index.exists():
            try:
                is_distilled = bool(json.loads(index.read_text()).get("is_distilled", False))
            except json.JSONDecodeError as e:
                raise WeightsError(f"{index} is not valid JSON ({e})") from None
        missing = [s for s in ("transformer", "text encoder", "tokenizer") if not _has_part(root, s)]
        if missing:
            raise WeightsError(
                f"{root} is not a FLUX.2 klein pipeline or Bonsai pack: no {', '.join(missing)} found. Expected "
                "transformer-packed-mflux/ or transformer/, text_encoder-mlx-4bit/ or text_encoder/, and tokenizer/."
            )
        transformer = load_transformer(root, dtype=dtype, quantize=quantize, backend=backend)
        text_encoder = load_text_encoder(root, dtype=dtype, layers=text_layers)
        if vae is None:
            vae = root / "vae" if (root / "vae" / "config.json").exists() else resolve_model(
                DEFAULT_VAE_REPO, cache_dir=cache_dir, files=_VAE_FILES,
                what="the VAE (PrismML packs decode with BFL's small decoder; or pass vae=)")
        vae_model = load_vae(vae, dtype=dtype) if isinstance(vae, (str, os.PathLike)) else vae
        return cls(transformer, text_encoder, vae_model, is_distilled=is_distilled, model=str(path_or_repo_id))

    # ---------------------------------------------------------------- running
    def defaults(self, steps, guidance) -> tuple[int, float]:
        steps = (4 if self.is_distilled else 50) if steps is None else steps
        guidance = (1.0 if self.is_distilled else 4.0) if guidance is None else float(guidance)
        if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
            raise BonsaiError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
        if guidance < 0 or not np.isfinite(guidance):
            raise BonsaiError(f"guidance must be a finite number >= 0, got {guidance}")
        return int(steps), guidance

    def initial_noise(self, seed: int | None, latents, width: int, height: int) -> tuple[mx.array, int | None]:
        """[1, L, C] tokens of N(0, 1) noise, drawn as [1, C, H/16, W/16] and packed row-major
        (the reference's layout), from `seed` or from caller-supplied `latents`."""
        C = self.transformer.config.in_channels
        h, w = height // 16, width // 16
        if latents is not None:
            lat = mx.array(latents).astype(mx.float32)
            if lat.shape == (1, C, h, w) or lat.shape == (C, h, w):
                return lat.reshape(1, C, h * w).transpose(0, 2, 1), seed
            if lat.shape == (1, h * w, C) or lat.shape == (h * w, C):
                return lat.reshape(1, h * w, C), seed
            raise BonsaiError(
                f"latents for a {width}x{height} image must be [1, {C}, {h}, {w}] or [1, {h * w}, {C}], "
                f"got {list(lat.shape)}"
            )
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        noise = mx.random.normal((1, C, h, w), key=mx.random.key(seed))
        return noise.reshape(1, C, h * w).transpose(0, 2, 1), seed

    def stream(self, prompt: str, width: int = 512, height: int = 512, steps: int | None = None,
               seed: int | None = None, guidance: float | None = None, negative_prompt: str | None = None,
               latents=None, preview: bool = False, preview_every: int = 1) -> Iterator[StepEvent | GenerationResult]:
        """Yield a StepEvent after every denoising step, then the GenerationResult.
        Stop iterating (break / close()) to cancel: no further work is done."""
        if not isinstance(prompt, str):
            raise BonsaiError(f"prompt must be a string, got {type(prompt).__name__}")
        check_size(width, height)
        steps, guidance = self.defaults(steps, guidance)
        use_cfg = guidance > 1.0 and not self.is_distilled
        x, seed = self.initial_noise(seed, latents, width, height)
        t_start = time.perf_counter()
        timings = {}

        dtype = self.transformer.dtype
        cond = self.text_encoder.encode([prompt], max_length=self.max_sequence_length).astype(dtype)
        neg = None
        if use_cfg:
            neg = self.text_encoder.encode([negative_prompt or ""], max_length=self.max_sequence_length).astype(dtype)
        mx.eval(cond, neg) if neg is not None else mx.eval(cond)
        timings["text_encoding_s"] = time.perf_counter() - t_start

        h, w = height // 16, width // 16
        img_ids, txt_ids = image_ids(h, w), text_ids(cond.shape[1])
        sigmas = flux2_sigmas(steps, h * w)
        t_denoise = time.perf_counter()
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            t = mx.array([sigma], dtype=mx.float32)
            xin = x.astype(dtype)
            v = self.transformer(xin, cond, t, img_ids, txt_ids).astype(mx.float32)
            if use_cfg:
                v_neg = self.transformer(xin, neg, t, img_ids, txt_ids).astype(mx.float32)
                v = v_neg + guidance * (v - v_neg)
            x = x + (sigma_next - sigma) * v  # Euler step of the rectified flow, in float32
            mx.eval(x)
            event = StepEvent(i + 1, steps, sigma, sigma_next, time.perf_counter() - t_start)
            if preview and ((i + 1) % max(1, preview_every) == 0 or i + 1 == steps):
                event.preview = self.preview(x - sigma_next * v if sigma_next > 0 else x, width, height)
            yield event
        timings["denoising_s"] = time.perf_counter() - t_denoise

        t_decode = time.perf_counter()
        images = self.vae.decode_tokens(x.astype(self.vae.dtype), height, width)
        mx.eval(images)
        timings["decoding_s"] = time.perf_counter() - t_decode
        timings["total_s"] = time.perf_counter() - t_start
        arr = np.array(images.astype(mx.float32))[0]
        yield GenerationResult(
            image=to_pil(images)[0], prompt=prompt, negative_prompt=negative_prompt if use_cfg else None, seed=seed,
            steps=steps, guidance=guidance if use_cfg else 1.0, width=width, height=height, model=self.model,
            timings=timings, array=arr,
        )

    def generate(self, prompt: str, width: int = 512, height: int = 512, steps: int | None = None,
                 seed: int | None = None, guidance: float | None = None, negative_prompt: str | None = None,
                 latents=None, callback=None, cancel=None) -> GenerationResult:
        """Run to the end. `callback(StepEvent)` is called after each step; `cancel()`
        returning True stops between steps with `Cancelled`."""
        gen = self.stream(prompt, width, height, steps, seed, guidance, negative_prompt, latents)
        for item in gen:
            if isinstance(item, GenerationResult):
                return item
            if callback is not None:
                callback(item)
            if cancel is not None and cancel():
                gen.close()
                raise Cancelled(f"generation cancelled after step {item.step} of {item.steps}")
        raise BonsaiError("generation ended without a result")

    def preview(self, x0_tokens: mx.array, width: int, height: int, max_side: int = 256) -> Image.Image:
        """A cheap look at the current x0 estimate: the latent grid averaged down 2x2
        at a time until the image is at most `max_side` pixels, then VAE-decoded."""
        h, w = height // 16, width // 16
        grid = x0_tokens.reshape(1, h, w, -1)
        while max(grid.shape[1], grid.shape[2]) * 16 > max_side and grid.shape[1] % 2 == 0 and grid.shape[2] % 2 == 0:
            grid = (grid[:, ::2, ::2] + grid[:, 1::2, ::2] + grid[:, ::2, 1::2] + grid[:, 1::2, 1::2]) / 4
        gh, gw = grid.shape[1], grid.shape[2]
        img = self.vae.decode_tokens(grid.reshape(1, gh * gw, -1).astype(self.vae.dtype), gh * 16, gw * 16)
        return to_pil(img)[0]


def _has_part(root: Path, part: str) -> bool:
    subdirs = {
        "transformer": ("transformer-packed-mflux", "transformer"),
        "text encoder": ("text_encoder-mlx-4bit", "text_encoder"),
        "tokenizer": ("tokenizer", "text_encoder-mlx-4bit", "text_encoder"),
    }[part]
    return any((root / s).is_dir() for s in subdirs)


def resolve_model(name: str | os.PathLike, *, revision=None, cache_dir=None, files=tuple(_PIPELINE_FILES),
                  what: str = "the model") -> Path:
    """A local directory, a known model name, or a Hub repo id -> a local directory.

    Only the files a pipeline needs are fetched; HF_HUB_OFFLINE and the HF cache are
    honoured by huggingface_hub itself.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    name = str(name)
    repo_id = MODELS.get(name, name)
    if path.exists() or (repo_id.count("/") != 1 or name.startswith((".", "/", "~"))):
        raise BonsaiError(
            f"{name!r} is neither a model directory nor a known model name. Known names: "
            f"{', '.join(sorted(MODELS))}; or pass a Hugging Face repo id like 'org/name', or a local directory."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(files))
    except LocalEntryNotFoundError:
        raise WeightsError(
            f"{what} ({repo_id}) is not in the Hugging Face cache and downloads are off (HF_HUB_OFFLINE) or the "
            f"Hub cannot be reached. Download it once while online (huggingface-cli download {repo_id}) or pass "
            "a local directory."
        ) from None
    except HfHubHTTPError as e:
        raise WeightsError(f"could not fetch {what} ({repo_id}) from the Hugging Face Hub: {e}") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"could not fetch {what} ({repo_id}): {e}") from None
    return Path(local)
