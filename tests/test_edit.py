"""Editing against diffusers: reference images (Flux2KleinPipeline(image=...)), inpainting and
image to image (Flux2KleinInpaintPipeline), on tiny random pipelines."""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image

from bonsai_mlx import BonsaiPipeline
from bonsai_mlx.benchmark import picture
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.images import init_pixels, mask_tokens, reference_pixels
from fixtures import make_pipeline as mp
from fixtures import make_vae

PROMPT = "a bonsai tree on a desk, soft morning light"
# Final images within 2/255 (max abs, float32), as plain generation against diffusers.
IMAGE_BOUND = 2 / 255


def ours(path, **kw):
    return BonsaiPipeline.from_pretrained(path, dtype=mx.float32, text_layers=mp.TEXT_LAYERS, **kw)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    ref, path = mp.make_pipeline(tmp_path_factory.mktemp("edit") / "distilled", is_distilled=True, seed=3)
    return ref, path, ours(path)


def check(got: np.ndarray, want: np.ndarray, label: str):
    assert got.shape == want.shape, f"{label}: {got.shape} vs {want.shape}"
    diff = np.abs(got - want).max()
    assert diff <= IMAGE_BOUND, f"{label}: max abs difference {diff * 255:.2f}/255"


@pytest.mark.parametrize("n_refs", [1, 2])
def test_reference_images_match_diffusers(distilled, n_refs):
    """One reference 100x70 (cropped to 96x64, which sets the output size) and a second of
    another shape, 72x130 (cropped to 64x128: its own token grid at t = 20)."""
    ref_pipe, _, pipe = distilled
    refs = [picture(100, 70, 1), picture(72, 130, 2, mode="P")][:n_refs]
    noise = mp.initial_noise(96, 64, seed=5)
    want = mp.run_reference(ref_pipe, PROMPT, None, None, 4, noise, image=refs)
    got = pipe.generate(PROMPT, latents=noise, image=refs)
    check(got.array, want, f"{n_refs} reference(s)")
    assert got.edit == {"references": n_refs}
    plain = mp.run_reference(ref_pipe, PROMPT, 96, 64, 4, noise)
    assert np.abs(want - plain).max() > 10 * IMAGE_BOUND  # the references change the image


def test_inpainting_matches_diffusers(distilled):
    """A 100x70 image (resized to 96x64) with a mask of the same size whose white rectangle's
    edges fall inside tokens (partial mask values), strength 0.75 of 4 steps: 3 steps run."""
    ref_pipe, _, pipe = distilled
    init = picture(100, 70, 7)
    mask = Image.new("L", (100, 70), 0)
    mask.paste(255, (25, 8, 75, 42))
    want, noise = mp.run_inpaint(ref_pipe, PROMPT, init, mask, 0.75, 4, seed=11)
    events = list(pipe.stream(PROMPT, latents=noise, init_image=init, mask=mask, strength=0.75, steps=4))
    assert len(events) == 4 and events[0].steps == 3
    check(events[-1].array, want, "inpainting")
    tokens = mask_tokens(mask, (100, 70), 96, 64)
    assert tokens.min() == 0 and tokens.max() == 1 and ((tokens > 0) & (tokens < 1)).any()
    img2img, _ = mp.run_inpaint(ref_pipe, PROMPT, init, Image.new("L", (100, 70), 255), 0.75, 4, seed=11)
    assert np.abs(want - img2img).max() > 10 * IMAGE_BOUND  # the mask matters


@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_image_to_image_matches_diffusers(distilled, strength):
    """Image to image is inpainting with the whole image masked: 6 steps, of which strength
    0.5 runs 3 and 0.8 runs 5."""
    ref_pipe, _, pipe = distilled
    init = picture(100, 70, 8)
    want, noise = mp.run_inpaint(ref_pipe, PROMPT, init, Image.new("L", (100, 70), 255), strength, 6, seed=12)
    events = list(pipe.stream(PROMPT, latents=noise, init_image=init, strength=strength, steps=6))
    assert events[0].steps == 6 - int(6 - 6 * strength)
    check(events[-1].array, want, f"image to image at {strength}")
    assert events[-1].edit == {"init_image": True, "strength": strength, "mask": False}


@pytest.mark.parametrize("size", [(100, 70), (1100, 1000), (70, 500), (301, 64)])
def test_pixels_match_diffusers_image_processors(size):
    """Our preparation against diffusers' own processors, steps as the pipelines call them
    (the area rule above 1024x1024 included): identical float32 pixels and mask values."""
    w, h = size
    img, m = picture(w, h, 4, mode="RGBA"), picture(w, h, 5, mode="L")
    proc = Flux2ImageProcessor(vae_scale_factor=16)
    # Flux2KleinPipeline: check, area rule, floor to 16, centre crop
    x = Flux2ImageProcessor._resize_to_target_area(img, 1024 * 1024) if w * h > 1024 * 1024 else img
    want = proc.preprocess(x, height=x.height // 16 * 16, width=x.width // 16 * 16, resize_mode="crop")
    np.testing.assert_array_equal(2 * reference_pixels(img) - 1, want[0].permute(1, 2, 0).numpy())
    # Flux2KleinInpaintPipeline: area rule by its own resize, floor to 16, resize; mask
    if w * h > 1024 * 1024:
        s = math.sqrt(1024 * 1024 / (h * w))
        x = proc.resize(img, int(h * s), int(w * s))
    else:
        x = img
    H, W = x.height // 16 * 16, x.width // 16 * 16
    want = proc.preprocess(x, H, W, resize_mode="default")
    got, raw = init_pixels(img)
    np.testing.assert_array_equal(2 * got - 1, want[0].permute(1, 2, 0).numpy())
    mproc = Flux2ImageProcessor(vae_scale_factor=16, do_normalize=False, do_binarize=True, do_convert_rgb=False,
                                do_convert_grayscale=True)
    mw = torch.nn.functional.interpolate(mproc.preprocess(m, height=H, width=W), size=(H // 16, W // 16),
                                         mode="bilinear")
    np.testing.assert_array_equal(mask_tokens(m, raw, W, H), mw[0, 0].numpy().reshape(-1))


def test_bad_images_fail_before_any_work(distilled, tmp_path):
    _, path, pipe = distilled
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    ok = picture(96, 64, 1)
    cases = [
        (dict(image=[tmp_path / "missing.png"]), "reference image .*missing.png does not exist"),
        (dict(image=[broken]), "reference image .*broken.png is not a readable image"),
        (dict(image=[ok, Image.new("F", (96, 64))]), "reference image 2 has mode 'F'"),
        (dict(image=[Image.new("RGB", (0, 0))]), r"reference image has no pixels \(0x0\)"),
        (dict(image=[picture(50, 80, 1)]), "reference image is 50x80: both sides must be at least 64"),
        (dict(image=[picture(70, 600, 1)]), "aspect ratio exceeds 8:1"),
        (dict(init_image=picture(12, 12, 1)), "init image is 12x12: too small for the VAE"),
        (dict(init_image=picture(40, 40, 1)), "width=32 is outside the supported range"),
        (dict(init_image=ok, mask=Image.new("L", (96, 48))), "mask is 96x48 but the init image is 96x64"),
        (dict(mask=Image.new("L", (96, 64))), "a mask needs an init image"),
        (dict(strength=0.5), "strength needs an init image"),
        (dict(init_image=ok, strength=1.5), r"strength must be a number in \[0, 1\]"),
        (dict(init_image=ok, strength=0.0), "strength 0.0 leaves no step of 4 to run"),
        (dict(init_image=ok, width=128), "the output takes the init image's size, 96x64"),
    ]
    for kw, pattern in cases:
        with pytest.raises(BonsaiError, match=pattern):
            pipe.stream(PROMPT, steps=4, **kw)  # at the call, before iterating: nothing has run
    dec = make_vae.make_vae(tmp_path / "decoder-only", "small4", seed=3, decoder_only=True)
    with pytest.raises(BonsaiError, match="this VAE has no encoder"):
        ours(path, vae=dec).stream(PROMPT, image=[ok])


def test_reference_encoded_in_strips_matches_diffusers(distilled):
    """A 512x384 reference for a 64x64 image under a budget below every plan that encodes it
    whole: the plan encodes it in strips (vae_strips.encode_strips), the image-encoding stage
    peaks under its estimate, and the image still matches diffusers within 2/255."""
    from bonsai_mlx.memory import _candidates, estimate

    ref_pipe, _, pipe = distilled
    refs, sizes = [picture(512, 384, 4)], ((512, 384),)
    fp = pipe.models.footprint(encoder=True)
    whole = [p for p in _candidates(fp, 64, 64, sizes) if not p.vae_encode_strip]
    budget = min(max(estimate(fp, 64, 64, p, images=sizes).values()) for p in whole) - 1
    noise = mp.initial_noise(64, 64, seed=6)
    want = mp.run_reference(ref_pipe, PROMPT, 64, 64, 4, noise, image=refs)
    got = pipe.generate(PROMPT, width=64, height=64, latents=noise, image=refs, memory_budget=budget)
    assert got.plan.vae_encode_strip, got.plan
    assert got.memory["stages"]["image_encoding"]["peak_gb"] * 1e9 <= got.plan.stage_estimates["image_encoding"]
    check(got.array, want, "reference encoded in strips")
