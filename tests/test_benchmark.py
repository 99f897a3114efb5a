"""The no-download benchmarks run end to end (tiny shapes here; full shapes in docs/benchmarks.md)."""

import mlx.core as mx

from bonsai_mlx.benchmark import bench_generate, forward_flops
from bonsai_mlx.config import KLEIN_4B
from test_random_weights import TINY


def test_bench_generate_reports_stages_cold_start_and_streaming(tmp_path):
    out = bench_generate(tmp_path, fmts=("binary",), sizes=(64,), steps=2, dtype="float32",
                         budgets=("auto", "4GB", "none"), pack_kwargs=TINY, text_layers=(1, 2, 3), log=lambda *_: None)
    auto, sized, none = out["runs"]
    assert [r["budget"] for r in out["runs"]] == ["auto", "4GB", "none"]
    assert auto["plan"]["sync"] and auto["plan"]["stream_text_encoder"] and not none["plan"]["sync"]
    assert none["footprint"] is None and sized["footprint"]["vae_up_per_pixel"] > 0
    for run in out["runs"]:
        assert run["format"] == "binary" and run["size"] == 64 and len(run["generations"]) == 2
        first, second = run["generations"]
        for gen in run["generations"]:
            assert gen["finite"] and len(gen["step_s"]) == 2 and all(t > 0 for t in gen["step_s"])
            stages = gen["memory"]["stages"]
            assert {"text_encoding", "denoising", "decoding"} <= set(stages)
            assert all(s["peak_gb"] > 0 and s["seconds"] > 0 for s in stages.values())
        assert first["cold_start_to_first_image_s"] >= first["timings"]["total_s"] + run["load_s"] * 0.99
    assert sized["generations"][0]["memory"]["peak_gb"] <= 4.0
    ts = out["text_stream_vs_resident_binary"]
    assert ts["streamed_s"] > 0 and ts["resident_s"] > 0
    # The streamed encoder holds less than the resident one (embedding + one layer vs all layers).
    assert ts["streamed_peak_gb"] < ts["resident_peak_gb"]


def test_forward_flops_of_klein_4b_at_512():
    # ~10.2 TFLOP per 512x512 step with 512 text tokens (matches the device notes' ~10.1)
    assert 9.9e12 < forward_flops(KLEIN_4B, 1024, 512) < 10.4e12
