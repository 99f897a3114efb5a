"""Input images for editing: reference images, the image to repaint and its mask.

Each is read, checked and brought to its final pixels here, before any model runs, by the
same PIL operations in the same order as diffusers' pipelines, so the pixels are the same:
  reference  Flux2KleinPipeline: at least 64 px a side and at most 8:1; above 1024x1024
             pixels, resized (Lanczos) to about that area; then cropped about its centre to
             multiples of 16; RGB
  init       Flux2KleinInpaintPipeline: above 1024x1024, resized to about that area; then
             resized (Lanczos, not cropped) to its size rounded down to multiples of 16; RGB
  mask       resized (Lanczos) to the init image's final size, grey, 1 where >= 0.5 else 0,
             then bilinear (half-pixel centres, as torch's interpolate) down to one value per
             latent token: 1 repaints the token, 0 keeps the init image
Pixels are float32 [H, W, 3] in [0, 1]; the VAE maps them to [-1, 1].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import BonsaiError

MAX_AREA = 1024 * 1024  # pixels; larger inputs are scaled down to about this area
MIN_SIDE, MAX_RATIO = 64, 8  # Flux2ImageProcessor.check_image_input's limits for references
# Modes PIL converts to RGB / grey without losing meaning; 16-bit, 32-bit integer and float
# images would be clipped to 8 bits silently.
MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def open_image(item, what: str) -> Image.Image:
    """A PIL image from an image or a path, loaded now, with an error naming `what`."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise BonsaiError(f"{what} {path} does not exist")
        try:
            with Image.open(path) as im:
                im.load()
                item = im.copy()
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise BonsaiError(f"{what} {path} is not a readable image ({e})") from None
    if not isinstance(item, Image.Image):
        raise BonsaiError(f"{what} must be a PIL image or a path to one, got {type(item).__name__}")
    if item.width < 1 or item.height < 1:
        raise BonsaiError(f"{what} has no pixels ({item.width}x{item.height})")
    if item.mode not in MODES:
        raise BonsaiError(f"{what} has mode {item.mode!r}, which cannot be read as 8-bit colour; "
                          "convert it to RGB (or L for a mask) first")
    return item


def _fit_area(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w * h <= MAX_AREA:
        return img
    s = math.sqrt(MAX_AREA / (w * h))
    return img.resize((int(w * s), int(h * s)), Image.Resampling.LANCZOS)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(np.float32) / 255.0


def _floor(v: int, multiple: int, what: str, size) -> int:
    if v // multiple * multiple < multiple:
        raise BonsaiError(f"{what} is {size[0]}x{size[1]}: too small for the VAE ({multiple} pixels a side at least)")
    return v // multiple * multiple


def reference_pixels(item, what: str = "reference image", multiple: int = 16) -> np.ndarray:
    """A reference image as Flux2KleinPipeline prepares it: [h, w, 3] float32 in [0, 1]."""
    img = open_image(item, what)
    w, h = img.size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise BonsaiError(f"{what} is {w}x{h}: both sides must be at least {MIN_SIDE} pixels")
    if max(w / h, h / w) > MAX_RATIO:
        raise BonsaiError(f"{what} is {w}x{h}: its aspect ratio exceeds {MAX_RATIO}:1")
    img = _fit_area(img)
    W, H = _floor(img.width, multiple, what, img.size), _floor(img.height, multiple, what, img.size)
    left, top = (img.width - W) // 2, (img.height - H) // 2
    return _pixels(img.crop((left, top, left + W, top + H)))


def init_pixels(item, what: str = "init image", multiple: int = 16) -> tuple[np.ndarray, tuple[int, int]]:
    """The image to repaint as Flux2KleinInpaintPipeline prepares it ([H, W, 3] float32), and
    its size as given (the mask's size)."""
    raw = open_image(item, what)
    img = _fit_area(raw)
    W, H = _floor(img.width, multiple, what, img.size), _floor(img.height, multiple, what, img.size)
    return _pixels(img.resize((W, H), Image.Resampling.LANCZOS)), raw.size


def mask_tokens(item, raw_size: tuple[int, int], width: int, height: int, what: str = "mask") -> np.ndarray:
    """The mask for an init image of `raw_size` (its size as given) repainted at width x
    height: [height/16 * width/16] float32, row-major over the latent tokens."""
    img = open_image(item, what)
    if img.size != tuple(raw_size):
        raise BonsaiError(f"{what} is {img.width}x{img.height} but the init image is {raw_size[0]}x{raw_size[1]}; "
                          "they must be the same size")
    m = np.asarray(img.resize((width, height), Image.Resampling.LANCZOS).convert("L")).astype(np.float32) / 255.0
    m = np.where(m < 0.5, 0.0, 1.0).astype(np.float32)
    return _bilinear(m, height // 16, width // 16).reshape(-1)


def _axis(n_in: int, n_out: int):
    """Source rows and weights of a linear resize with half-pixel centres (align_corners=False)."""
    src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, (1 - w1), w1


def _bilinear(a: np.ndarray, h: int, w: int) -> np.ndarray:
    r0, r1, a0, a1 = _axis(a.shape[0], h)
    c0, c1, b0, b1 = _axis(a.shape[1], w)
    rows = a0[:, None] * a[r0] + a1[:, None] * a[r1]
    return (b0 * rows[:, c0] + b1 * rows[:, c1]).astype(np.float32)



@dataclass
class EditInputs:
    """The checked editing arguments of one generation, as pixels and per-token values."""
    references: list = field(default_factory=list)  # [h, w, 3] float32 each
    init_image: np.ndarray | None = None  # [H, W, 3] float32
    mask: np.ndarray | None = None  # [H/16 * W/16] float32; None repaints everywhere
    strength: float = 1.0
    width: int | None = None  # the output size they imply (None: no image says)
    height: int | None = None

    @property
    def sizes(self) -> tuple:
        """(width, height) of every image the transformer is conditioned on, init image first."""
        images = ([self.init_image] if self.init_image is not None else []) + self.references
        return tuple((p.shape[1], p.shape[0]) for p in images)


def prepare_edit(image=None, init_image=None, mask=None, strength=None, width=None, height=None,
                 has_encoder: bool = True, multiple: int = 16) -> EditInputs:
    """Check and prepare `image` (reference images: one or a list, PIL images or paths),
    `init_image` with its optional `mask` and `strength` (default 0.8, as diffusers'
    inpainting), and the output size: an init image sets it (a different width or height is
    refused), else the first reference does unless given."""
    if (mask is not None or strength is not None) and init_image is None:
        raise BonsaiError(f"{'a mask' if mask is not None else 'strength'} needs an init image (init_image= / --init-image)")
    if (image is not None or init_image is not None) and not has_encoder:
        raise BonsaiError("this VAE has no encoder (a decoder-only checkpoint, as BFL's small decoder that packs use "
                          "by default), so it cannot read images: pass a full FLUX.2 VAE with vae= / --vae")
    items = [] if image is None else [image] if isinstance(image, (str, os.PathLike, Image.Image)) else list(image)
    refs = [reference_pixels(it, f"reference image {n + 1}" if len(items) > 1 else "reference image", multiple)
            for n, it in enumerate(items)]
    edit = EditInputs(refs, width=width, height=height)
    if init_image is not None:
        edit.init_image, raw = init_pixels(init_image, multiple=multiple)
        H, W = edit.init_image.shape[:2]
        if (width is not None and width != W) or (height is not None and height != H):
            raise BonsaiError(f"the output takes the init image's size, {W}x{H} after the resize rule; "
                              f"width/height {width}x{height} differ: leave them out")
        edit.width, edit.height = W, H
        edit.mask = None if mask is None else mask_tokens(mask, raw, W, H)
        s = 0.8 if strength is None else strength
        if isinstance(s, bool) or not isinstance(s, (int, float, np.floating)) or not 0.0 <= s <= 1.0:
            raise BonsaiError(f"strength must be a number in [0, 1], got {strength!r}")
        edit.strength = float(s)
    elif refs:
        edit.height = height if height is not None else refs[0].shape[0]
        edit.width = width if width is not None else refs[0].shape[1]
    return edit
