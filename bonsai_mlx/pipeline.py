"""Text to image: prompt -> Qwen3 embeddings -> flow-matching denoise -> VAE decode.

Matches diffusers' `Flux2KleinPipeline` given the same initial noise. `BonsaiPipeline` is
the front: it loads the models, checks the arguments, asks the planner (memory.py) how to
run and hands the stages to the executor (executor.py); `stream` yields between denoising
steps, so a caller can show progress and previews, and cancel.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx
import numpy as np
from PIL import Image

from . import executor
from .errors import BonsaiError, ConfigError, PipelineBusyError, WeightsError
from .execution import prefer_direct_launches
from .images import prepare_edit
from .layouts import DIFFUSERS, MODEL_DEFAULTS, MODEL_INDEX
from .executor import Models, Request, image_ids, text_ids  # noqa: F401  (part of the API)
from .loading import (DEFAULT_VAE_REPO, MODELS, VAE_FILES, TransformerSource, has_part,  # noqa: F401
                      load_transformer, resolve_model, transformer_source)
from .memory import (AUTO, UNCONSTRAINED, MemoryPlan, cheapest, parse_budget, plan_memory, smallest_plan,
                     text_batch)
from .results import GenerationResult, StepEvent, to_pil  # noqa: F401  (part of the API)
from .safe_files import ModelFolder, read_json
from .scheduler import first_step
from .text_encoder import load_text_encoder
from .validate import (MAX_SEED, MAX_SEQUENCE_LENGTH, MAX_SIZE, MAX_STEPS, MIN_SIZE, brief,  # noqa: F401
                       check_size, is_int)
from .vae import load_vae, unpack, unpatchify

MAX_PROMPT_CHARS = 100_000  # far past the 512 tokens the encoder reads; bounds the tokenizer's work


class Cancelled(BonsaiError):
    """Raised by `generate` when its `cancel` callback asked to stop."""


# MLX's Metal and CUDA back-ends are not thread-safe (evaluation encodes into the stream's
# shared command buffer on the calling thread), so on a GPU one generation at a time runs
# in the process, whatever the pipeline; the others wait their turn. MLX's CPU back-end runs
# each stream's work on its own scheduler thread: generations of different pipelines run
# concurrently there and give the images sequential runs give (docs/robustness.md).
_DEVICE_TURN = threading.Lock()
_device_holder: int | None = None  # the thread whose generation holds the turn


def serialized_device() -> bool:
    """Whether generations must take turns on the default device (a GPU)."""
    return mx.default_device() != mx.cpu


def _take_device() -> bool:
    global _device_holder
    if not serialized_device():
        return False
    if _device_holder == threading.get_ident():
        raise PipelineBusyError("this thread has another generation open on the GPU; finish or close it first "
                                "(MLX's GPU back-ends run one generation at a time)")
    _DEVICE_TURN.acquire()
    _device_holder = threading.get_ident()
    return True


def _give_device() -> None:
    global _device_holder
    _device_holder = None
    _DEVICE_TURN.release()


def check_seed(seed) -> None:
    if seed is not None and (not is_int(seed) and not isinstance(seed, np.integer) or not 0 <= seed <= MAX_SEED):
        raise BonsaiError(f"seed must be an integer in 0..{MAX_SEED} (2**64 - 1), got {brief(seed)}")


def check_models(transformer, text_encoder, vae) -> None:
    """The three models must fit each other: the text features the transformer reads, the
    latent channels it denoises and the VAE decodes, and the VAE's 8x upsampling (with
    the 2x2 patches, one token per 16x16 pixels). Otherwise images would be wrong."""
    cfg = transformer.config
    problems = []
    if text_encoder.config.output_dim != cfg.joint_attention_dim:
        problems.append(f"the text encoder gives {text_encoder.config.output_dim} features per token (layers "
                        f"{list(text_encoder.config.layers)}), the transformer reads {cfg.joint_attention_dim}")
    latent = vae.config.patched_channels
    if cfg.in_channels != latent or cfg.out_dim != latent:
        problems.append(f"the transformer denoises {cfg.in_channels} -> {cfg.out_dim} channels, the VAE decodes "
                        f"{latent} (4 x latent_channels)")
    if vae.decoder_factor != 8:
        problems.append(f"the VAE upsamples {vae.decoder_factor}x; FLUX.2's upsamples 8x")
    if problems:
        raise ConfigError("the models do not fit together: " + "; ".join(problems)
                          + ". Check that they come from the same FLUX.2 klein pipeline.")


def lora_specs(lora) -> list[tuple[str, float]]:
    """[(path, scale), ...] from None, a path, or a list of paths and (path, scale) pairs;
    each file must exist."""
    if lora is None:
        return []
    items = [lora] if isinstance(lora, (str, os.PathLike)) else list(lora)
    specs = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            item = (item, 1.0)
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise BonsaiError(f"each LoRA must be a path or a (path, scale) pair, got {item!r}")
        path, scale = item
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise BonsaiError(f"LoRA scale for {path} must be a number, got {scale!r}") from None
        if not os.path.exists(path):
            raise BonsaiError(f"LoRA file {path} does not exist")
        specs.append((str(path), scale))
    return specs


def load_taef2(download: bool):
    """TAEF2 from `mlx-taef`; None when the package is missing or (without `download`) its
    weights are not cached. A failed download is an error that says what to do."""
    try:
        from mlx_taef import TAEF2
    except ImportError:
        if download:
            raise BonsaiError("TAEF2 previews need the optional package mlx-taef: pip install mlx-taef") from None
        return None
    if not download:
        from huggingface_hub import try_to_load_from_cache

        src = getattr(getattr(TAEF2, "_kernel", None), "source", None)
        if src is None or not isinstance(try_to_load_from_cache(src.repo, src.filename, revision=src.revision), str):
            return None
    try:
        return TAEF2.from_pretrained(include_encoder=False)
    except Exception as e:  # the package's own download / conversion errors
        raise BonsaiError(f"could not load TAEF2 for previews ({type(e).__name__}: {e}); previews can use the "
                          "VAE instead (preview_decoder=None)") from None



def sampling_defaults(is_distilled: bool, steps, guidance) -> tuple[int, float]:
    """Steps and guidance, the model's defaults where None (distilled: 4 and 1.0; base: 50 and 4.0)."""
    steps = (4 if is_distilled else 50) if steps is None else steps
    guidance = (1.0 if is_distilled else 4.0) if guidance is None else float(guidance)
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise BonsaiError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    if guidance < 0 or not np.isfinite(guidance):
        raise BonsaiError(f"guidance must be a finite number >= 0, got {guidance}")
    return int(steps), guidance


def check_prompts(prompt, negative_prompt) -> None:
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if text is not None and not isinstance(text, str) or name == "prompt" and text is None:
            raise BonsaiError(f"{name} must be a string, got {type(text).__name__}")
        if text is not None and len(text) > MAX_PROMPT_CHARS:
            raise BonsaiError(f"{name} is {len(text):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted "
                              "(the text encoder reads 512 tokens)")
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates, e.g. from command-line bytes that are not UTF-8
            raise BonsaiError(f"{name} is not valid text: {e.reason} at character {e.start}; pass UTF-8") from None


def initial_noise(channels: int, seed: int | None, latents, width: int, height: int) -> tuple[mx.array, int | None]:
    """[1, L, C] tokens of N(0, 1) noise, drawn as [1, C, H/16, W/16] and packed row-major
    (the reference's layout), from `seed` or from caller-supplied `latents`."""
    C, h, w = channels, height // 16, width // 16
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


def one_at_a_time(lock, run: Iterator) -> Iterator:
    """`run`, holding `lock` (a pipeline's) from its first step until it ends or is closed; a
    generation asked for meanwhile (from any thread) is refused, not queued. On a GPU,
    generations of all pipelines also take turns (see `serialized_device`)."""
    if not lock.acquire(blocking=False):
        run.close()
        raise PipelineBusyError(
            "this pipeline is already running a generation; wait for it to finish (or close its stream), "
            "or use one pipeline per thread")
    shared = False
    try:
        shared = _take_device()
        yield from run
    finally:
        run.close()
        if shared:
            _give_device()
        lock.release()


DEFAULT_SIZE = 512  # klein's, when the model does not say
DEFAULT_SEQUENCE_LENGTH = 512


def model_defaults(root) -> dict:
    """The model's own defaults from its MODEL_DEFAULTS file (layouts.py), checked: width and
    height it was trained at, and its prompt length in tokens; klein's where it has none."""
    out = {"width": DEFAULT_SIZE, "height": DEFAULT_SIZE, "max_sequence_length": DEFAULT_SEQUENCE_LENGTH}
    folder = ModelFolder(root)
    if not folder.exists(MODEL_DEFAULTS):
        return out
    path = folder.file(MODEL_DEFAULTS, "model defaults")
    given = read_json(path, "model defaults")
    if not isinstance(given, dict) or set(given) - set(out):
        raise ConfigError(f"{path}: expected an object with keys among {sorted(out)}, got {brief(given)}")
    if ("width" in given) != ("height" in given):
        raise ConfigError(f"{path}: give width and height together, got {brief(given)}")
    for key, value in given.items():
        lo, hi, step = (1, MAX_SEQUENCE_LENGTH, 1) if key == "max_sequence_length" else (MIN_SIZE, MAX_SIZE, 16)
        if not is_int(value) or not lo <= value <= hi or value % step:
            raise ConfigError(f"{path}: {key} must be an integer in {lo}..{hi}"
                              + (f", a multiple of {step}" if step > 1 else "") + f", got {brief(value)}")
    return {**out, **given}


def open_parts(root, dtype, vae, text_layers, cache_dir, vae_dtype):
    """(is_distilled, text encoder, VAE) of the pipeline or pack at `root`; the VAE from `vae`
    (a directory or a model) when given, else the pipeline's own, else BFL's small decoder."""
    is_distilled = True
    folder = ModelFolder(root)
    if folder.exists(MODEL_INDEX):
        index = folder.file(MODEL_INDEX, "pipeline index")
        is_distilled = read_json(index, "pipeline index").get("is_distilled", False)
        if not isinstance(is_distilled, bool):
            raise ConfigError(f"{index}: is_distilled must be true or false, got {brief(is_distilled)}")
    missing = [s for s in ("transformer", "text encoder", "tokenizer") if not has_part(root, s)]
    if missing:
        raise WeightsError(
            f"{root} is not a FLUX.2 klein pipeline or Bonsai pack: no {', '.join(missing)} found. Expected "
            "transformer-packed-mflux/ or transformer/, text_encoder-mlx-4bit/ or text_encoder/, and tokenizer/."
        )
    text_encoder = load_text_encoder(root, dtype=dtype, layers=text_layers, resident=False)
    if vae is None:
        vae = root / DIFFUSERS.vae if (root / DIFFUSERS.vae / "config.json").exists() else resolve_model(
            DEFAULT_VAE_REPO, cache_dir=cache_dir, files=VAE_FILES,
            what="the VAE (PrismML packs decode with BFL's small decoder; or pass vae=)")
    vae_dtype = vae_dtype or (mx.float32 if dtype == mx.float32 else mx.float16)
    vae_model = load_vae(vae, dtype=vae_dtype, lazy_encoder=True) if isinstance(vae, (str, os.PathLike)) else vae
    return is_distilled, text_encoder, vae_model


def preview_image(vae, taef, x0_tokens: mx.array, width: int, height: int, max_side: int = 256) -> Image.Image:
    """A cheap look at the current x0 estimate: decoded whole by TAEF2 (`taef`, see
    `BonsaiPipeline.preview_decoder`), or the latent grid averaged down 2x2 at a time until
    the image is at most `max_side` pixels, then VAE-decoded."""
    h, w = height // 16, width // 16
    taef = taef if x0_tokens.shape[-1] == 128 else None  # FLUX.2's 32 channels, patched
    if taef is not None:  # TAEF2 decodes the normalized latent, unpatchified to 32 channels
        return to_pil(taef.decode(unpatchify(unpack(x0_tokens.astype(mx.float32), h, w))))[0]
    grid = x0_tokens.reshape(1, h, w, -1)
    while max(grid.shape[1], grid.shape[2]) * 16 > max_side and grid.shape[1] % 2 == 0 and grid.shape[2] % 2 == 0:
        grid = (grid[:, ::2, ::2] + grid[:, 1::2, ::2] + grid[:, ::2, 1::2] + grid[:, 1::2, 1::2]) / 4
    gh, gw = grid.shape[1], grid.shape[2]
    img = vae.decode_tokens(grid.reshape(1, gh * gw, -1).astype(vae.dtype), gh * 16, gw * 16)
    return to_pil(img)[0]


def _from_pretrained(cls, path_or_repo_id: str | os.PathLike, *, dtype=mx.bfloat16, vae=None,
                     quantize: str | None = None, backend: str = "auto", text_layers=(9, 18, 27),
                     revision: str | None = None, cache_dir: str | None = None, memory_budget=AUTO,
                     vae_dtype=None, lora=None, max_sequence_length: int | None = None) -> "BonsaiPipeline":
    """`BonsaiPipeline.from_pretrained`: load a pipeline from a local directory or a Hugging
    Face repo id.

    Accepted layouts: PrismML's MLX packs (`transformer-packed-mflux/`,
    `text_encoder-mlx-4bit/`, `tokenizer/`; no VAE inside, so `vae` or the small
    decoder from the Hub is used) and diffusers FLUX.2 klein pipelines
    (`model_index.json`, `transformer/`, `text_encoder/`, `tokenizer/`, `vae/`).
    `quantize` packs a dense transformer's block linears on load.
    `dtype` is the transformer's and text encoder's (bfloat16 by default: Qwen3's
    residual stream can exceed float16's range); the VAE runs in `vae_dtype`
    (float16 by default, float32 if dtype is float32).
    `memory_budget`: see BonsaiPipeline; checked before anything is loaded.
    `lora`: LoRAs to load, [(path, scale), ...] or paths (scale 1); see `load_lora`.
    `max_sequence_length`: prompt tokens (padded or truncated to it); by default the
    model's own (its bonsai.json), else 512 as in klein. A model trained on short prompts
    runs its transformer on far fewer tokens. The default image size is the model's too.
    """
    if max_sequence_length is not None and (not is_int(max_sequence_length)
                                            or not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH):
        raise BonsaiError(f"max_sequence_length must be an integer in 1..{MAX_SEQUENCE_LENGTH}, "
                          f"got {max_sequence_length!r}")
    budget = parse_budget(memory_budget)  # validate before loading
    loras = lora_specs(lora)
    prefer_direct_launches()  # before the first GPU evaluation, which loading may run
    root = resolve_model(path_or_repo_id, revision=revision, cache_dir=cache_dir)

    loader = TransformerSource(transformer_source(path_or_repo_id, root), dtype, quantize, backend)

    defaults = model_defaults(root)
    is_distilled, text_encoder, vae_model = open_parts(root, dtype, vae, text_layers, cache_dir, vae_dtype)
    pipe = cls(loader(), text_encoder, vae_model, is_distilled=is_distilled, model=str(path_or_repo_id),
               memory_budget=budget, transformer_loader=loader,
               max_sequence_length=max_sequence_length or defaults["max_sequence_length"],
               default_size=(defaults["width"], defaults["height"]))
    for path, scale in loras:
        pipe.load_lora(path, scale)
    return pipe


class BonsaiPipeline:
    """Stages: text encoding -> denoising -> decoding, each holding what the memory plan
    says. `memory_budget`: "auto" (the default: frugal at no cost in time, capped by the
    device), a size such as "1.5GB" (the fastest plan under it, refused up front if none
    fits), or None / "none" (everything resident, each part run the fastest measured way:
    memory.UNCONSTRAINED)."""

    def __init__(self, transformer, text_encoder, vae, *, is_distilled: bool = True, model: str = "local",
                 max_sequence_length: int = DEFAULT_SEQUENCE_LENGTH, memory_budget=AUTO, transformer_loader=None,
                 default_size: tuple[int, int] = (DEFAULT_SIZE, DEFAULT_SIZE)):
        check_models(transformer, text_encoder, vae)
        self.default_size = default_size  # (width, height) when a generation gives none
        self.models = Models(transformer, text_encoder, vae, transformer_loader, max_sequence_length)
        # One generation at a time: the stages share the models and what is resident.
        self._busy = threading.Lock()
        self._models_changed = 0  # LoRA changes and releases made so far (`_between_generations`)
        self.is_distilled, self.model, self.memory_budget = is_distilled, model, parse_budget(memory_budget)
        self._preview_decoder = "auto"

    # The loaded models, for callers that use them directly.
    transformer = property(lambda self: self.models.transformer)
    text_encoder = property(lambda self: self.models.text_encoder)
    vae = property(lambda self: self.models.vae)
    max_sequence_length = property(lambda self: self.models.max_sequence_length)

    def release_transformer(self) -> None:
        with self._between_generations("release the transformer"):
            self.models.release_transformer()

    @contextmanager
    def _between_generations(self, what: str):
        """Holds the pipeline while `what` changes its models: a generation running meanwhile
        (from any thread, or an open stream of this one) would change models mid-image."""
        if not self._busy.acquire(blocking=False):
            raise PipelineBusyError(f"this pipeline is running a generation: {what} once it ends "
                                    "(or after closing its stream)")
        shared = False
        try:
            shared = _take_device()  # on a GPU, after other pipelines' generations: it evaluates too
            yield
            self._models_changed += 1  # a stream planned before this re-plans at its first step
        finally:
            if shared:
                _give_device()
            self._busy.release()

    # ---------------------------------------------------------------- LoRA
    def load_lora(self, path: str | os.PathLike, scale: float = 1.0, name: str | None = None) -> str:
        """Add a LoRA (diffusers, PEFT, BFL/ai-toolkit or kohya keys) at `scale`; returns its
        name (the file's stem unless given). Packed layers get it as an adapter beside their
        codes, never as a dense copy; several LoRAs add up. A LoRA that does not fit the
        model is refused whole, naming the layer, and nothing changes."""
        with self._between_generations("load a LoRA"):
            return self.models.load_lora(path, scale, name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change a loaded LoRA's scale (0 turns it off); no weights are read again."""
        with self._between_generations("change a LoRA's scale"):
            self.models.set_lora_scale(name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA, or all of them: the model is again exactly as loaded."""
        with self._between_generations("unload LoRAs"):
            self.models.unload_lora(name)

    @property
    def loras(self) -> list[tuple[str, str, float]]:
        """(name, file, scale) of the loaded LoRAs, in load order."""
        return [(lora.name, lora.source, lora.scale) for lora in self.models.loras]

    def footprint(self, calibrated: bool = True):
        return self.models.footprint(calibrated)

    def plan(self, width: int | None = None, height: int | None = None, memory_budget="default", cfg: bool = False,
             images: tuple = ()) -> MemoryPlan:
        """How a generation (by default of the model's size) would run under `memory_budget` (the
        pipeline's by default) with `images` ((width, height) of each conditioning image after
        the resize rules). Raises, naming the smallest budget that works, when nothing fits."""
        width, height = width or self.default_size[0], height or self.default_size[1]
        check_size(width, height)
        budget = self.memory_budget if memory_budget == "default" else parse_budget(memory_budget)
        if budget is None:  # nothing to fit, so no footprint (its VAE calibration resets the peak)
            return UNCONSTRAINED
        batches, images = 2 if cfg else 1, tuple(images)
        if budget == AUTO and not images:
            # The device's own memory is usually far above what the cheapest plan needs: when
            # conservative figures already fit it, the VAE needs no calibration decode.
            fp = self.footprint(calibrated=False)
            if cheapest(plan := plan_memory(fp, width, height, AUTO, cfg_batches=batches), fp, width, height):
                return plan
        return plan_memory(self.models.footprint(encoder=bool(images)), width, height, budget,
                           cfg_batches=batches, images=images)

    def encode_prompts(self, prompts, width: int | None = None, height: int | None = None,
                       guidance: float | None = None, memory_budget="default") -> list[str]:
        """Encode upcoming prompts ahead of their generations (of this size and guidance, no
        editing images): those of `prompts` not kept yet, in order, as many in one encode as
        the memory plan of such a generation allows (`memory.text_batch`: none where fewer
        than two fit, 16 waiting at most). Each waits for its generation, which then does not
        encode it; a streamed encoder is read once for all of them. Nothing while the first of
        `prompts` waits already: its batch is still in use, and topping it up would read the
        encoder again for a prompt or two (called before every generation of a prompt list,
        the encoder is read once a batch). Returns the prompts encoded."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            check_prompts(p, None)
        budget = self.memory_budget if memory_budget == "default" else parse_budget(memory_budget)
        width, height = width or self.default_size[0], height or self.default_size[1]
        cfg = sampling_defaults(self.is_distilled, None, guidance)[1] > 1.0 and not self.is_distilled
        te = self.models.text_encoder
        if prompts and self.models.prompts.waits(prompts[0], self.max_sequence_length, te.dtype):
            return []
        with self._between_generations("encode prompts"):
            plan = self.plan(width, height, budget, cfg=cfg)
            new = [p for p in dict.fromkeys(prompts)
                   if not self.models.prompts.kept(p, self.max_sequence_length, te.dtype)]
            fp = None if budget is None else self.models.footprint(calibrated=False)
            n = text_batch(fp, width, height, plan, len(new), budget, cfg_batches=2 if cfg else 1,
                           waiting=self.models.prompts.waiting)
            return executor.encode_ahead(self.models, new[:n], plan, budget) if n else []

    def smallest_plan(self, width: int | None = None, height: int | None = None, cfg: bool = False,
                      images: tuple = ()) -> MemoryPlan:
        """The most frugal way to run a generation of this size (by default the model's)."""
        width, height = width or self.default_size[0], height or self.default_size[1]
        check_size(width, height)
        return smallest_plan(self.models.footprint(encoder=bool(images)), width, height,
                             cfg_batches=2 if cfg else 1, images=tuple(images))

    # ---------------------------------------------------------------- loading
    from_pretrained = classmethod(_from_pretrained)

    # ---------------------------------------------------------------- running
    def stream(self, prompt: str, width: int | None = None, height: int | None = None, steps: int | None = None,
               seed: int | None = None, guidance: float | None = None, negative_prompt: str | None = None,
               latents=None, preview: bool = False, preview_every: int = 1,
               memory_budget="default", plan: MemoryPlan | None = None, *, image=None, init_image=None,
               mask=None, strength: float | None = None) -> Iterator[StepEvent | GenerationResult]:
        """Yield a StepEvent after every denoising step, then the GenerationResult.
        Stop iterating (break / close()) to cancel: no further work is done.
        `plan` overrides the memory plan chosen from the budget.

        Editing, as diffusers' Flux2KleinPipeline / Flux2KleinInpaintPipeline (rules in images.py):
        `image`: reference image(s), PIL images or paths, that condition the generation.
        `init_image`: the image to start from, noised to `strength` (default 0.8: 1 starts
        from pure noise); its size is the output's. `mask` (same size as init_image): white
        repaints, black keeps; without it the whole image is repainted (image to image).
        `latents` (or the seed) is the noise in every case. The size defaults to the init
        image's, else the first reference's, else the model's (`default_size`: 512x512 for klein)."""
        check_prompts(prompt, negative_prompt)
        edit = prepare_edit(image, init_image, mask, strength, width, height, has_encoder=self.vae.has_encoder,
                            multiple=2 * self.vae.encoder_factor if self.vae.has_encoder else 16)
        width, height = edit.width or self.default_size[0], edit.height or self.default_size[1]
        check_size(width, height)
        check_seed(seed)
        steps, guidance = sampling_defaults(self.is_distilled, steps, guidance)
        if edit.init_image is not None and steps - first_step(steps, edit.strength) < 1:
            raise BonsaiError(f"strength {edit.strength} leaves no step of {steps} to run; raise strength or steps")
        use_cfg = guidance > 1.0 and not self.is_distilled
        budget = self.memory_budget if memory_budget == "default" else parse_budget(memory_budget)
        chosen, changes = plan is None, self._models_changed
        if chosen:  # refuses up front when nothing fits
            plan = self.plan(width, height, budget, cfg=use_cfg, images=edit.sizes)
        noise, seed = initial_noise(self.models.transformer_info["config"].in_channels, seed, latents, width, height)
        req = Request(prompt, negative_prompt, width, height, steps, guidance, use_cfg, seed, noise, self.model,
                      (lambda x0: self.preview(x0, width, height)) if preview else None, preview_every,
                      edit.references, edit.init_image, edit.mask, edit.strength)
        # Everything above runs now, so bad arguments fail at the call, not at the first next().
        # auto's limits follow the estimate of its own plan; a caller's plan may be for another request
        limits = budget if chosen or budget != AUTO else None

        def run():
            # Planned at the call; a LoRA change or a release between the call and the first
            # step (which takes the pipeline) changed the models the plan was made for.
            chosen_now = plan
            if chosen and self._models_changed != changes:
                chosen_now = self.plan(width, height, budget, cfg=use_cfg, images=edit.sizes)
            yield from executor.run(self.models, req, chosen_now, limits)

        return one_at_a_time(self._busy, run())

    def generate(self, prompt: str, width: int | None = None, height: int | None = None, steps: int | None = None,
                 seed: int | None = None, guidance: float | None = None, negative_prompt: str | None = None,
                 latents=None, callback=None, cancel=None, memory_budget="default",
                 plan: MemoryPlan | None = None, *, image=None, init_image=None, mask=None,
                 strength: float | None = None) -> GenerationResult:
        """Run to the end. `callback(StepEvent)` is called after each step; `cancel()`
        returning True stops between steps with `Cancelled`. Editing arguments: see `stream`."""
        gen = self.stream(prompt, width, height, steps, seed, guidance, negative_prompt, latents,
                          memory_budget=memory_budget, plan=plan, image=image, init_image=init_image, mask=mask,
                          strength=strength)
        for item in gen:
            if isinstance(item, GenerationResult):
                return item
            if callback is not None:
                callback(item)
            if cancel is not None and cancel():
                gen.close()
                raise Cancelled(f"generation cancelled after step {item.step} of {item.steps}")
        raise BonsaiError("generation ended without a result")

    @property
    def preview_decoder(self):
        """What previews decode with: TAEF2 (the tiny FLUX.2 autoencoder of the optional
        `mlx-taef` package), or None: the pipeline's VAE on a reduced latent. By default
        ("auto") TAEF2 when the package is installed and its weights are in the Hugging Face
        cache (a preview never waits for a download); set "taef2" to download them, None for
        the VAE, or any object with `decode(latents [B, H/8, W/8, 32]) -> [B, H, W, 3] in [0, 1]`."""
        if isinstance(self._preview_decoder, str):
            self._preview_decoder = load_taef2(download=self._preview_decoder == "taef2")
        return self._preview_decoder

    @preview_decoder.setter
    def preview_decoder(self, decoder) -> None:
        if isinstance(decoder, str) and decoder not in ("auto", "taef2"):
            raise BonsaiError(f"preview_decoder must be 'auto', 'taef2', None or a decoder, got {decoder!r}")
        self._preview_decoder = decoder

    def preview(self, x0_tokens: mx.array, width: int, height: int, max_side: int = 256) -> Image.Image:
        """A cheap look at the current x0 estimate (see `preview_image`)."""
        return preview_image(self.vae, self.preview_decoder, x0_tokens, width, height, max_side)
