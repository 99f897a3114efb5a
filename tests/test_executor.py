"""The stage executor: what it does for a plan beyond the models' own execution."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx import BonsaiPipeline, kernels
from bonsai_mlx.executor import slab_tuning
from bonsai_mlx.memory import UNCONSTRAINED, MemoryPlan
from bonsai_mlx.scheduler import flux2_sigmas
from fixtures import make_pipeline as mp

GPU_INFO = {"slab_tokens": 1536, "largest_packed": 27648 * 3072}  # klein 4B's, where the slab path runs


def test_slab_tuning_raises_the_cap_to_the_largest_packed_matrix_for_whole_slab_plans_only():
    whole = replace(kernels.DEFAULT_CONFIG, slab_max_elements=27648 * 3072, slab_min_m=kernels.WHOLE_SLAB_MIN_M)
    with slab_tuning(GPU_INFO, MemoryPlan(whole_slabs=True)):
        config = kernels.current_config()
        assert config == whole == kernels.whole_slabs(27648 * 3072)
        assert kernels.slab_rows(18432, 3072, config) == 18432  # the MLP's rows: one slab
        # 1,024 image tokens (a 512 px image's) take the slab path with whole slabs, not without
        assert kernels.choose_path(1024, mx.bfloat16, "cuda", "binary", config) == "slab"
        assert kernels.choose_path(1024, mx.bfloat16, "cuda", "binary") == "gemm"
    assert kernels.current_config() is kernels.DEFAULT_CONFIG
    no_slab_path = {**GPU_INFO, "slab_tokens": 0}  # the CPU, float32 activations or a dense model
    for info, plan in ((GPU_INFO, MemoryPlan()), (no_slab_path, MemoryPlan(whole_slabs=True))):
        with slab_tuning(info, plan):
            assert kernels.current_config() is kernels.DEFAULT_CONFIG


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    _, path = mp.make_pipeline(tmp_path_factory.mktemp("exe") / "tiny", is_distilled=False, seed=2)
    return BonsaiPipeline.from_pretrained(path, dtype=mx.float32, quantize="binary", text_layers=mp.TEXT_LAYERS)


def test_every_forward_of_a_whole_slab_run_is_built_under_the_cap(packed, monkeypatch):
    """With the slab path found (as on a GPU), each denoising forward of a whole-slab plan is
    built inside the raised cap, and no forward of another plan is; the cap is gone after the
    run. The reference matmul of this CPU ignores the cap: the images are equal."""
    model, info = packed.transformer, packed.models.transformer_info
    monkeypatch.setitem(info, "slab_tokens", 1)
    seen, forward = [], model.forward

    def recording(*args, **kw):
        seen.append(kernels.current_config().slab_max_elements)
        return forward(*args, **kw)

    monkeypatch.setattr(model, "forward", recording)
    plan = MemoryPlan(sync=True, overlap=True)
    images = []
    for p in (replace(plan, whole_slabs=True), plan):
        seen.clear()
        images.append(packed.generate("a fern", width=128, height=128, steps=2, seed=1, plan=p,
                                      guidance=2.0, negative_prompt="fog").array)
        want = info["largest_packed"] if p.whole_slabs else kernels.DEFAULT_CONFIG.slab_max_elements
        assert len(seen) == 4 and set(seen) == {want}  # 2 steps, conditional and unconditional
    assert info["largest_packed"] == max(m.out_features * m.in_features for _, m in model.named_modules()
                                         if hasattr(m, "fmt"))
    assert kernels.current_config() is kernels.DEFAULT_CONFIG
    np.testing.assert_array_equal(images[0], images[1])


def test_a_resident_text_encoder_runs_layer_by_layer_as_the_plan_says(packed, monkeypatch):
    """`sync` evaluates a resident encoder layer by layer (bounded activations) unless
    `text_sync` says otherwise; none runs it in one graph."""
    te, seen = packed.text_encoder, []
    encode = te.encode

    def recording(prompts, **kw):
        seen.extend(kw["sync"] for p in prompts if "fern" in p)  # not the unconditional prompt, encoded once
        return encode(prompts, **kw)

    monkeypatch.setattr(te, "encode", recording)
    plans = (UNCONSTRAINED, MemoryPlan(sync=True), MemoryPlan(sync=True, text_sync=False), MemoryPlan(),
             MemoryPlan(text_sync=True))
    for i, plan in enumerate(plans):
        packed.generate(f"a fern, take {i}", width=64, height=64, steps=1, seed=1, plan=plan)
    assert seen == [False, True, False, False, True]


def test_modulation_layers_left_on_disk_are_read_again_only_for_new_sigmas(packed, monkeypatch):
    """A plan that leaves the modulation layers on disk computes every step's modulations in a
    stage of its own, then makes their weights lazy reads of the checkpoint: the denoising
    stage holds their bytes less than with a plan that keeps them, and the image is the same.
    Sigmas computed lately are not computed again (the stage allocates nothing); new ones
    (another step count) read the layers again. Layers read by a direct call of the
    transformer are left on disk again by the next such plan.

    Bound: a stage's peak may hold one activation of the joint sequence (text and image tokens
    by the inner width, fp32) more or less, as the CPU stream frees it before or after the
    next part starts, and a few kilobytes of small buffers besides (a tenth of one such
    activation bounds them); the modulation layers' bytes are about five activations here."""
    models, calls = packed.models, []
    source = models._loader
    lazy = type(source).lazy_weights
    monkeypatch.setattr(type(source), "lazy_weights", lambda self, modules: calls.append(modules) or lazy(self, modules))
    mod_bytes = models.transformer_info["modulation_bytes"]
    assert mod_bytes > 0 and mod_bytes == models.footprint(calibrated=False).modulation_bytes
    keep, away = MemoryPlan(sync=True), MemoryPlan(sync=True, keep_modulation=False)
    kw = dict(width=64, height=64, steps=2, seed=4)
    cfg = packed.transformer.config
    tokens = packed.max_sequence_length + (kw["width"] // 16) * (kw["height"] // 16)
    activation = tokens * cfg.num_attention_heads * cfg.attention_head_dim * 4
    bound = 1.1 * activation
    assert mod_bytes > 4 * bound
    generate = packed.generate

    def fresh(*a, **k):  # each from an empty buffer cache, as the first (a new prompt's) starts
        mx.synchronize()  # buffers the last generation's threads still free land in the cache first
        mx.clear_cache()
        return generate(*a, **k)

    monkeypatch.setattr(packed, "generate", fresh)
    kept = packed.generate("a cedar", plan=keep, **kw)
    assert calls == [] and "modulation" not in kept.memory["stages"]
    left = packed.generate("a cedar", plan=away, **kw)
    np.testing.assert_array_equal(kept.array, left.array)
    assert len(calls) == 1 and "modulation_s" in left.timings
    assert list(left.memory["stages"]) == ["text_encoding", "modulation", "denoising", "decoding"]
    # the same steps without the layers: the denoising stage peaks lower by their bytes
    low = lambda r: r.memory["stages"]["denoising"]["peak_gb"] * 1e9  # noqa: E731
    assert low(kept) - low(left) == pytest.approx(mod_bytes, abs=bound)
    again = packed.generate("a cedar", plan=away, **kw)  # the same sigmas: nothing computed or read
    assert again.memory["stages"]["modulation"]["peak_gb"] * 1e9 < mod_bytes / 4
    np.testing.assert_array_equal(again.array, left.array)
    packed.generate("a cedar", plan=away, **{**kw, "steps": 3})  # new sigmas: read, then left again
    # A plan that keeps them reads them only for sigmas not kept, and then they stay.
    assert low(packed.generate("a cedar", plan=keep, **{**kw, "steps": 3})) == pytest.approx(low(left), abs=bound)
    assert low(packed.generate("a cedar", plan=keep, **{**kw, "steps": 4})) == pytest.approx(low(kept), abs=bound)
    assert low(packed.generate("a cedar", plan=keep, **kw)) == pytest.approx(low(kept), abs=bound)
    # Left on disk, then read by a direct call: the next plan that leaves them leaves them again.
    assert low(packed.generate("a cedar", plan=away, **kw)) == pytest.approx(low(left), abs=bound)
    model = packed.transformer
    mx.eval(model(mx.zeros((1, 4, cfg.in_channels)), mx.zeros((1, 3, cfg.joint_attention_dim)), mx.array([0.5]),
                  mx.zeros((4, 4), dtype=mx.int32), mx.zeros((3, 4), dtype=mx.int32)))
    assert low(packed.generate("a cedar", plan=away, **kw)) == pytest.approx(low(left), abs=bound)


def test_the_context_embedder_left_on_disk_is_read_for_new_prompts_only(packed, monkeypatch):
    """A plan that leaves the modulation layers on disk leaves the context embedder there too:
    the modulation stage computes a new prompt's text tokens (reading the layer), and a cached
    prompt's come from the cache, under any plan; the image is the same. (The denoising stage
    holds the layer's bytes less: test_modulation_layers_left_on_disk_are_read_again_only_for_new_sigmas.)
    A prompt's tokens go when `encode` drops its embeddings."""
    import mlx.nn as nn

    from bonsai_mlx.executor import PROMPT_CACHE, Prompts

    models = packed.models
    embedder, calls, linear = models.transformer.context_embedder, [], nn.Linear.__call__
    monkeypatch.setattr(nn.Linear, "__call__", lambda self, x: (calls.append(1) if self is embedder else None)
                        or linear(self, x))
    keep, away = MemoryPlan(sync=True), MemoryPlan(sync=True, keep_modulation=False)
    kw = dict(width=64, height=64, steps=1, seed=6)
    models.prompts = Prompts()  # no prompt kept from other tests
    first = packed.generate("a larch in fog", plan=away, **kw)
    new = 1 + (first.guidance != 1.0)  # the prompt and, with guidance, the (empty) negative one
    assert len(calls) == new and "modulation" in first.memory["stages"]
    again = packed.generate("a larch in fog", plan=away, **kw)
    kept = packed.generate("a larch in fog", plan=keep, **kw)
    assert len(calls) == new
    np.testing.assert_array_equal(again.array, first.array)
    np.testing.assert_array_equal(kept.array, first.array)
    emb = models.encode("a larch in fog", keep)
    assert models.prompts._tokens[id(emb)] is models.text_tokens(emb)
    for i in range(PROMPT_CACHE):  # other prompts push it out of the cache, and its tokens with it
        models.encode(f"a larch, take {i}", keep)
    assert id(emb) not in models.prompts._tokens and len(models.prompts._tokens) <= PROMPT_CACHE
    models.text_tokens(models.encode(f"a larch, take {PROMPT_CACHE - 1}", keep))
    assert models.prompts._tokens
    models._apply_loras()  # an adapter may change the context embedder: no tokens kept
    assert not models.prompts._tokens
    calls.clear()
    loose = mx.zeros_like(emb)  # embeddings the cache does not hold: embedded, never kept
    models.text_tokens(loose)
    models.text_tokens(loose)
    assert len(calls) == 2 and id(loose) not in models.prompts._tokens


def test_layers_left_on_disk_give_back_the_cache_only_after_a_read(packed):
    """Leaving the modulation layers on disk again empties MLX's buffer cache only where
    weights were dropped: after a read for new sigmas, or after a direct call of the
    transformer read them. For sigmas computed lately nothing is read, and the buffers the
    last generation left for the next one stay."""
    models, away = packed.models, MemoryPlan(sync=True, keep_modulation=False)
    kw = dict(width=64, height=64, seed=4, plan=away)

    def cache_after(stage):
        a = mx.ones((1 << 20,))  # a 4 MB buffer in the cache as the modulation stage starts
        mx.eval(a)
        del a
        mx.synchronize()  # a GPU may put buffers back after eval returns
        assert mx.get_cache_memory() >= 4 << 20
        stage()
        mx.synchronize()
        return mx.get_cache_memory()

    packed.generate("a larch", steps=2, **kw)
    assert cache_after(lambda: models.modulations(flux2_sigmas(2, 16)[:-1], keep=False)) >= 4 << 20
    assert cache_after(lambda: models.modulations(flux2_sigmas(5, 16)[:-1], keep=False)) < 1 << 20  # new sigmas
    model, cfg = packed.transformer, packed.transformer.config
    mx.eval(model(mx.zeros((1, 4, cfg.in_channels)), mx.zeros((1, 3, cfg.joint_attention_dim)), mx.array([0.5]),
                  mx.zeros((4, 4), dtype=mx.int32), mx.zeros((3, 4), dtype=mx.int32)))  # reads the layers
    assert cache_after(lambda: models.modulations(flux2_sigmas(5, 16)[:-1], keep=False)) < 1 << 20


def test_long_schedules_compute_their_modulations_a_window_at_a_time(packed, monkeypatch):
    """Past the bytes kept, a schedule's modulations are computed a window of steps at a time
    as the steps come, and not kept: the image is the one computed at once."""
    from bonsai_mlx import executor

    kw = dict(width=64, height=64, steps=5, seed=8, plan=MemoryPlan(sync=True, keep_modulation=False))
    whole = packed.generate("a pine", **kw).array
    monkeypatch.setattr(executor, "MODULATION_CACHE_BYTES", 2 * packed.models.transformer_info["modulation_step_bytes"])
    computed, compute = [], packed.models._computed
    monkeypatch.setattr(packed.models, "_computed", lambda sigmas, keep: computed.append(len(sigmas)) or compute(sigmas, keep))
    packed.models._modulations.clear()
    np.testing.assert_array_equal(packed.generate("a pine", **kw).array, whole)
    assert computed == [2, 2, 1] and not packed.models._modulations


def test_a_checkpoint_gone_from_disk_is_a_clear_error(tmp_path):
    """Modulation layers left on disk whose checkpoint was removed since: new sigmas end in a
    WeightsError that says to load the pipeline again, not a traceback from MLX's reader."""
    import shutil

    from bonsai_mlx.errors import WeightsError

    _, path = mp.make_pipeline(tmp_path / "gone", is_distilled=True, seed=3)
    pipe = BonsaiPipeline.from_pretrained(path, dtype=mx.float32, text_layers=mp.TEXT_LAYERS)
    away = MemoryPlan(sync=True, keep_modulation=False)
    pipe.generate("a birch", width=64, height=64, steps=2, seed=1, plan=away)
    shutil.rmtree(pipe.models._loader.path)
    with pytest.raises(WeightsError, match="Load the pipeline again"):
        pipe.generate("a birch", width=64, height=64, steps=3, seed=1, plan=away)


def test_modulation_layers_read_again_from_a_wider_file_hold_one_weight_beside_its_cast(tmp_path):
    """A float32 checkpoint under a bfloat16 pipeline: reading the modulation layers again holds
    their bfloat16 copies and one weight's float32 tensor at a time here, at most the largest
    one; the modulation stage's estimate adds the two largest (Footprint.modulation_cast_bytes:
    a GPU may free the one before after eval returns). Read in one graph, all six were held."""
    from bonsai_mlx.executor import nbytes
    from bonsai_mlx.memory import SAFETY, estimate
    from bonsai_mlx.transformer import MODULATION_LAYERS, ON_DISK_LAYERS

    _, path = mp.make_pipeline(tmp_path / "wide", is_distilled=False, seed=5)  # saved in float32
    pipe = BonsaiPipeline.from_pretrained(path, dtype=mx.bfloat16, text_layers=mp.TEXT_LAYERS)
    models, info = pipe.models, pipe.models.transformer_info
    files, _ = models._loader._file_weights(ON_DISK_LAYERS)
    sizes = sorted(w.nbytes for w in files.values())
    assert {w.dtype for w in files.values()} == {mx.float32} and sizes[-1] == sizes[-2]
    fp = models.footprint(calibrated=False)
    assert info["modulation_cast_bytes"] == fp.modulation_cast_bytes == sizes[-1] + sizes[-2]
    away = MemoryPlan(sync=True, keep_modulation=False)
    added = estimate(fp, 64, 64, away)["modulation"] - estimate(replace(fp, modulation_cast_bytes=0), 64, 64, away)["modulation"]
    assert added == pytest.approx(SAFETY * (sizes[-1] + sizes[-2]), abs=2)
    models._to_disk()  # as after a modulation stage: lazy reads of the file
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    models._computed([0.9, 0.5], keep=True)  # reads the modulation layers (not the context embedder)
    extra = mx.get_peak_memory() - base
    copies = sum(nbytes(pipe.transformer[n]) for n in MODULATION_LAYERS)
    mod_sizes = sorted(w.nbytes for k, w in files.items() if k.startswith(MODULATION_LAYERS))
    # beyond the bfloat16 copies a file tensor is held (more than the smallest), never more than
    # the largest on this CPU; read in one graph, all six (1.2 MB here) were held at once
    assert copies + mod_sizes[0] < extra <= copies + mod_sizes[-1]
    # a float32 pipeline on the same file casts nothing
    same = BonsaiPipeline.from_pretrained(path, dtype=mx.float32, text_layers=mp.TEXT_LAYERS)
    assert same.models.transformer_info["modulation_cast_bytes"] == 0


def test_packed_modulation_layers_are_never_left_on_disk(packed):
    """Only plain 16/32-bit linears can be read back as they were loaded: a transformer whose
    modulation layers are packed frees nothing, and no plan leaves them on disk."""
    from bonsai_mlx.executor import Models
    from bonsai_mlx.packed_linear import PackedLinear

    model = packed.transformer
    linear = model.norm_out.linear
    try:
        model.norm_out.linear = PackedLinear.from_dense(linear.weight, "binary", backend="reference")
        models = Models(model, packed.text_encoder, packed.vae, packed.models._loader)
        assert models.transformer_info["modulation_bytes"] == 0
    finally:
        model.norm_out.linear = linear
    assert Models(model, packed.text_encoder, packed.vae, packed.models._loader).transformer_info["modulation_bytes"] > 0


def test_a_lora_on_a_modulation_layer_is_not_hidden_by_kept_modulations(packed, tmp_path):
    """Modulations kept for some sigmas are dropped when the adapters change: an adapter on a
    modulation layer changes the image, also on a layer left on disk (the adapter wraps the
    lazy weight)."""
    D = packed.transformer.config.inner_dim
    rng = np.random.default_rng(0)
    path = tmp_path / "mod.safetensors"
    mx.save_safetensors(str(path), {
        "transformer.double_stream_modulation_img.linear.lora_A.weight": mx.array(rng.standard_normal((4, D)), mx.float32),
        "transformer.double_stream_modulation_img.linear.lora_B.weight": mx.array(rng.standard_normal((6 * D, 4)) * 0.1,
                                                                                  mx.float32)})
    kw = dict(width=64, height=64, steps=2, seed=6, plan=MemoryPlan(sync=True, keep_modulation=False))
    plain = packed.generate("a spruce", **kw).array
    name = packed.load_lora(path)
    try:
        adapted = packed.generate("a spruce", **kw).array
        assert np.abs(adapted - plain).max() > 1e-3
        packed.set_lora_scale(name, 0.0)
        np.testing.assert_array_equal(packed.generate("a spruce", **kw).array, plain)
    finally:
        packed.unload_lora()


def test_a_pipeline_from_objects_refuses_to_leave_its_modulation_layers_on_disk(packed):
    """Without files to read them from, a plan that leaves the modulation layers (or the
    transformer) behind is refused before any work, and the planner never offers one."""
    from bonsai_mlx import BonsaiError

    pipe = BonsaiPipeline(packed.transformer, packed.text_encoder, packed.vae)
    assert pipe.models.transformer_info["modulation_bytes"] == 0
    calls = []
    encode = pipe.text_encoder.encode
    pipe.text_encoder.encode = lambda *a, **k: calls.append(a) or encode(*a, **k)
    try:
        for plan, what in ((MemoryPlan(keep_modulation=False), "modulation layers"),
                           (MemoryPlan(transformer_in_decode=False), "release its transformer")):
            with pytest.raises(BonsaiError, match=what):
                pipe.generate("a yew", width=64, height=64, steps=1, plan=plan)
    finally:
        del pipe.text_encoder.encode
    assert calls == []


def test_the_vae_encoder_stays_on_disk_until_an_edit_plans(packed):
    """A pipeline loaded from files holds the VAE's decoder only: text-to-image generations
    never read the encoder and their footprint counts none of it; planning an edit reads it
    (its scratch is measured then), and from then on every plan counts it."""
    from mlx.utils import tree_flatten

    from bonsai_mlx.benchmark import picture
    from bonsai_mlx.executor import nbytes
    from bonsai_mlx.vae import load_vae

    pipe = BonsaiPipeline.from_pretrained(packed.model, dtype=mx.float32, quantize="binary", text_layers=mp.TEXT_LAYERS)
    full = load_vae(packed.model + "/vae", dtype=pipe.vae.dtype)  # the same file, read whole
    encoder = sum(v.nbytes for k, v in tree_flatten(full.parameters()) if k.startswith(("encoder.", "quant_conv.")))
    assert encoder > 0 and pipe.vae.has_encoder and not pipe.vae.encoder_resident
    pipe.generate("a cat", width=64, height=64, steps=2, memory_budget="4GB")
    assert not pipe.vae.encoder_resident
    assert pipe.footprint().vae_bytes == nbytes(pipe.vae) == nbytes(full) - encoder
    pipe.plan(64, 64, memory_budget="4GB", images=((64, 64),))
    assert pipe.vae.encoder_resident
    assert pipe.footprint().vae_bytes == nbytes(full)
    got = pipe.generate("a cat", width=64, height=64, steps=2, image=[picture(64, 64, 1)], memory_budget="4GB")
    assert np.isfinite(got.array).all()


def test_prompts_encoded_ahead_wait_for_their_generations(packed, monkeypatch):
    """`encode_prompts` encodes the upcoming prompts not kept yet in one encode, streamed as
    the default plan streams (one read of the encoder for all of them), no budget resident,
    either layer by layer.
    Each waits, counted in the footprint, until its generation takes it without encoding;
    the footprint keeps their room until the last is taken, so the batch's generations plan
    once (one search, then the kept plan). Their embeddings are a lone encode's (float32: relative difference <= 1e-6) and the
    images those of generations that encoded their own prompts (<= 1e-5)."""
    from bonsai_mlx import memory
    from bonsai_mlx.errors import BonsaiError
    from bonsai_mlx.executor import Prompts

    models, te = packed.models, packed.text_encoder
    calls, encode = [], te.encode
    monkeypatch.setattr(te, "encode", lambda prompts, **kw: calls.append((list(prompts), kw["stream"], kw["sync"]))
                        or encode(prompts, **kw))
    kw = dict(width=64, height=64, steps=1, guidance=1.0)
    prompts = ["a fern", "a larch in fog", "a fern", "two ferns by a stream"]
    models.prompts = Prompts()
    alone = [packed.generate(p, seed=i, **kw).array for i, p in enumerate(prompts)]
    lone = {p: np.array(models.prompts._embeddings[(p, packed.max_sequence_length, te.dtype)]) for p in prompts}
    for budget, streamed in (("auto", True), (None, False)):
        models.prompts, calls[:] = Prompts(), []
        before = models.footprint(calibrated=False).cached_prompt_bytes
        assert packed.encode_prompts(prompts, 64, 64, memory_budget=budget) == list(dict.fromkeys(prompts))
        # layer by layer, as every batch runs (none encodes one prompt in one graph)
        assert calls == [(list(dict.fromkeys(prompts)), streamed, True)] and models.prompts.waiting == 3
        fp = models.footprint(calibrated=False)
        assert fp.cached_prompt_bytes - before == 3 * fp.prompt_bytes
        assert fp.prompt_bytes == packed.max_sequence_length * te.config.output_dim * 4
        assert packed.encode_prompts(prompts[:2], memory_budget=budget) == []  # kept: nothing to do
        for p in dict.fromkeys(prompts):
            ahead = np.array(models.prompts._ahead[(p, packed.max_sequence_length, te.dtype)])
            assert np.linalg.norm(ahead - lone[p]) <= 1e-6 * np.linalg.norm(lone[p])
        images, searches = [], memory._planned.cache_info().misses
        for i, p in enumerate(prompts):
            images.append(packed.generate(p, seed=i, memory_budget=budget, **kw).array)
            held = models.footprint(calibrated=False).cached_prompt_bytes - before
            assert held == (3 * fp.prompt_bytes if models.prompts.waiting else 0), (i, held)
        assert memory._planned.cache_info().misses - searches == (budget is not None)
        assert len(calls) == 1 and models.prompts.waiting == 0
        for a, b in zip(images, alone):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert packed.encode_prompts(["a lone birch"], 64, 64, memory_budget=None) == []  # its generation encodes it
    with pytest.raises(BonsaiError, match="prompt must be a string"):
        packed.encode_prompts(["a fern", None])


def test_a_prompt_list_reads_the_encoder_once_a_batch(packed, monkeypatch):
    """Called before every generation of a prompt list (as the CLI does), `encode_prompts`
    encodes the next batch only once the last one is used up: 7 prompts in batches of at most
    3 take two encodes ahead (3, 3) and the last prompt its generation's own, not a read of
    the encoder for every prompt or two freed from a batch still waiting."""
    from bonsai_mlx import memory
    from bonsai_mlx.executor import Prompts

    models, te = packed.models, packed.text_encoder
    calls, encode = [], te.encode
    monkeypatch.setattr(te, "encode", lambda prompts, **kw: calls.append(len(prompts)) or encode(prompts, **kw))
    monkeypatch.setattr(memory, "MAX_TEXT_BATCH", 3)
    models.prompts = Prompts()
    prompts = [f"a spruce, take {i}" for i in range(7)]
    encoded = []
    for i, p in enumerate(prompts):
        encoded.append(packed.encode_prompts(prompts[i:], 64, 64, guidance=1.0, memory_budget=None))
        packed.generate(p, width=64, height=64, steps=1, guidance=1.0, seed=i, memory_budget=None)
    assert encoded == [prompts[:3], [], [], prompts[3:6], [], [], []]
    assert calls == [3, 3, 1] and models.prompts.waiting == 0


def test_prompts_encoded_ahead_are_freed_one_by_one(packed):
    """Each prompt encoded ahead is a copy of its own: once its generation's cache lets it go,
    its bytes go, not held by the batch it came from."""
    from bonsai_mlx.executor import PROMPT_CACHE, Prompts

    models = packed.models
    models.prompts = Prompts()
    prompts = [f"a birch, take {i}" for i in range(PROMPT_CACHE + 2)]
    packed.encode_prompts(prompts, 64, 64, memory_budget=None)
    mx.synchronize()
    held = mx.get_active_memory()
    one = models.footprint(calibrated=False).prompt_bytes
    for p in prompts[:2]:
        models.prompts._ahead.pop((p, packed.max_sequence_length, packed.text_encoder.dtype))
    mx.synchronize()
    assert held - mx.get_active_memory() >= 2 * one
