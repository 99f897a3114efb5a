"""End to end against diffusers' Flux2KleinPipeline on tiny random pipelines."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx import BonsaiPipeline
from bonsai_mlx.errors import BonsaiError, ConfigError, WeightsError
from bonsai_mlx.pipeline import Cancelled, GenerationResult, StepEvent
from fixtures import make_packs
from fixtures import make_pipeline as mp

W, H = 96, 64  # non-square, 6 x 4 latent tokens
PROMPT = "a bonsai tree on a desk, soft morning light"
# Final images must agree within 2/255 (max abs over pixels, float32 run).
IMAGE_BOUND = 2 / 255


def ours(path, **kw):
    return BonsaiPipeline.from_pretrained(path, dtype=mx.float32, text_layers=mp.TEXT_LAYERS, **kw)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    return mp.make_pipeline(tmp_path_factory.mktemp("e2e") / "distilled", is_distilled=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return mp.make_pipeline(tmp_path_factory.mktemp("e2e") / "base", is_distilled=False, seed=1)


def test_distilled_matches_diffusers(distilled):
    ref_pipe, path = distilled
    noise = mp.initial_noise(W, H, seed=2)
    ref = mp.run_reference(ref_pipe, PROMPT, W, H, 4, noise)
    result = ours(path).generate(PROMPT, width=W, height=H, latents=noise)
    assert result.steps == 4 and result.guidance == 1.0  # distilled defaults: 4 steps, no CFG
    diff = np.abs(result.array - ref).max()
    assert diff <= IMAGE_BOUND, f"max abs difference {diff * 255:.2f}/255"
    assert ref.std() > 0.01  # the reference image is not flat, so the comparison means something


def test_short_prompt_length_matches_diffusers(distilled):
    """max_sequence_length as Flux2KleinPipeline takes it: 48 prompt tokens instead of 512."""
    ref_pipe, path = distilled
    noise = mp.initial_noise(W, H, seed=6)
    ref = mp.run_reference(ref_pipe, PROMPT, W, H, 4, noise, max_sequence_length=48)
    result = ours(path, max_sequence_length=48).generate(PROMPT, width=W, height=H, latents=noise)
    diff = np.abs(result.array - ref).max()
    assert diff <= IMAGE_BOUND, f"max abs difference {diff * 255:.2f}/255"
    full = ours(path).generate(PROMPT, width=W, height=H, latents=noise)  # the length changes the image
    assert np.abs(full.array - ref).max() > 10 * IMAGE_BOUND
    with pytest.raises(BonsaiError, match="max_sequence_length"):
        ours(path, max_sequence_length=0)


def test_model_defaults_file_sets_size_and_prompt_length(distilled, tmp_path):
    """A model's bonsai.json gives the default size and prompt length: the image equals
    diffusers' at that size and max_sequence_length; explicit arguments still win."""
    ref_pipe, path = distilled
    model = tmp_path / "model"
    shutil.copytree(path, model)
    (model / "bonsai.json").write_text(json.dumps({"width": W, "height": H, "max_sequence_length": 48}))
    noise = mp.initial_noise(W, H, seed=6)
    ref = mp.run_reference(ref_pipe, PROMPT, W, H, 4, noise, max_sequence_length=48)
    pipe = ours(model)
    assert pipe.default_size == (W, H) and pipe.max_sequence_length == 48
    result = pipe.generate(PROMPT, latents=noise)  # no size given: the model's
    assert result.image.size == (W, H)
    diff = np.abs(result.array - ref).max()
    assert diff <= IMAGE_BOUND, f"max abs difference {diff * 255:.2f}/255"
    assert pipe.plan().estimated_peak_bytes == pipe.plan(W, H).estimated_peak_bytes  # plans at that size
    assert ours(model, max_sequence_length=512).max_sequence_length == 512
    assert ours(path).default_size == (512, 512) and ours(path).max_sequence_length == 512  # klein's


@pytest.mark.parametrize("content, pattern", [
    ('{"width": 100, "height": 128}', "multiple of 16"),
    ('{"width": 4096, "height": 128}', "width must be"),
    ('{"width": 32, "height": 48}', "64..2048"),
    ('{"width": 128}', "together"),
    ('{"max_sequence_length": 0}', "max_sequence_length must be"),
    ('{"max_sequence_length": "32"}', "max_sequence_length must be"),
    ('{"size": 128}', "keys among"),
    ('[128, 128]', "JSON object"),
    ('{"width": ', "bonsai.json"),
])
def test_bad_model_defaults_are_refused_before_loading(distilled, tmp_path, content, pattern):
    model = tmp_path / "model"
    shutil.copytree(distilled[1], model)
    (model / "bonsai.json").write_text(content)
    with pytest.raises(ConfigError, match=pattern):
        ours(model)


def test_base_with_cfg_matches_diffusers(base):
    ref_pipe, path = base
    noise = mp.initial_noise(W, H, seed=3)
    ref = mp.run_reference(ref_pipe, PROMPT, W, H, 6, noise, guidance=4.0)
    pipe = ours(path)
    assert not pipe.is_distilled
    result = pipe.generate(PROMPT, width=W, height=H, steps=6, latents=noise)  # default guidance 4.0, "" negative
    assert result.guidance == 4.0
    diff = np.abs(result.array - ref).max()
    assert diff <= IMAGE_BOUND, f"max abs difference {diff * 255:.2f}/255"
    # CFG really ran: without it the image differs.
    no_cfg = pipe.generate(PROMPT, width=W, height=H, steps=6, latents=noise, guidance=1.0)
    assert np.abs(no_cfg.array - ref).max() > 10 * IMAGE_BOUND


def test_binary_pack_matches_diffusers(distilled, tmp_path):
    """The distilled pipeline with its block linears converted to an MLX binary pack; the
    diffusers transformer is given exactly the weights the pack encodes."""
    ref_pipe, path = distilled
    root = tmp_path / "pack"
    for part in ("text_encoder", "tokenizer", "vae", "model_index.json"):
        (shutil.copytree if (path / part).is_dir() else shutil.copy)(path / part, root / part)
    make_packs.make_official_pack(ref_pipe.transformer, root / "transformer-packed-mflux", bits=1)
    noise = mp.initial_noise(W, H, seed=4)
    ref = mp.run_reference(ref_pipe, PROMPT, W, H, 4, noise)
    pipe = ours(root, backend="reference")
    from bonsai_mlx.packed_linear import PackedLinear
    assert sum(isinstance(m, PackedLinear) for _, m in pipe.transformer.named_modules()) == 16
    diff = np.abs(pipe.generate(PROMPT, width=W, height=H, latents=noise).array - ref).max()
    assert diff <= IMAGE_BOUND, f"max abs difference {diff * 255:.2f}/255"


def test_stream_events_preview_and_cancel(distilled):
    _, path = distilled
    pipe = ours(path)
    events = list(pipe.stream(PROMPT, width=W, height=H, seed=7, preview=True))
    steps, result = events[:-1], events[-1]
    assert [e.step for e in steps] == [1, 2, 3, 4] and all(isinstance(e, StepEvent) for e in steps)
    assert all(e.sigma > e.sigma_next for e in steps) and steps[-1].sigma_next == 0.0
    assert all(e.preview is not None and e.preview.size[0] > 0 for e in steps)
    assert isinstance(result, GenerationResult) and result.image.size == (W, H)
    assert result.seed == 7 and set(result.timings) >= {"text_encoding_s", "denoising_s", "decoding_s", "total_s"}

    seen = []
    with pytest.raises(Cancelled, match="after step 2 of 4"):
        pipe.generate(PROMPT, width=W, height=H, seed=7, callback=seen.append, cancel=lambda: len(seen) >= 2)
    assert len(seen) == 2


def test_seeds_are_reproducible(distilled):
    _, path = distilled
    pipe = ours(path)
    a = pipe.generate(PROMPT, width=W, height=H, seed=11).array
    b = pipe.generate(PROMPT, width=W, height=H, seed=11).array
    c = pipe.generate(PROMPT, width=W, height=H, seed=12).array
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.05


@pytest.mark.parametrize("kw, pattern", [
    (dict(width=100), "width=100 is not a multiple of 16"),
    (dict(height=32), "outside the supported range"),
    (dict(width=4096), "outside the supported range"),
    (dict(steps=0), "steps must be an integer"),
    (dict(latents=np.zeros((1, 16, 3, 3), np.float32)), "latents for a 96x64 image must be"),
])
def test_bad_requests_fail_before_any_work(distilled, kw, pattern):
    _, path = distilled
    pipe = ours(path)
    args = dict(width=W, height=H) | kw
    with pytest.raises(BonsaiError, match=pattern):
        pipe.generate(PROMPT, **args)
    with pytest.raises(BonsaiError, match=pattern):
        pipe.stream(PROMPT, **args)  # at the call, before iterating


def test_unknown_model_and_missing_parts(tmp_path):
    with pytest.raises(BonsaiError, match="neither a model directory nor a known model name"):
        BonsaiPipeline.from_pretrained("definitely-not-a-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no transformer, text encoder, tokenizer"):
        BonsaiPipeline.from_pretrained(tmp_path / "empty")


def test_direct_launches_are_asked_for_before_anything_loads(monkeypatch):
    """MLX reads its CUDA launch setting at its first GPU evaluation, which loading may run."""
    from bonsai_mlx import pipeline as P

    order = []

    def resolve(*a, **k):
        order.append("resolve")
        raise RuntimeError("stop here")

    monkeypatch.setattr(P, "prefer_direct_launches", lambda: order.append("launches"))
    monkeypatch.setattr(P, "resolve_model", resolve)
    with pytest.raises(RuntimeError, match="stop here"):
        BonsaiPipeline.from_pretrained("some/model")
    assert order == ["launches", "resolve"]


def test_offline_with_nothing_cached_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="huggingface-cli download prism-ml/bonsai-image-binary-4B-mlx-1bit"):
        BonsaiPipeline.from_pretrained("bonsai-binary", cache_dir=str(tmp_path / "cache"))


def test_repo_id_resolves_from_the_hf_cache_offline(distilled, tmp_path, monkeypatch):
    """A repo id already in the Hugging Face cache loads with downloads off."""
    import huggingface_hub.constants as c
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    _, path = distilled
    repo = tmp_path / "cache" / "models--test-org--tiny-klein"
    shutil.copytree(path, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    pipe = ours("test-org/tiny-klein", cache_dir=str(tmp_path / "cache"))
    a = pipe.generate(PROMPT, width=W, height=H, seed=1).array
    np.testing.assert_array_equal(a, ours(path).generate(PROMPT, width=W, height=H, seed=1).array)


def test_taef2_previews_when_available(distilled, monkeypatch, tmp_path):
    """With mlx-taef, previews of FLUX.2 latents (32 channels) decode the whole latent with
    TAEF2 (random weights here: the real ones are a download), laid out as mlx-taef's own
    FLUX.2 unpack lays it out. Without its weights in the cache, "auto" keeps the VAE
    previews, and so does a model with other latent channels (the tiny one: 4)."""
    pytest.importorskip("mlx_taef")
    import huggingface_hub.constants as c
    from mlx_taef import TAEF2
    from mlx_taef.kernels._types import UnpackContext
    from mlx_taef.kernels.flux import unpack_flux2_latent

    _, path = distilled
    pipe = ours(path)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert pipe.preview_decoder is None  # auto, nothing cached: the VAE
    taef = TAEF2()
    taef._decoder_loaded = True  # random weights, loaded as far as decode() is concerned
    pipe.preview_decoder = taef
    x0 = mx.random.normal((1, 24, 128), key=mx.random.key(1))
    want = np.array(taef.decode(unpack_flux2_latent(x0, UnpackContext(latent_height=4, latent_width=6))))[0]
    got = np.asarray(pipe.preview(x0, W, H)).astype(np.float32)
    assert got.shape == (H, W, 3) and np.abs(got - (want * 255).round()).max() <= 1  # 8-bit rounding only
    plain = pipe.generate(PROMPT, width=W, height=H, seed=7)  # 16-channel tokens: VAE previews, as before
    events = list(pipe.stream(PROMPT, width=W, height=H, seed=7, preview=True))
    assert all(e.preview is not None for e in events[:-1])
    np.testing.assert_array_equal(events[-1].array, plain.array)
    with pytest.raises(BonsaiError, match="preview_decoder must be"):
        pipe.preview_decoder = "tiny"
