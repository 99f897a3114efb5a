"""Strip decoding (bonsai_mlx/vae_strips.py): equal to the whole decode and to diffusers',
and what the planner estimates for it stays above what it measures.

Bounds. Against our own whole decode in float32: max |strip - whole| <= 1e-5 x max |whole|
(measured ~1.6e-6: only the order of sums differs, GroupNorm statistics merged strip by
strip, convolutions over fewer rows); in float16 the same decode <= 2e-3 relative in norm
(measured ~1e-3 on the [0, 1] image: a float16 conv rounds each output once, and strips
change which kernel shape, hence which summation order, each output sees). Against diffusers:
the parity bounds of tests/test_vae.py (float32 1e-4, float16 2e-2, relative in norm).

Strip encoding (vae_strips.encode_strips), the same bounds: against our own whole encode in
float32 max |strip - whole| <= 1e-5 x max |whole| (measured ~2.4e-6), in float16 <= 2e-3
relative in norm; against diffusers' encoder (the posterior's mode, the mean half of the
moments, as encode_latents returns) tests/test_vae.py's parity bounds.
"""

import importlib.util
import threading
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from bonsai_mlx import kernels
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.execution import Execution
from bonsai_mlx.memory import (AUTO, Footprint, MemoryPlan, calibrate_vae, calibrate_vae_encoder, candidate_plans,
                               estimate, plan_cost, plan_memory, vae_enc_held_per_pixel, vae_held_per_pixel)
from bonsai_mlx.vae import VAEConfig, load_vae, unpatchify
from bonsai_mlx.vae_strips import encode_held_bytes, held_bytes, spans, stage_rows, up_strips

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from diffusers import AutoencoderKLFlux2 as RefVAE  # noqa: E402

_spec = importlib.util.spec_from_file_location("make_vae", Path(__file__).parent / "fixtures" / "make_vae.py")
make_vae_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_vae_mod)

REL_REF = {mx.float32: 1e-4, mx.float16: 2e-2}  # tests/test_vae.py's parity bounds
STRICT, OVERLAPPED = Execution(sync=True), Execution(sync=True, overlap=True)
AHEAD = Execution(sync=True, ahead=True)  # one part at a time, each built while the one before runs


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_strips")
    return {name: make_vae_mod.make_vae(root / name, name, seed=seed) for name, seed in (("small4", 1), ("small3", 2))}


def latents(vae, h, w, seed, batch=1):
    return mx.random.normal((batch, h, w, vae.config.latent_channels), key=mx.random.key(seed))


@pytest.mark.parametrize("name", ["small4", "small3"])
@pytest.mark.parametrize("h, w, strip", [
    # `strip`: rows of the heaviest stage; every other stage takes its own (stage_rows)
    (13, 7, 8),  # the fewest rows: several strips at every resolution
    (13, 7, 24),  # heights that do not divide the stages' (evened-out strips)
    (12, 10, 32),
    (6, 9, 40),
    (5, 6, 64),  # taller than the image: one strip per stage
])
def test_strips_equal_the_whole_decode(vae_dirs, name, h, w, strip):
    vae = load_vae(vae_dirs[name], dtype=mx.float32)
    z = latents(vae, h, w, seed=h * w + strip)
    whole = np.array(vae.decode(z))
    for ex in (Execution(), STRICT, AHEAD, OVERLAPPED):  # one graph, strip by strip, two strips in flight
        got = np.array(vae.decode(z, strip=strip, execution=ex))
        assert got.shape == whole.shape
        assert np.abs(got - whole).max() <= 1e-5 * np.abs(whole).max(), (ex, np.abs(got - whole).max())


def test_strips_in_float16_and_batches(vae_dirs):
    vae = load_vae(vae_dirs["small4"], dtype=mx.float16)
    f = 2 * vae.decoder_factor
    tokens = mx.random.normal((2, 9 * 5, vae.config.patched_channels), key=mx.random.key(7))
    whole = np.array(vae.decode_tokens(tokens, 9 * f, 5 * f, execution=STRICT))
    got = np.array(vae.decode_tokens(tokens, 9 * f, 5 * f, execution=OVERLAPPED, strip=24))
    assert rel_err(got, whole) <= 2e-3


@pytest.mark.parametrize("name", ["small4", "small3"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_strips_match_diffusers(vae_dirs, name, dtype):
    ref, ours = RefVAE.from_pretrained(vae_dirs[name]).eval(), load_vae(vae_dirs[name], dtype=dtype)
    torch.manual_seed(5)
    z = torch.randn(1, ours.config.latent_channels, 14, 6)  # several strips per stage, non-square
    with torch.no_grad():
        want = ref.decode(z).sample.permute(0, 2, 3, 1).numpy()
    got = np.array(ours.decode(mx.array(z.permute(0, 2, 3, 1).numpy()), strip=16, execution=OVERLAPPED))
    assert rel_err(got, want) <= REL_REF[dtype]


def test_strip_options_are_checked(vae_dirs):
    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    z = latents(vae, 4, 4, seed=0)
    for bad in ({"strip": 12}, {"strip": 0}, {"strip": 16, "tile_size": 64}, {"strip": 8.0}):
        with pytest.raises(BonsaiError, match="strip"):
            vae.decode(z, **bad)
    assert spans(10, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)] and spans(4, 8) == [(0, 4)]


def test_held_bytes_counts_the_widest_stage(vae_dirs):
    """FLUX.2's decoder (512, 512, 256, 128 channels up): the full-resolution resnets after
    the first hold their 128-channel input and conv1's 128-channel output; the first one
    reads the last upsampler lazily, holding its 256-channel input at a quarter of the
    pixels instead of its output; float16, 1024 px."""
    assert held_bytes(VAEConfig(), 1024, 1024, 2) == 1024 * 1024 * (128 + 128) * 2
    vae = load_vae(vae_dirs["small4"], dtype=mx.float16)
    assert vae_held_per_pixel(vae) * 64 * 48 == held_bytes(vae.config, 64, 48, 2)


def _block_moments_in_the_harness(monkeypatch, calls=None):
    """As on a GPU back-end: 16-bit strips' moments from the block_moments kernel and whole
    tensors' from column_moments, their exact Metal sources run by the CPU harness (in few
    row blocks: the harness runs a thread per GPU thread)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from kernel_helpers import run_block_moments, run_moments

    def block_moments(x, backend=None):
        if calls is not None:
            calls.append((backend, x.dtype))
        return run_block_moments(x, values=512)

    monkeypatch.setattr(kernels, "moments_backend", lambda dt: "metal" if dt in (mx.float16, mx.bfloat16) else None)
    monkeypatch.setattr(kernels, "block_moments", block_moments)
    monkeypatch.setattr(kernels, "column_moments", lambda x, mean=None, backend=None: mx.array(
        run_moments(x, mean, threads=1024).astype(np.float32)))


@pytest.mark.parametrize("kernel", [False, True])
def test_strip_moments_merge_into_the_group_statistics(kernel, monkeypatch):
    """Per-channel moments of uneven strips, merged per group, equal the group mean and
    variance of the whole tensor in float64. Channels of one group get far-apart means
    (offset 300, spread 40 between channels, 0.5 within): a merge that dropped the spread
    between channels or strips, or subtracted E[x]^2 from E[x^2] in float32, misses the
    variance by far more than the bound (relative 1e-5, float32 sums of 10^3 values).
    With the block-moments kernel (`kernel`: float16 strips, several row blocks a strip and
    blocks of no rows) the same, against the float16 values' float64 statistics."""
    from bonsai_mlx.vae_strips import _merged, _moments

    B, H, W, C, G = 2, 23, 9, 12, 3
    rng = np.random.default_rng(5)
    chan = 300 + 40 * rng.standard_normal((B, 1, 1, C))
    x = (chan + 0.5 * rng.standard_normal((B, H, W, C))).astype(np.float32)
    if kernel:
        calls = []
        _block_moments_in_the_harness(monkeypatch, calls)
        x = x.astype(np.float16)
    parts = [_moments(mx.array(x[:, a:b])) for a, b in ((0, 7), (7, 8), (8, 23))]
    if kernel:
        assert len(calls) == 3 and any(0 in counts for counts, _, _ in parts)
    mean, var = (np.array(v) for v in _merged(parts, G))
    g = x.astype(np.float64).reshape(B, H * W, G, C // G).transpose(0, 2, 1, 3).reshape(B, G, -1)
    np.testing.assert_allclose(mean, g.mean(-1), rtol=1e-6)
    np.testing.assert_allclose(var, g.var(-1), rtol=1e-5)


def test_a_strips_block_counts_are_made_once_per_shape():
    """A decode's strips repeat a few shapes hundreds of times, and building a strip's 128
    block counts, or a stage's thousands as an array, took longer on the host than the
    launch's GPU work (docs/benchmarks.md, c94): the counts of a shape are one cached tuple,
    and a merge reuses each part's count column, so merging the same stage again builds none."""
    from bonsai_mlx.vae_strips import _counted, _merged

    assert kernels.block_counts(32 * 1024, 128) is kernels.block_counts(32 * 1024, 128)
    counts = kernels.block_counts(96, 8)
    parts = [(counts, mx.ones((1, 8, 4)), mx.zeros((1, 8, 4))) for _ in range(3)]
    _merged(parts, 2)
    before = _counted.cache_info()
    mean, var = _merged(parts, 2)
    after = _counted.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 3
    np.testing.assert_allclose(np.array(mean), np.full((1, 2), 1 / 12), rtol=1e-6)  # sums 1 over 12 rows a block
    assert float(np.abs(np.array(var)).max()) < 1e-6  # every block's mean equal, no deviation within
    # A count column cached by one thread serves a decode on another (each thread has its own
    # streams): built here and never evaluated here, merged and evaluated there.
    fresh = kernels.block_counts(97, 8)
    _counted(fresh)
    out = []
    worker = threading.Thread(target=lambda: out.append([np.array(v) for v in _merged(
        [(fresh, mx.ones((1, 8, 4)), mx.zeros((1, 8, 4)))], 2)]))  # the variance reads the counts
    worker.start()
    worker.join()
    assert len(out) == 1 and all(np.isfinite(v).all() for v in out[0])


def test_strips_with_the_block_moments_kernel_equal_the_strips_without(vae_dirs, monkeypatch):
    """A float16 strip decode whose statistics come from the block_moments kernel (Metal source
    in the CPU harness) is the same strips' decode with float32-copy statistics within the
    float16 strip bound (the statistics differ in summation order only; measured 1.6e-3 in
    norm), and diffusers' within the float16 parity bound; every 16-bit strip goes through
    the kernel."""
    ref, vae = RefVAE.from_pretrained(vae_dirs["small4"]).eval(), load_vae(vae_dirs["small4"], dtype=mx.float16)
    torch.manual_seed(5)
    z = torch.randn(1, vae.config.latent_channels, 14, 6)
    with torch.no_grad():
        want = ref.decode(z).sample.permute(0, 2, 3, 1).numpy()
    zm = mx.array(z.permute(0, 2, 3, 1).numpy())
    copies = np.array(vae.decode(zm, strip=16, execution=OVERLAPPED))
    calls = []
    _block_moments_in_the_harness(monkeypatch, calls)
    got = np.array(vae.decode(zm, strip=16, execution=OVERLAPPED))
    assert calls and set(calls) == {("metal", mx.float16)}
    assert rel_err(got, copies) <= 2e-3
    assert rel_err(got, want) <= REL_REF[mx.float16]


def test_stage_rows_keep_low_resolutions_whole():
    """FLUX.2's decoder over a 1024 px image in 32-row strips: the first full-resolution
    resnet (which also computes the lazily read upsampler) runs in 32-row strips, the
    other full-resolution stages in taller ones, the lowest resolution's resnets whole and
    the next one's in at most three strips; every stage's strips are evened out (none a sliver)."""
    from bonsai_mlx.vae import Decoder
    from bonsai_mlx.vae_strips import _stages

    stages = _stages(Decoder(VAEConfig()))
    rows = stage_rows(stages, 128, 128, 32)
    kinds = [k for k, _ in stages]
    first_full = kinds.index("lazy_upsample") + 1
    assert rows[first_full] == 32
    assert all(r > 32 for r in rows[first_full + 1:])
    heights = [128] * 3 + [256] * 4 + [512] * 4 + [1024] * 5  # of each stage's output
    for kind, r, h in zip(kinds, rows, heights):
        n = -(-h // r)
        if h <= 256 and kind == "resnet":
            assert n <= h // 128 * 1.5, (kind, r, h)  # 128 rows: whole; 256 rows: at most 3 strips
        assert h - (n - 1) * r > r - n, (kind, r, h)  # the last strip is within n rows of the others


def test_the_last_upsampler_is_never_held(vae_dirs, monkeypatch):
    """The decoder's last upsampler, into the full resolution, is read lazily: no held
    tensor is made of its output (the upsamplers before it are held), and the decode still
    equals the whole one."""
    from bonsai_mlx import vae_strips

    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    held, (run, *rest) = [], vae_strips._KINDS["upsample"]
    monkeypatch.setitem(vae_strips._KINDS, "upsample",
                        (lambda m, x, *a: held.append(2 * x.shape[1]) or run(m, x, *a), *rest))
    z = latents(vae, 5, 3, seed=1)
    got = np.array(vae.decode(z, strip=8, execution=STRICT))
    H = 5 * vae.decoder_factor
    assert held == [H // 4, H // 2], held  # the 4-level decoder's first two upsamplers only
    whole = np.array(vae.decode(z))
    assert np.abs(got - whole).max() <= 1e-5 * np.abs(whole).max()


def test_strips_hold_less_than_a_stage_and_its_output(vae_dirs):
    """The up path in 8-row strips (small4, float32, 512 px) peaks (everything it allocates
    counted) under what one full-resolution resnet's input, conv1's output and output would
    hold, and within 1.5x of `held_bytes`: a stage drops its input's strips as it writes its
    output, and the last upsampler's output is never held whole (measured 20.6 MB against
    16.8 MB held; holding them, 27.0 MB)."""
    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    side, top = 512, vae.config.decoder_channels[0]
    h = mx.random.normal((1, side // 8, side // 8, vae.config.decoder_channels[-1]), key=mx.random.key(1))
    mx.eval(h)
    peak = measured_peak(lambda: up_strips(vae.decoder, h, 8, STRICT.pace()), base=True)
    assert peak < side * side * 3 * top * 4, peak
    assert peak <= 1.5 * held_bytes(vae.config, side, side, 4), peak


def test_strips_built_ahead_hold_what_strict_strips_hold(vae_dirs):
    """Each part built while the one before runs, and started once it is done, allocates
    nothing early: on a back-end that frees a finished part's buffers before the wait for it
    returns (this CPU), the up path in 8-row strips and the whole decode block by block peak
    as they do evaluated part by part (small4, float32, 512 px; within 2% and 64 KB for the
    back-end's own scratch), and give the same image. (On MLX's CUDA back-end, which releases
    them later, they peaked up to two parts' worth: plans run ahead only with the pacer's
    flush, test_planned_decodes_run_ahead_only_where_the_flush_holds_them.)"""
    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    side = 512
    h = mx.random.normal((1, side // 8, side // 8, vae.config.decoder_channels[-1]), key=mx.random.key(2))
    z = latents(vae, side // 8, side // 8, seed=3)
    mx.eval(h, z)
    runs = {"strips": lambda ex: up_strips(vae.decoder, h, 8, ex.pace()),
            "whole": lambda ex: vae.decode(z, execution=ex)}
    for name, fn in runs.items():
        strict = measured_peak(lambda: fn(STRICT), base=True)
        ahead = measured_peak(lambda: fn(AHEAD), base=True)
        assert ahead <= 1.02 * strict + (1 << 16), (name, ahead, strict)
        np.testing.assert_array_equal(np.array(fn(AHEAD)), np.array(fn(STRICT)))


def test_a_decode_ahead_settles_before_its_attention_evaluates_outside_the_pacer(vae_dirs, monkeypatch):
    """The mid block's attention evaluates its query chunks itself: decoding ahead, the part in
    flight is waited for first (`Pace.settle` right before it), as it is after the last up
    block, before the output norm and conv that the caller evaluates."""
    from bonsai_mlx import execution
    from bonsai_mlx import vae as vae_module

    events, settle, sdpa, paced = [], execution.Pace.settle, vae_module.sdpa, execution.Pace.__call__
    monkeypatch.setattr(execution.Pace, "settle", lambda self: events.append("settle") or settle(self))
    monkeypatch.setattr(execution.Pace, "__call__", lambda self, *a, **k: events.append("part") or paced(self, *a, **k))
    monkeypatch.setattr(vae_module, "sdpa", lambda *a, **k: events.append("sdpa") or sdpa(*a, **k))
    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    mx.eval(vae.decode(latents(vae, 4, 3, seed=9), execution=AHEAD))
    assert "sdpa" in events and all(events[i - 1] == "settle" for i, e in enumerate(events) if e == "sdpa")
    assert events.count("settle") == events.count("sdpa") + 1  # and after the last up block


def test_planned_decodes_run_ahead_only_where_the_flush_holds_them(monkeypatch):
    """A plan's VAE runs its one-at-a-time parts ahead only in a paced decode whose flush is
    measured to hold the stage to its estimate (MLX's CUDA back-end); elsewhere (Metal, this
    CPU, image encoding, a plan without estimates) each part is evaluated before the next is
    built; two at a time where the plan says so."""
    from bonsai_mlx import memory

    est = dict(stage_estimates={"decoding": 10**9}, vae_part_bytes=10**8)
    one, two = MemoryPlan(sync=True, overlap=False, **est), MemoryPlan(sync=True, overlap=True, **est)
    assert not one.vae_execution.ahead and not one.vae_execution.overlap and two.vae_execution.overlap
    for measured in (False, True):
        monkeypatch.setattr(memory, "flush_measured", lambda: measured)
        assert one.paced_vae_execution().ahead == measured
        assert one.paced_vae_execution().flush_above == 9 * 10**8
        assert not MemoryPlan(sync=True).paced_vae_execution().ahead  # no estimates: no flush
        assert two.paced_vae_execution().overlap and not two.paced_vae_execution().ahead


# ----------------------------------------------------------------------------- the planner

def footprint(vae, **kw) -> Footprint:
    """A footprint whose decode stage dominates: tiny other models, this VAE calibrated."""
    fit = calibrate_vae(vae)
    return Footprint(transformer_bytes=1 << 20, transformer_dim=64, transformer_mlp=128, transformer_heads=2,
                     transformer_max_out=256, reference_matmul=False, text_resident_bytes=1 << 20,
                     text_stream_bytes=1 << 19, text_hidden=64, text_heads=2, text_len=8,
                     vae_bytes=sum(v.nbytes for _, v in tree_flatten(vae.parameters())),
                     vae_mid_channels=vae.config.decoder_channels[-1], fused_attention=True,
                     dtype_bytes=vae.dtype.size, vae_held_per_pixel=vae_held_per_pixel(vae), **fit, **kw)


def test_strips_come_before_tiles_and_cost_little():
    plans = candidate_plans(1024, 1024)
    assert not any(p.vae_strip and p.vae_tile for p in plans)
    assert {p.vae_strip for p in plans} == {None, 256, 128, 64, 32, 16}
    for strip in (256, 16):  # every strip plan costs less than the cheapest tile plan
        assert plan_cost(MemoryPlan(vae_strip=strip)) < min(plan_cost(p) for p in plans if p.vae_tile)
    assert max(p.vae_strip or 0 for p in candidate_plans(512, 256)) == 128  # only strips below the height


def test_planner_picks_strips_where_tiles_were_needed(vae_dirs, monkeypatch):
    """1024x1024 under a budget below the whole decode's estimate: without strips the
    planner could only tile; now it decodes in strips, and the strip decode it chose peaks
    (mx.get_peak_memory, everything live counted) under the decoding stage's estimate and
    equals diffusers' decode in float64 within 2e-4 (relative, in norm)."""
    from bonsai_mlx import memory

    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    W = H = 1024
    fp = footprint(vae)
    whole_plans = [p for p in candidate_plans(W, H) if not (p.vae_tile or p.vae_strip)]
    budget = min(max(estimate(fp, W, H, p).values()) for p in whole_plans) - 1  # no whole decode fits
    with monkeypatch.context() as m:
        m.setattr(memory, "VAE_STRIPS", ())
        assert plan_memory(fp, W, H, budget).vae_tile  # what the planner did before strips
    memory.forget_plans()
    plan = plan_memory(fp, W, H, budget)
    assert plan.vae_strip and not plan.vae_tile, plan
    z = latents(vae, H // 8, W // 8, seed=3)
    mx.eval(z)
    mx.synchronize()
    mx.reset_peak_memory()
    got = vae.decode(z, strip=plan.vae_strip, execution=plan.execution)
    mx.eval(got)
    peak = mx.get_peak_memory()
    assert peak <= plan.stage_estimates["decoding"], (peak, plan.stage_estimates["decoding"])
    # At this size float32 itself is the error: against diffusers in float64 the strips are
    # 7e-5 off (relative, in norm), our whole decode 5.5e-4 (its GroupNorm sums run over a
    # million pixels at once; the strips' over one strip, merged).
    ref = RefVAE.from_pretrained(vae_dirs["small4"]).eval().double()
    with torch.no_grad():
        want = ref.decode(torch.tensor(np.array(z)).permute(0, 3, 1, 2).double()).sample.permute(0, 2, 3, 1).numpy()
    assert rel_err(np.array(got), want) <= 2e-4


def test_estimate_covers_small_strips_at_a_wider_size(vae_dirs):
    """The calibration fits two small decodes; the estimate holds at a size and strip
    neither of them had (a 1-latent-row strip over a wide image), strict and overlapped."""
    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    fp = footprint(vae)
    W, H = 384, 128
    z = latents(vae, H // 8, W // 8, seed=4)
    mx.eval(z)
    for strip in (8, 40):
        for overlap in (False, True):
            plan = MemoryPlan(sync=True, overlap=overlap, vae_strip=strip)
            mx.synchronize()
            mx.reset_peak_memory()
            mx.eval(vae.decode(z, strip=strip, execution=plan.execution))
            peak = mx.get_peak_memory()
            assert peak <= estimate(fp, W, H, plan)["decoding"], (strip, overlap, peak)


def test_raw_decode_equals_unpatchified_tokens(vae_dirs):
    """decode_tokens passes strips through: same as decoding the unpacked latents."""
    vae = load_vae(vae_dirs["small3"], dtype=mx.float32)
    f = 2 * vae.decoder_factor
    tokens = mx.random.normal((1, 4 * 3, vae.config.patched_channels), key=mx.random.key(2))
    z = unpatchify(vae.denormalize(tokens.reshape(1, 4, 3, -1)))
    img = np.array(vae.decode_tokens(tokens, 4 * f, 3 * f, strip=8, execution=STRICT))
    raw = np.array(vae.decode(z, strip=8, execution=STRICT))
    np.testing.assert_allclose(img, np.clip(raw / 2 + 0.5, 0, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("section, what", [("strips", "vae decode"), ("encode", "vae encode")])
def test_profile_command_for_the_gpu(tmp_path, section, what):
    """examples/profile_speed.py --sections strips / encode (what times strips against the
    whole decode and tiles, strip encodes against the whole encode, on a GPU), at a tiny size
    on this CPU: every way is recorded in both 16-bit dtypes with its time, extra peak and
    estimate, the estimate covers the peak, and strips stay near the whole run (in float16 /
    bfloat16 a strip's convolutions round differently, 16 / 8 mantissa bits: measured 2.9e-3
    / 1.2e-2 relative in norm on this random decoder's image, 2.7e-3 / 1.8e-2 on this random
    encoder's normalized tokens; the whole decode's three executions agree exactly)."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    out = tmp_path / f"{section}.json"
    r = subprocess.run([sys.executable, "examples/profile_speed.py", "--sections", section, "--tiny", "--quick",
                        "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr
    rows = [x for x in json.loads(out.read_text()) if x["name"].startswith(what + " ")]
    assert not [x for x in rows if "err" in x]
    assert {(x["dtype"], x["strip"] is not None) for x in rows} == {(d, s) for d in ("float16", "bfloat16")
                                                                    for s in (False, True)}
    for x in rows:
        assert x["ms"] > 0 and x["extra_peak_mb"] > 0
        if x["estimate_mb"] is not None:
            assert x["estimate_mb"] >= x["extra_peak_mb"], x["name"]
        assert x["rel_diff_vs_whole"] <= ({"float16": 1e-2, "bfloat16": 4e-2}[x["dtype"]] if x["strip"] else 0)


# ----------------------------------------------------------------------------- encoding

def image(vae, h, w, seed, batch=1):
    """[B, h*f, w*f, 3] in [-1, 1]: h x w latent rows and columns."""
    f = vae.encoder_factor
    return 2 * mx.random.uniform(shape=(batch, h * f, w * f, 3), key=mx.random.key(seed)) - 1


@pytest.mark.parametrize("name", ["small4", "small3"])
@pytest.mark.parametrize("h, w, rows", [
    # `rows` x f: rows of the heaviest stage; every other stage takes its own (stage_rows)
    (13, 7, 1),  # the fewest rows: several strips at every resolution
    (13, 7, 3),  # heights that do not divide the stages' (evened-out strips)
    (12, 10, 4),
    (6, 9, 5),
    (5, 6, 8),  # taller than the image: one strip per stage
])
def test_strips_equal_the_whole_encode(vae_dirs, name, h, w, rows):
    vae = load_vae(vae_dirs[name], dtype=mx.float32)
    x = image(vae, h, w, seed=h * w + rows)
    whole = np.array(vae.encode_latents(x))
    for ex in (Execution(), STRICT, AHEAD, OVERLAPPED):  # one graph, strip by strip, two strips in flight
        got = np.array(vae.encode_latents(x, strip=rows * vae.encoder_factor, execution=ex))
        assert got.shape == whole.shape
        assert np.abs(got - whole).max() <= 1e-5 * np.abs(whole).max(), (ex, np.abs(got - whole).max())


def test_encode_strips_in_float16_and_batches(vae_dirs):
    vae = load_vae(vae_dirs["small4"], dtype=mx.float16)
    f = 2 * vae.encoder_factor
    pixels = mx.random.uniform(shape=(2, 9 * f, 5 * f, 3), key=mx.random.key(7))
    whole = np.array(vae.encode(pixels))
    got = np.array(vae.encode(pixels, strip=24, execution=OVERLAPPED))
    assert got.shape == whole.shape == (2, 9 * 5, vae.config.patched_channels)
    assert rel_err(got, whole) <= 2e-3


@pytest.mark.parametrize("name", ["small4", "small3"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_encode_strips_match_diffusers(vae_dirs, name, dtype):
    ref, ours = RefVAE.from_pretrained(vae_dirs[name]).eval(), load_vae(vae_dirs[name], dtype=dtype)
    f = ours.encoder_factor
    torch.manual_seed(5)
    x = torch.rand(1, 3, 14 * f, 6 * f) * 2 - 1  # several strips per stage, non-square
    with torch.no_grad():
        want = ref.encode(x).latent_dist.mode().permute(0, 2, 3, 1).numpy()
    got = np.array(ours.encode_latents(mx.array(x.permute(0, 2, 3, 1).numpy()), strip=2 * f, execution=OVERLAPPED))
    assert rel_err(got, want) <= REL_REF[dtype]


def test_encode_strip_options_are_checked(vae_dirs):
    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    x = image(vae, 4, 4, seed=0)
    for bad in (12, 0, -8, 8.0):
        with pytest.raises(BonsaiError, match="strip"):
            vae.encode_latents(x, strip=bad)


def test_encode_held_bytes_counts_the_widest_stage(vae_dirs):
    """FLUX.2's encoder (128, 256, 512, 512 channels down): the full-resolution resnets hold
    their 128-channel input and conv1's output; float16, 1024 px."""
    assert encode_held_bytes(VAEConfig(), 1024, 1024, 2) == 1024 * 1024 * (128 + 128) * 2
    vae = load_vae(vae_dirs["small4"], dtype=mx.float16)
    assert vae_enc_held_per_pixel(vae) * 64 * 48 == encode_held_bytes(vae.config, 64, 48, 2)


def encode_footprint(vae) -> Footprint:
    """`footprint` with the encoder calibrated too: the image-encoding stage dominates."""
    return footprint(vae, vae_enc_held_per_pixel=vae_enc_held_per_pixel(vae), latent_channels=4 * 4,
                     **calibrate_vae_encoder(vae))


def measured_peak(fn, base: bool = False):
    """mx.get_peak_memory() over fn's evaluation; with `base`, less what was live before."""
    mx.synchronize()
    before = mx.get_active_memory() if base else 0
    mx.reset_peak_memory()
    mx.eval(fn())
    mx.synchronize()
    return mx.get_peak_memory() - before


def test_encode_strips_are_candidates_and_cost_little():
    plans = candidate_plans(512, 512, encode_height=384)
    assert {p.vae_encode_strip for p in plans} == {None, 256, 128, 64, 32, 16}
    assert {p.vae_encode_strip for p in candidate_plans(512, 512)} == {None}  # nothing to encode
    assert plan_cost(MemoryPlan(vae_encode_strip=256)) < plan_cost(MemoryPlan(stream_text_encoder=True))
    assert plan_cost(MemoryPlan(vae_encode_strip=16)) < plan_cost(MemoryPlan(vae_tile=1024))


def test_estimate_covers_strip_encodes(vae_dirs):
    """The calibration fits two small encodes; the estimate of the image-encoding stage
    holds (mx.get_peak_memory, everything live counted) at sizes and strips neither had,
    strict and overlapped, whole and in strips."""
    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    fp = encode_footprint(vae)
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
    fp, images = encode_footprint(vae), ((1024, 1024),)
    whole = [p for p in candidate_plans(256, 256, encode_height=1024) if not p.vae_encode_strip]
    budget = min(max(estimate(fp, 256, 256, p, images=images).values()) for p in whole) - 1
    plan = plan_memory(fp, 256, 256, budget, images=images)
    assert plan.vae_encode_strip, plan
    pixels = mx.random.uniform(shape=(1, 1024, 1024, 3), key=mx.random.key(9))
    mx.eval(pixels)
    peak = measured_peak(lambda: vae.encode(pixels, strip=plan.vae_encode_strip, execution=plan.vae_execution))
    assert peak <= plan.stage_estimates["image_encoding"], (peak, plan.stage_estimates["image_encoding"])
    got = np.array(vae.encode_latents(2 * pixels - 1, strip=plan.vae_encode_strip, execution=plan.vae_execution))
    ref = RefVAE.from_pretrained(vae_dirs["small4"]).eval().double()
    with torch.no_grad():
        x = torch.tensor(np.array(2 * pixels - 1)).permute(0, 3, 1, 2).double()
        want = ref.encode(x).latent_dist.mode().permute(0, 2, 3, 1).numpy()
    assert rel_err(got, want) <= 2e-4, (rel_err(got, want), rel_err(np.array(vae.encode_latents(2 * pixels - 1)), want))


def test_auto_encodes_in_strips_where_the_whole_encode_is_the_peak(vae_dirs):
    """The auto budget encodes a reference in strips when its whole encode would be the
    run's peak stage, and keeps the whole encode otherwise; a byte budget below the whole
    encode's estimate takes strips."""
    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    fp = encode_footprint(vae)
    whole = next(p for p in candidate_plans(64, 64, encode_height=1024) if not p.vae_encode_strip)
    est = estimate(fp, 64, 64, whole, images=((1024, 1024),))
    assert max(est, key=est.get) == "image_encoding"
    auto = plan_memory(fp, 64, 64, AUTO, images=((1024, 1024),))
    assert auto.vae_encode_strip and auto.stage_estimates["image_encoding"] < est["image_encoding"]
    small = plan_memory(fp, 256, 256, AUTO, images=((64, 64),))
    small_est = estimate(fp, 256, 256, replace(small, vae_encode_strip=None), images=((64, 64),))
    assert max(small_est, key=small_est.get) != "image_encoding" and small.vae_encode_strip is None
    tight = plan_memory(fp, 64, 64, int(0.5 * max(est.values())), images=((1024, 1024),))
    assert tight.vae_encode_strip and tight.estimated_peak_bytes <= 0.5 * max(est.values())


def test_calibration_takes_the_least_of_its_runs_of_each_measurement(vae_dirs, monkeypatch):
    """With several runs (as on a GPU: memory.calibration_runs), an excess in one run's peak
    (here 64 MB added to one run in three) does not reach the fitted figures: they are those
    of the same runs without it, to within the runs' own spread (kilobytes here, set by the
    order in which the CPU's threads free and allocate; bounded at 1 MB against the 64 MB, and
    a pixel's figures at 5% or two activations of the decoder's widest stage, float32, as
    test_the_calibration_waits_for_the_part_before_to_be_released bounds them).
    With one run the excess goes into the fit, which is what the repeats are for."""
    import bonsai_mlx.memory as memory

    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    mx.clear_cache()  # each calibration from the same buffer cache: what it holds moves the peaks by kilobytes
    clean = calibrate_vae(vae, runs=3)
    peak, calls = mx.get_peak_memory, [0]

    def spiky_peak():
        calls[0] += 1
        return peak() + (64 << 20) * (calls[0] % 3 == 2)

    monkeypatch.setattr(memory.mx, "get_peak_memory", spiky_peak)
    mx.clear_cache()
    spiky = calibrate_vae(vae, runs=3)
    assert calls[0] == 3 * 8  # 8 measurements (attention, mid, up at two sizes; strips at two), 3 runs each
    activation = 2 * 4 * max(vae.config.decoder_channels)
    for key, value in clean.items():
        assert spiky[key] == pytest.approx(value, rel=0.05, abs=(1 << 20) if key.endswith("fixed") else activation), key
    single = calibrate_vae(vae, runs=1)  # measurements 2, 5 and 8 of this call carry the excess
    assert max(abs(single[k] - clean[k]) for k in clean if k.endswith("fixed")) > 32 << 20


def test_calibration_repeats_its_runs_off_the_cpu(monkeypatch):
    import bonsai_mlx.memory as memory

    assert memory.calibration_runs() == (1 if mx.default_device() == mx.cpu else 3)
    monkeypatch.setattr(memory.mx, "default_device", lambda: mx.gpu)
    assert memory.calibration_runs() == 3


def test_the_calibration_waits_for_the_part_before_to_be_released(vae_dirs, monkeypatch):
    """By default each part of a calibration waits for the device and its buffer releases
    (mx.synchronize, the pacer's flush) before the next is built: on a GPU back-end the
    buffers of a finished part are released after the wait for it returns, and a peak that
    holds them is not the steady scratch that plans are estimated with. On a CPU the
    figures are those of the calibration without the flush, within 5% or two activations of
    the decoder's widest stage per pixel (float32), the larger: the CPU stream frees a buffer
    before or after the next part allocates as the machine's load has it, which moves a
    fitted figure by about one activation a pixel."""
    vae = load_vae(vae_dirs["small4"], dtype=mx.float32)
    sync, calls = mx.synchronize, [0]

    def counted(*args):
        calls[0] += 1
        return sync(*args)

    monkeypatch.setattr(mx, "synchronize", counted)
    mx.clear_cache()
    plain = calibrate_vae(vae, runs=1, flush=False)
    assert calls[0] == 2 * 8  # the measurement's own, around each of its 8 (as counted above)
    calls[0] = 0
    mx.clear_cache()
    flushed = calibrate_vae(vae, runs=1)
    assert calls[0] >= 2 * 8 + 3 * 8  # the decoder's parts (mid, up, strips) each wait
    activation = 2 * 4 * max(vae.config.decoder_channels)
    for key, value in plain.items():
        assert flushed[key] == pytest.approx(value, rel=0.05, abs=(1 << 20) if key.endswith("fixed") else activation), key
