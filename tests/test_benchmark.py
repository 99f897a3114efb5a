"""The no-download benchmarks run end to end (tiny shapes here; full shapes in docs/benchmarks.md)."""

import json

import mlx.core as mx
import numpy as np

from bonsai_mlx.benchmark import EDIT_CASES, EDIT_COLUMNS, RATIOS, bench_generate, forward_flops
from bonsai_mlx.cli import main
from bonsai_mlx.config import KLEIN_4B
from bonsai_mlx.random_weights import write_random_pack
from test_random_weights import TINY, TINY_TEXT


def test_bench_generate_reports_stages_cold_start_and_streaming(tmp_path):
    # A text encoder with enough layers, each weighing something next to a 512-token prompt's
    # activations, that holding all it reads differs from holding two layers by more than the
    # peaks' run-to-run noise (with TINY's 3 needed layers of 128 MLP units it does not).
    pack = {**TINY, "text": {**TINY_TEXT, "intermediate_size": 2048, "num_hidden_layers": 12}}
    out = bench_generate(tmp_path, fmts=("binary",), sizes=(64,), steps=2, dtype="float32",
                         budgets=("auto", "4GB", "none"), pack_kwargs=pack, text_layers=(4, 8, 11), log=lambda *_: None)
    auto, sized, none = out["runs"]
    assert [r["budget"] for r in out["runs"]] == ["auto", "4GB", "none"]
    assert auto["plan"]["sync"] and auto["plan"]["stream_text_encoder"] and not none["plan"]["stream_text_encoder"]
    assert none["plan"]["vae_sync"] is False and none["plan"]["text_sync"] is False  # memory.UNCONSTRAINED
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
    # The streamed encoder holds less than the resident one (the embedding or two layers, vs all).
    assert ts["streamed_peak_gb"] < ts["resident_peak_gb"]


def test_forward_flops_of_klein_4b_at_512():
    # ~10.2 TFLOP per 512x512 step with 512 text tokens (matches the device notes' ~10.1)
    assert 9.9e12 < forward_flops(KLEIN_4B, 1024, 512) < 10.4e12


def test_benchmark_edit_command_runs_every_case_on_the_pack_in_dir(tmp_path, capsys):
    """`benchmark edit` end to end on a tiny pack written where `benchmark generate` writes
    its own (so it is read, not written again); the text encoder has 28 layers for the
    default text layers 9, 18, 27."""
    pack = write_random_pack(tmp_path / "random-binary", "binary", seed=0,
                             **{**TINY, "text": {**TINY_TEXT, "num_hidden_layers": 28}})
    written = (pack / "model_index.json").stat().st_mtime_ns
    out = tmp_path / "edit.json"
    main(["benchmark", "edit", "--dir", str(tmp_path), "--sizes", "64", "--dtype", "float32", "--budgets", "auto",
          "none", "--generations", "1", "--steps", "2", "--strength", "0.4", "--json", str(out)])
    table = capsys.readouterr().out
    assert (pack / "model_index.json").stat().st_mtime_ns == written
    result = json.loads(out.read_text())
    assert result["format"] == "binary" and result["steps"] == 2 and result["strength"] == 0.4
    assert [(r["size"], r["budget"]) for r in result["runs"]] == [(64, "auto"), (64, "none")]
    for run in result["runs"]:
        # the cases that encode no image first: the VAE's encoder, read by the first that does,
        # stays resident in the ones after it, and plain runs without it
        assert list(run["cases"]) == ["plain", "lora-r16", "lora-r64", "lora-r16+r64", "reference-1", "reference-2",
                                      "inpaint", "image-to-image"]
        for name, case in run["cases"].items():
            s = case["summary"]
            assert len(case["generations"]) == 1 and case["generations"][0]["finite"]
            # strength 0.4 of 2 steps skips one
            assert s["steps_run"] == (1 if EDIT_CASES[name].get("init_image") else 2)
            assert s["total_s"] > s["denoising_s"] > 0 and s["denoise_per_step_s"] > 0 and s["peak_gb"] > 0
            assert s["mean_active_gb"] > 0 and set(s["ratio_to_plain"]) == set(RATIOS)
            assert all(v > 0 for v in s["ratio_to_plain"].values())
            images = bool(EDIT_CASES[name].get("references") or EDIT_CASES[name].get("init_image"))
            assert ("image_encoding" in s["stages_s"]) == (s["image_encoding_s"] > 0) == images
            assert (s["estimated_peak_gb"] is None) == (run["budget"] == "none")
            if run["budget"] == "auto":
                assert s["estimated_peak_gb"] > 0 and "denoising" in s["stage_estimates_gb"]
            ranks = EDIT_CASES[name].get("lora_ranks", ())
            assert len(case.get("loras", [])) == len(ranks)
            if ranks:  # r (in + out) bf16 values per block linear
                assert case["lora_bytes"] > 0 and case["lora_load_s"] > 0
        assert run["cases"]["plain"]["summary"]["ratio_to_plain"] == {k: 1.0 for k in RATIOS}
        lora = {n: run["cases"][n]["lora_bytes"] for n in ("lora-r16", "lora-r64", "lora-r16+r64")}
        assert lora["lora-r64"] == 4 * lora["lora-r16"] and lora["lora-r16+r64"] == 5 * lora["lora-r16"]
    # the markdown table: a row per size, budget and case, as --table renders it from the JSON
    rows = [line for line in table.splitlines() if line.startswith("| 64 |")]
    assert len(rows) == 2 * len(EDIT_CASES) and all(line.count("|") == len(EDIT_COLUMNS) + 1 for line in rows)
    main(["benchmark", "edit", "--table", str(out)])
    assert capsys.readouterr().out == table


def test_step_times_start_after_every_stage_before_denoising():
    """A step's time runs from the end of the step before it; the first one's from the end of
    the last stage before denoising, the modulation stage (budgeted plans) included."""
    from types import SimpleNamespace

    from bonsai_mlx.benchmark import timed_generation

    class Pipe:
        def generate(self, prompt, callback, **kw):
            for elapsed in (1.55, 1.75):  # text 1.0 s, image 0.2 s, load 0.25 s, modulation 0.05 s
                callback(SimpleNamespace(elapsed=elapsed))
            timings = {"text_encoding_s": 1.0, "image_encoding_s": 0.2, "transformer_load_s": 0.25,
                       "modulation_s": 0.05, "denoising_s": 0.3, "total_s": 2.0}
            return SimpleNamespace(timings=timings, memory={"peak_gb": 1.0, "mean_active_gb": 0.5,
                                                            "sampled_footprint_gb": 1.0},
                                   array=np.zeros((2, 2, 3), np.float32))

    gen = timed_generation(Pipe(), "p", 64, 2, 0, None, log=lambda *_: None)
    assert np.allclose(gen["step_s"], [0.05, 0.2])
