"""The stage executor: what it does for a plan beyond the models' own execution."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx import BonsaiPipeline, kernels
from bonsai_mlx.executor import slab_tuning
from bonsai_mlx.memory import UNCONSTRAINED, MemoryPlan
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
