"""Bundles: export from a pack and a diffusers pipeline, load back, same images; `verify`
catches every kind of damage before anything is loaded; an interrupted export leaves nothing."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx import BonsaiPipeline, export_bundle, load_bundle
from bonsai_mlx.bundle import BundleError, verify
from bonsai_mlx.random_weights import write_random_pack
from fixtures import make_pipeline as mp
from test_random_weights import TEXT_LAYERS, TINY


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return write_random_pack(tmp_path_factory.mktemp("src") / "pack", "binary", **TINY)


@pytest.fixture(scope="module")
def bundle(pack, tmp_path_factory):
    return export_bundle(pack, tmp_path_factory.mktemp("out") / "bundle", "binary", text_layers=TEXT_LAYERS,
                         test_vectors=True)


def test_bundle_gives_the_same_image_as_its_source(pack, bundle):
    """Transformer already binary, encoder already 4-bit: only layouts change, so bit-exact."""
    src = BonsaiPipeline.from_pretrained(pack, text_layers=TEXT_LAYERS, memory_budget=None)
    got = load_bundle(bundle, memory_budget=None)
    assert got.vae.has_encoder  # the full VAE by default
    a = src.generate("a pine on a cliff", width=96, height=64, seed=3)
    b = got.generate("a pine on a cliff", width=96, height=64, seed=3)
    np.testing.assert_array_equal(a.array, b.array)


def test_diffusers_source_quantized_on_export_matches_quantize_on_load(tmp_path):
    """A dense diffusers pipeline: the bundle's transformer is the same post-training binary
    quantization `from_pretrained(quantize=...)` makes; a 16-bit encoder keeps the prompt exact."""
    _, src = mp.make_pipeline(tmp_path / "tiny", text_layers=(9, 18, 27))
    out = export_bundle(src, tmp_path / "b", "binary", text_bits=16, vae="small", dtype=mx.float32)
    ref = BonsaiPipeline.from_pretrained(src, dtype=mx.float32, quantize="binary", memory_budget=None)
    got = load_bundle(out, memory_budget=None)
    assert not got.vae.has_encoder  # --vae small: the decoder only
    a = ref.generate("a juniper", width=64, height=64, seed=5)
    b = got.generate("a juniper", width=64, height=64, seed=5)
    np.testing.assert_allclose(b.array, a.array, rtol=0, atol=1e-5)  # float32 throughout: rounding only


def test_exported_plans_are_the_bundles_own_for_an_apple_gpu(tmp_path):
    """The plans in a bundle exported from a dense diffusers pipeline are made for the bundle's
    models (its binary transformer, its 4-bit text encoder, its decoder-only VAE) with the GPU
    kernels' slab path assumed, wherever the export runs: each is the plan of the loaded
    bundle's footprint under those assumptions, and the source's dense transformer counts in
    none of them."""
    from dataclasses import replace

    from bonsai_mlx import kernels
    from bonsai_mlx.errors import BonsaiError
    from bonsai_mlx.memory import describe, plan_memory

    _, src = mp.make_pipeline(tmp_path / "tiny", text_layers=(9, 18, 27))
    out = export_bundle(src, tmp_path / "b", "binary", text_bits=4, vae="small", dtype=mx.bfloat16)
    got = load_bundle(out, memory_budget=None)
    fp = replace(got.footprint(calibrated=False), fused_attention=True, reference_matmul=False, text_dequant_bytes=0,
                 slab_tokens=kernels.DEFAULT_CONFIG.slab_min_m["binary"],
                 whole_slab_tokens=kernels.WHOLE_SLAB_MIN_M["binary"])
    plans = json.loads((out / "manifest.json").read_text())["memory_plans"]
    assert any("refused" not in p for p in plans)
    for p in plans:
        if "refused" in p:
            with pytest.raises(BonsaiError):
                plan_memory(fp, p["width"], p["height"], p["budget_bytes"], flush=False)
            continue
        plan = plan_memory(fp, p["width"], p["height"], p["budget_bytes"], flush=False)
        assert (describe(plan), plan.stage_estimates) == (p["described"], p["stage_estimates"])
        assert p["attention_apart"] == p["two_blocks_in_flight"] == plan.execution.attention_apart
        assert p["context_embedder_on_disk"] == p["modulation_layers_on_disk"] == (not plan.keep_modulation)
    source = BonsaiPipeline.from_pretrained(src, dtype=mx.bfloat16, memory_budget=None).footprint(calibrated=False)
    assert source.transformer_bytes > 2 * fp.transformer_bytes and fp.packed_format == "binary"


def test_manifest_describes_every_file_and_tensor(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    paths = {f["path"] for f in m["files"]}
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert paths == on_disk
    t = {x["name"]: x for f in m["files"] if f["path"] == "transformer/model.safetensors" for x in f["tensors"]}
    q = t["single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"]
    assert q["packing"] == "binary" and q["dtype"] == "U32"
    assert t["x_embedder.weight"]["packing"] is None
    te = m["components"]["text_encoder"]
    assert [p["layer"] for p in te["parts"]] == [None, 0, 1, 2] and te["hidden_state_taps"] == list(TEXT_LAYERS)
    assert te["quantization"] == {"mode": "affine", "bits": 4, "group_size": 64}
    conv = next(x for f in m["files"] if f["path"] == "vae/vae.safetensors" for x in f["tensors"]
                if x["name"] == "decoder.conv_in.weight")
    assert conv["shape"][1:3] == [3, 3]  # channels-last [out, kh, kw, in]
    assert m["sampler"]["distilled"] and m["sampler"]["default_steps"] == 4
    assert {(p["width"], p["budget_bytes"]) for p in m["memory_plans"]} >= {(512, 1_500_000_000), (1024, 4_000_000_000)}
    for p in m["memory_plans"]:
        assert "refused" in p or p["stages"][0] == "text_encoding" and p["stages"][-2:] == ["denoising", "decoding"]
    spec = json.loads((bundle / "kernels" / "kernels.json").read_text())
    assert set(spec["kernels"]) == {"binary_gemm", "binary_gemv", "binary_gemv_fp32", "binary_decode", "column_moments"}


def _copy(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def _flip(p):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


DAMAGE = {
    "truncated": (lambda b: (b / "vae/vae.safetensors").write_bytes((b / "vae/vae.safetensors").read_bytes()[:-7]),
                  "vae/vae.safetensors"),
    "bit flip": (lambda b: _flip(b / "transformer/model.safetensors"), "transformer/model.safetensors"),
    "swapped": (lambda b: [os.replace(b / "text_encoder/layer_00.safetensors", b / "t"),
                           os.replace(b / "text_encoder/layer_01.safetensors", b / "text_encoder/layer_00.safetensors"),
                           os.replace(b / "t", b / "text_encoder/layer_01.safetensors")], "text_encoder/layer_0"),
    "missing": (lambda b: (b / "kernels/binary_gemm.metal").unlink(), "kernels/binary_gemm.metal"),
    "extra": (lambda b: (b / "kernels/evil.metal").write_text("x"), "kernels/evil.metal"),
    "symlink": (lambda b: [(b / "tokenizer/tokenizer.json").unlink(),
                           os.symlink("/etc/hostname", b / "tokenizer/tokenizer.json")], "tokenizer/tokenizer.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_names_the_damaged_file_and_loads_nothing(bundle, tmp_path, monkeypatch, damage):
    b = _copy(bundle, tmp_path)
    hurt, name = DAMAGE[damage]
    hurt(b)
    import bonsai_mlx.loading
    monkeypatch.setattr(bonsai_mlx.loading, "load_transformer", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(BundleError, match=name):
        verify(b)
    with pytest.raises(BundleError, match=name):
        load_bundle(b)


@pytest.mark.parametrize("path", ["../outside.bin", "/etc/passwd", "vae/../../x", "a\\b"])
def test_manifest_paths_may_not_leave_the_bundle(bundle, tmp_path, path):
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["files"][0]["path"] = path
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="leaves the bundle|resolves outside"):
        verify(b)


def test_manifest_that_disagrees_with_a_header(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    entry = next(f for f in m["files"] if f["path"] == "vae/vae.safetensors")
    entry["tensors"][0]["shape"] = [1, 2, 3]
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="vae/vae.safetensors: tensors disagree"):
        verify(b)


@pytest.mark.parametrize("alter", ["key", "entry", "list"])
def test_manifest_tensor_entries_of_the_wrong_form_are_refused(bundle, tmp_path, alter):
    """A tensor entry without its dtype (a renamed key), an entry that is no object, or tensors
    that are no list: a BundleError that names the file, not a KeyError."""
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    entry = next(f for f in m["files"] if f["path"] == "vae/vae.safetensors")
    if alter == "key":
        entry["tensors"][0]["dtypa"] = entry["tensors"][0].pop("dtype")
    elif alter == "entry":
        entry["tensors"][0] = "decoder.conv_in.weight"
    else:
        entry["tensors"] = {"decoder.conv_in.weight": {}}
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="the tensors of vae/vae.safetensors must be objects"):
        verify(b)


def test_interrupted_export_leaves_nothing(pack, tmp_path, monkeypatch):
    import bonsai_mlx.export as ex

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "_write_vae", boom)  # midway: transformer and text encoder written
    with pytest.raises(KeyboardInterrupt):
        export_bundle(pack, tmp_path / "b", text_layers=TEXT_LAYERS)
    assert list(tmp_path.iterdir()) == []  # no bundle, no partial directory
    monkeypatch.undo()
    export_bundle(pack, tmp_path / "b", text_layers=TEXT_LAYERS)  # a rerun succeeds
    verify(tmp_path / "b")


def test_cli_export_and_verify(pack, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "bonsai_mlx", *a], capture_output=True, text=True,
                                    timeout=600)
    r = run("export", str(pack), str(tmp_path / "b"), "--format", "binary", "--text-layers", *map(str, TEXT_LAYERS))
    assert r.returncode == 0, r.stderr
    r = run("verify", str(tmp_path / "b"))
    assert r.returncode == 0 and "match the manifest" in r.stdout
    (tmp_path / "b" / "kernels" / "binary_gemv.metal").write_text("tampered")
    r = run("verify", str(tmp_path / "b"))
    assert r.returncode == 2 and "binary_gemv.metal" in r.stderr and "Traceback" not in r.stderr
    r = run("export", str(pack), str(tmp_path / "b"), "--text-layers", *map(str, TEXT_LAYERS))
    assert r.returncode == 2 and "exists" in r.stderr


def test_every_kernel_in_the_bundle_runs_from_its_files(bundle):
    """What an app has: the bundle's kernels/ folder. Each kernel it lists runs through the CPU
    Metal harness with the launch kernels.json describes, against the dense weights."""
    from bonsai_mlx import kernel_spec
    from kernel_helpers import dense, random_weight, rel_err, to_numpy
    from metal_harness import harness

    kdir = bundle / "kernels"
    spec = json.loads((kdir / "kernels.json").read_text())
    rng = np.random.default_rng(11)
    N, K = 72, 384
    t, s, pw = random_weight(rng, "binary", N, K)
    cases = {"binary_gemm": (40, mx.float16), "binary_gemv": (5, mx.bfloat16), "binary_gemv_fp32": (3, mx.float32),
             "binary_decode": (None, mx.float16)}
    assert set(cases) | {"column_moments"} == set(spec["kernels"])
    from kernel_helpers import exported_moments  # the VAE's GroupNorm statistics: sums of x's columns

    x = mx.array((rng.standard_normal((1, 200, 64)) + 20).astype(np.float32)).astype(mx.float16)
    np.testing.assert_allclose(exported_moments(kdir, x), to_numpy(x).astype(np.float64).sum(axis=1), rtol=1e-5)
    for key, (M, dtype) in cases.items():
        e = spec["kernels"][key]
        header = (kdir / e["header"]).read_text() if e["header"] else ""
        names = kernel_spec.evaluate_lets(e["let"], {"M": M or 0, "N": N, "K": K, "rows": N})
        template = [(k, dtype if v == "dtype" else kernel_spec.evaluate(v, names)) for k, v in e["template"]]
        grid = [kernel_spec.evaluate(g, names) for g in e["grid"]]
        if M is None:
            inputs, shape = [pw.data, pw.scales], (N, K)
        else:
            x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(dtype)
            inputs, shape = [x, pw.data, pw.scales], (M, N)
        (y,) = harness.run(e["name"], e["inputs"], e["outputs"], (kdir / e["source"]).read_text(), header, inputs,
                           [shape], [dtype], grid, e["threadgroup"], template)
        assert harness.unwritten(y) == 0, key
        y = mx.array(y.view(np.uint16)).view(dtype).astype(mx.float32) if dtype != mx.float32 else mx.array(y)
        ref = dense(t, s) if M is None else to_numpy(x).astype(np.float64) @ dense(t, s).T
        assert rel_err(np.array(y), ref) < (1e-5 if dtype == mx.float32 else 1e-2), key


def test_a_full_bundles_plans_count_its_vae_encoder(bundle):
    """A pipeline loaded from a bundle leaves the VAE's encoder on disk until an edit reads it,
    but an app may hold all of the VAE it loads: a full bundle's plans count the encoder."""
    from dataclasses import replace

    from bonsai_mlx.executor import packed_info
    from bonsai_mlx.memory import plan_memory

    got = load_bundle(bundle, memory_budget=None)
    assert got.vae.has_encoder and not got.vae.encoder_resident
    without = got.footprint(calibrated=False).vae_bytes
    got.vae.read_encoder()
    model = got.transformer
    gpu = packed_info(model, model.dtype, on_gpu=True)
    fp = replace(got.footprint(calibrated=False), fused_attention=True, reference_matmul=False, text_dequant_bytes=0,
                 slab_tokens=gpu["slab_tokens"], whole_slab_tokens=gpu["whole_slab_tokens"])
    encoder = fp.vae_bytes - without
    assert encoder > 0
    plans = [p for p in json.loads((bundle / "manifest.json").read_text())["memory_plans"] if "refused" not in p]
    assert plans
    for p in plans:
        # the exporter plans with the transformer it wrote, which counts 768 bytes less than the
        # same transformer read back from the bundle at this fixture's dtype
        for with_encoder, vae_bytes in ((True, fp.vae_bytes), (False, without)):
            plan = plan_memory(replace(fp, vae_bytes=vae_bytes), p["width"], p["height"], p["budget_bytes"],
                               flush=False)
            off = max(abs(plan.stage_estimates[k] - v) for k, v in p["stage_estimates"].items())
            assert (off <= 1024) == with_encoder and (off >= encoder - 1024) != with_encoder, (p, off, encoder)
