"""Memory measurement and budgeted generation."""

import time

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx import BonsaiPipeline
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.memory import MemoryMonitor, MemoryPlan, estimate, parse_bytes, trapezoid_mean
from fixtures import make_pipeline as mp

# Tiled VAE decoding ("exact" tile statistics) stays within 0.5/255 of the whole decode
# (tests/test_vae.py); a budgeted run may differ from an unconstrained one by no more.
TILING_BOUND = 0.5 / 255


@pytest.mark.parametrize("text, value", [
    ("1.5GB", 1_500_000_000), ("1500MB", 1_500_000_000), ("2 GiB", 2 * 2**30), (1024, 1024), ("64kb", 64_000),
])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["lots", "-1GB", "1.5 parsecs", 0])
def test_parse_bytes_rejects(bad):
    with pytest.raises(BonsaiError, match="budget"):
        parse_bytes(bad)


def test_trapezoid_mean():
    # 0 B for 1 s, then a ramp to 100 B over 1 s: area 0 + 50 = 50 over 2 s
    assert trapezoid_mean([(0.0, 0), (1.0, 0), (2.0, 100)]) == 25.0
    assert trapezoid_mean([(0.0, 7)]) == 7.0


def test_monitor_samples_every_50ms_and_records_stage_peaks():
    with MemoryMonitor() as mon:
        with mon.stage("big"):
            a = mx.zeros((4096, 4096), dtype=mx.float32)  # 64 MiB
            mx.eval(a)
            time.sleep(0.4)
            del a
        with mon.stage("small"):
            b = mx.zeros((256,), dtype=mx.float32)
            mx.eval(b)
            time.sleep(0.1)
    rep = mon.report
    big, small = rep.stages
    assert big.peak_bytes >= 64 * 2**20 > small.peak_bytes
    assert big.mean_active_bytes > 32 * 2**20  # the array was live for most of the stage
    times = [t for t, _ in rep.samples]
    assert len(times) >= 8 and np.median(np.diff(times)) < 0.1


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    _, path = mp.make_pipeline(tmp_path_factory.mktemp("mem") / "tiny", seed=5)
    return BonsaiPipeline.from_pretrained(path, dtype=mx.float32, text_layers=mp.TEXT_LAYERS)


def smallest_plan(pipe, w, h):
    with pytest.raises(BonsaiError, match="at least") as e:
        pipe.plan(w, h, memory_budget=1)
    gb = float(str(e.value).split("at least ")[1].split(" GB")[0])
    return pipe.plan(w, h, memory_budget=f"{gb}GB"), gb


def test_frugal_plan_gives_the_same_image(pipe):
    """Streamed encoder, transformer released and reloaded, chunked attention, tiled VAE."""
    W, H = 512, 256  # big enough (in tokens and pixels) for chunked attention and VAE tiles
    frugal = MemoryPlan(stream_text_encoder=True, keep_transformer=False, vae_tile=256, attention_chunk=256)
    free = pipe.generate("a pine in snow", width=W, height=H, seed=3)
    budgeted = pipe.generate("a pine in snow", width=W, height=H, seed=3, plan=frugal)
    assert budgeted.plan == frugal
    diff = np.abs(budgeted.array - free.array).max()
    assert diff <= TILING_BOUND, f"{diff * 255:.3f}/255"
    assert not pipe.text_encoder.resident and pipe.transformer is None  # released after the run
    again = pipe.generate("a pine in snow", width=W, height=H, seed=3)  # reloads what it needs
    np.testing.assert_array_equal(again.array, free.array)


def test_smallest_budget_is_honoured(pipe):
    W, H = 512, 256
    plan, gb = smallest_plan(pipe, W, H)
    assert plan != pipe.plan(W, H, memory_budget="100GB")  # the budget changed how it runs
    original = mx.set_cache_limit(10**12)
    result = pipe.generate("a pine in snow", width=W, height=H, seed=3, memory_budget=f"{gb}GB")
    assert result.plan == plan
    assert set(result.memory["stages"]) == {"text_encoding", "denoising", "decoding"}
    assert result.memory["peak_gb"] <= gb  # measured with mx.get_peak_memory per stage
    for stage, est in plan.stage_estimates.items():  # and stage by stage, not just overall
        assert result.memory["stages"][stage]["peak_gb"] * 1e9 <= est, stage
    # MLX's buffer cache was held to the plan's headroom, and given back its limit afterwards
    assert result.memory["cache_limit_bytes"] == int(gb * 1e9) - plan.estimated_peak_bytes
    assert mx.set_cache_limit(original) == 10**12
    assert not pipe.text_encoder.resident  # evicted before denoising under a budget


def test_dequantized_encoder_is_counted(pipe):
    """The CPU speed path holds dense encoder weights: the text stage's estimate grows by them."""
    plain = pipe.footprint()
    pipe.text_encoder.dequantize_matmuls = True
    try:
        fp = pipe.footprint()
    finally:
        pipe.text_encoder.dequantize_matmuls = False
    args = pipe.text_encoder.config.args
    assert fp.text_dequant_bytes >= args.intermediate_size * args.hidden_size * 4 > 0 == plain.text_dequant_bytes
    plan = MemoryPlan(stream_text_encoder=True)
    grow = estimate(fp, 256, 256, plan)["text_encoding"] - estimate(plain, 256, 256, plan)["text_encoding"]
    assert grow >= fp.text_dequant_bytes


def test_impossible_budget_is_refused_up_front(pipe):
    t = time.perf_counter()
    with pytest.raises(BonsaiError, match=r"does not fit a memory budget of 0.00 GB.*Use a budget of at least"):
        pipe.generate("x", width=256, height=256, memory_budget="1MB")
    assert time.perf_counter() - t < 2  # nothing was run


def test_cli_memory_budget_and_verbose(tmp_path):
    import subprocess
    import sys
    _, path = mp.make_pipeline(tmp_path / "tiny", text_layers=(9, 18, 27))
    run = lambda *a: subprocess.run([sys.executable, "-m", "bonsai_mlx", "generate", "x", "--model", path,
                                     "-o", tmp_path / "o.png", "--width", "64", "--height", "64", *a],
                                    capture_output=True, text=True, timeout=600)
    r = run("--memory-budget", "1KB")
    assert r.returncode == 2 and "Use a budget of at least" in r.stderr and "Traceback" not in r.stderr
    r = run("--memory-budget", "4GB", "-v")
    assert r.returncode == 0, r.stderr
    assert "memory: peak" in r.stderr and "denoising:" in r.stderr and "mean-active" in r.stderr
    assert "memory plan: " in r.stderr and "estimated peaks: text_encoding" in r.stderr
