"""Strip encoding (bonsai_mlx/vae_strips.encode_strips): equal to the whole encode and to
diffusers', what the planner estimates for it stays above what it measures, and an editing
generation whose budget needs it still matches diffusers.

Bounds. Against our own whole encode in float32: max |strip - whole| <= 1e-5 x max |whole|
(measured ~2.4e-6: only the order of sums differs, GroupNorm statistics merged strip by
strip, convolutions over fewer rows); in float16 <= 2e-3 relative in norm (a float16 conv
rounds each output once, and strips change the kernel shapes, hence the summation order).
Against diffusers: tests/test_vae.py's parity bounds (float32 1e-4, float16 2e-2, relative
in norm), on the posterior's mode (the mean half of the moments, as encode_latents returns).
"""

import importlib.util
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.execution import Execution
from bonsai_mlx.memory import (AUTO, Footprint, MemoryPlan, calibrate_vae, calibrate_vae_encoder, candidate_plans,
                               estimate, plan_cost, plan_memory, vae_enc_held_per_pixel, vae_held_per_pixel)
from bonsai_mlx.vae import VAEConfig, load_vae
from bonsai_mlx.vae_strips import encode_held_bytes

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from diffusers import AutoencoderKLFlux2 as RefVAE  # noqa: E402

_spec = importlib.util.spec_from_file_location("make_vae", Path(__file__).parent / "fixtures" / "make_vae.py")
make_vae_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_vae_mod)

REL_REF = {mx.float32: 1e-4, mx.float16: 2e-2}  # tests/test_vae.py's parity bounds
STRICT, OVERLAPPED = Execution(sync=True), Execution(sync=True, overlap=True)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_encode_strips")
    return {name: make_vae_mod.make_vae(root / name, name, seed=seed) for name, seed in (("small4", 1), ("small3", 2))}


def image(vae, h, w, seed, batch=1):
    """[B, h*f, w*f, 3] in [-1, 1]: h x w latent rows and columns."""
    f = vae.encoder_factor
    return 2 * mx.random.uniform(shape=(batch, h * f, w * f, 3), key=mx.random.key(seed)) - 1


@pytest.mark.parametrize("name", ["small4", "small3"])
@pytest.mark.parametrize("h, w, rows", [
    (13, 7, 1),  # one latent row per strip
    (13, 7, 3),  # does not divide 13 (the last strip has 1)
    (12, 10, 4),  # divides 12
    (6, 9, 5),  # one strip and a 1-row rest
    (5, 6, 8),  # taller than the image: one strip per stage
])
def test_strips_equal_the_whole_encode(vae_dirs, name, h, w, rows):
    vae = load_vae(vae_dirs[name], dtype=mx.float32)
    x = image(vae, h, w, seed=h * w + rows)
    whole = np.array(vae.encode_latents(x))
    for ex in (Execution(), STRICT, OVERLAPPED):  # one graph, strip by strip, two strips in flight
        got = np.array(vae.encode_latents(x, strip=rows * vae.encoder_factor, execution=ex))
        assert got.shape == whole.shape
        assert np.abs(got - whole).max() <= 1e-5 * np.abs(whole).max(), (ex, np.abs(got - whole).max())


def test_strips_in_float16_and_batches(vae_dirs):
    vae = load_vae(vae_dirs["small4"], dtype=mx.float16)
    f = 2 * vae.encoder_factor
    pixels = mx.random.uniform(shape=(2, 9 * f, 5 * f, 3), key=mx.random.key(7))
    whole = np.array(vae.encode(pixels))
    got = np.array(vae.encode(pixels, strip=24, execution=OVERLAPPED))
    assert got.shape == whole.shape == (2, 9 * 5, vae.config.patched_channels)
    assert rel_err(got, whole) <= 2e-3


@pytest.mark.parametrize("name", ["small4", "small3"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_strips_match_diffusers(vae_dirs, name, dtype):
    ref, ours = RefVAE.from_pretrained(vae_dirs[name]).eval(), load_vae(vae_dirs[name], dtype=dtype)
    f = ours.encoder_factor
    torch.manual_seed(5)
    x = torch.rand(1, 3, 14 * f, 6 * f) * 2 - 1  # 7 strips of 2 latent rows, non-square
    with torch.no_grad():
        want = ref.encode(x).latent_dist.mode().permute(0, 2, 3, 1).numpy()
    got = np.array(ours.encode_latents(mx.array(x.permute(0, 2, 3, 1).numpy()), strip=2 * f, execution=OVERLAPPED))
    assert rel_err(got, want) <= REL_REF[dtype]


def test_strip_options_are_checked(vae_dirs):
    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    x = image(vae, 4, 4, seed=0)
    for bad in (12, 0, -8, 8.0):
        with pytest.raises(BonsaiError, match="strip"):
            vae.encode_latents(x, strip=bad)


def test_encode_held_bytes_counts_the_widest_stage(vae_dirs):
    """FLUX.2's encoder (128, 256, 512, 512 channels down): the full-resolution resnets hold
    their 128-channel input, conv1's output and their output; float16, 1024 px."""
    assert encode_held_bytes(VAEConfig(), 1024, 1024, 2) == 1024 * 1024 * (128 + 128 + 128) * 2
    vae = load_vae(vae_dirs["small4"], dtype=mx.float16)
    assert vae_enc_held_per_pixel(vae) * 64 * 48 == encode_held_bytes(vae.config, 64, 48, 2)


# ----------------------------------------------------------------------------- the planner

def footprint(vae) -> Footprint:
    """A footprint whose image-encoding stage dominates: tiny other models, this VAE calibrated."""
    return Footprint(transformer_bytes=1 << 20, transformer_dim=64, transformer_mlp=128, transformer_heads=2,
                     transformer_max_out=256, reference_matmul=False, text_resident_bytes=1 << 20,
                     text_stream_bytes=1 << 19, text_hidden=64, text_heads=2, text_len=8,
                     vae_bytes=sum(v.nbytes for _, v in tree_flatten(vae.parameters())),
                     vae_mid_channels=vae.config.decoder_channels[-1], fused_attention=True,
                     dtype_bytes=vae.dtype.size, vae_held_per_pixel=vae_held_per_pixel(vae),
                     vae_enc_held_per_pixel=vae_enc_held_per_pixel(vae), latent_channels=4 * 4,
                     **calibrate_vae(vae), **calibrate_vae_encoder(vae))


def measured_peak(fn):
    mx.synchronize()
    mx.reset_peak_memory()
    mx.eval(fn())
    mx.synchronize()
    return mx.get_peak_memory()


def test_encode_strips_are_candidates_and_cost_little():
    plans = candidate_plans(512, 512, encode_height=384)
    assert {p.vae_encode_strip for p in plans} == {None, 256, 128, 64, 32, 16}
    assert {p.vae_encode_strip for p in candidate_plans(512, 512)} == {None}  # nothing to encode
    assert plan_cost(MemoryPlan(vae_encode_strip=16)) < plan_cost(MemoryPlan(stream_text_encoder=True))


def test_estimate_covers_strip_encodes(vae_dirs):
    """The calibration fits two small encodes; the estimate of the image-encoding stage
    holds (mx.get_peak_memory, everything live counted) at sizes and strips neither had,
    strict and overlapped, whole and in strips."""
    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    fp = footprint(vae)
    for W, H in ((384, 128), (256, 512)):
        pixels = mx.random.uniform(shape=(1, H, W, 3), key=mx.random.key(4))
        mx.eval(pixels)
        for strip in (None, 8, 40):
            for overlap in (False, True):
                plan = MemoryPlan(sync=True, overlap=overlap, vae_encode_strip=strip)
                peak = measured_peak(lambda: vae.encode(pixels, strip=strip, execution=plan.execution))
                est = estimate(fp, 64, 64, plan, images=((W, H),))["image_encoding"]
                assert peak <= est, (W, H, strip, overlap, peak, est)


def test_planner_encodes_in_strips_when_the_budget_needs_it(vae_dirs):
    """A 1024x1024 reference under a budget below every whole encode's estimate: the planner
    encodes it in strips, and that encode peaks under the stage's estimate and equals
    diffusers' encoder in float64 within 2e-4 (relative, in norm). At this size float32
    itself is the error, as for strip decoding: our whole encode's GroupNorm sums run over a
    million pixels at once, the strips' over one strip, merged."""
    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    fp, images = footprint(vae), ((1024, 1024),)
    whole = [p for p in candidate_plans(256, 256, encode_height=1024) if not p.vae_encode_strip]
    budget = min(max(estimate(fp, 256, 256, p, images=images).values()) for p in whole) - 1
    plan = plan_memory(fp, 256, 256, budget, images=images)
    assert plan.vae_encode_strip, plan
    pixels = mx.random.uniform(shape=(1, 1024, 1024, 3), key=mx.random.key(9))
    mx.eval(pixels)
    peak = measured_peak(lambda: vae.encode(pixels, strip=plan.vae_encode_strip, execution=plan.execution))
    assert peak <= plan.stage_estimates["image_encoding"], (peak, plan.stage_estimates["image_encoding"])
    got = np.array(vae.encode_latents(2 * pixels - 1, strip=plan.vae_encode_strip, execution=plan.execution))
    ref = RefVAE.from_pretrained(vae_dirs["small4"]).eval().double()
    with torch.no_grad():
        x = torch.tensor(np.array(2 * pixels - 1)).permute(0, 3, 1, 2).double()
        want = ref.encode(x).latent_dist.mode().permute(0, 2, 3, 1).numpy()
    assert rel_err(got, want) <= 2e-4, (rel_err(got, want), rel_err(np.array(vae.encode_latents(2 * pixels - 1)), want))


def test_auto_encodes_in_strips_when_encoding_holds_the_peak(vae_dirs):
    """Under the auto budget the images are encoded in strips only where that lowers the
    plan's estimated peak: a large reference next to a small image, not a small one."""
    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    fp = footprint(vae)
    big = plan_memory(fp, 64, 64, AUTO, images=((1024, 1024),))
    whole = estimate(fp, 64, 64, replace(big, vae_encode_strip=None), images=((1024, 1024),))
    assert big.vae_encode_strip and big.estimated_peak_bytes < max(whole.values()), (big, whole)
    assert max(whole, key=whole.get) == "image_encoding"
    small = plan_memory(fp, 1024, 1024, AUTO, images=((32, 32),))
    assert small.vae_encode_strip is None


def test_profile_command_for_the_gpu(tmp_path):
    """examples/profile_speed.py --sections encode (what times strip encodes against the whole
    encode on a GPU), at a tiny size on this CPU: every way of encoding is recorded in both
    16-bit dtypes with its time, extra peak and estimate, the estimate covers the peak, and
    strips stay near the whole encode (16 / 8 mantissa bits: measured 2.7e-3 / 1.8e-2
    relative in norm on these normalized tokens of a random encoder)."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    out = tmp_path / "encode.json"
    r = subprocess.run([sys.executable, "examples/profile_speed.py", "--sections", "encode", "--tiny", "--quick",
                        "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr
    rows = [x for x in json.loads(out.read_text()) if x["name"].startswith("vae encode")]
    assert not [x for x in rows if "err" in x]
    assert {(x["dtype"], x["strip"] is not None) for x in rows} == {(d, s) for d in ("float16", "bfloat16")
                                                                    for s in (False, True)}
    for x in rows:
        assert x["ms"] > 0 and x["extra_peak_mb"] > 0 and x["estimate_mb"] >= x["extra_peak_mb"], x["name"]
        assert x["rel_diff_vs_whole"] <= ({"float16": 1e-2, "bfloat16": 4e-2}[x["dtype"]] if x["strip"] else 0)
