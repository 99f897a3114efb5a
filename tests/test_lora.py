"""LoRA on packed weights against diffusers (PEFT) with the same LoRA on the dequantized weights."""

import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from safetensors.torch import save_file

from bonsai_mlx import BonsaiPipeline
from bonsai_mlx.errors import BonsaiError, WeightsError
from bonsai_mlx.lora import LoraLinear, read_lora
from bonsai_mlx.memory import MemoryPlan
from bonsai_mlx.packed_linear import PackedLinear
from fixtures import make_lora as ml
from fixtures import make_packs
from fixtures import make_pipeline as mp

W, H = 96, 64
PROMPT = "a bonsai tree on a desk, soft morning light"
# Final images within 2/255 (max abs, float32), the bound of the plain pack against diffusers:
# the LoRA terms are float32 matmuls on both sides, far below a pixel step.
IMAGE_BOUND = 2 / 255
# A layer's update B A * scale read by us against diffusers' conversion of the same file:
# float32 products of the same numbers, relative to the update's largest entry.
DELTA_REL = 1e-6

BLOCKS = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
          "double_blocks.0.txt_mlp.0", "double_blocks.0.img_mlp.2", "single_blocks.0.linear1",
          "single_blocks.1.linear1", "single_blocks.1.linear2"]
KOHYA_TOP = list(ml.TOP_KOHYA)
ALL_TOP = KOHYA_TOP + list(ml.TOP_OTHER)


def ours(path, **kw):
    return BonsaiPipeline.from_pretrained(path, dtype=mx.float32, text_layers=mp.TEXT_LAYERS, **kw)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny distilled pipeline as a binary pack; diffusers' transformer holds exactly the
    dense weights the pack encodes."""
    tmp = tmp_path_factory.mktemp("lora")
    ref_pipe, path = mp.make_pipeline(tmp / "distilled", is_distilled=True, seed=5)
    root = tmp / "pack"
    for part in ("text_encoder", "tokenizer", "vae", "model_index.json"):
        (shutil.copytree if (path / part).is_dir() else shutil.copy)(path / part, root / part)
    make_packs.make_official_pack(ref_pipe.transformer, root / "transformer-packed-mflux", bits=1)
    return ref_pipe, root, tmp


def deltas_ours(path) -> dict:
    return {k: np.array((u.b @ u.a).astype(mx.float32)) * u.scale for k, u in read_lora(path).items()}


def deltas_diffusers(path) -> dict:
    sd, meta = Flux2KleinPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    meta = {k.removeprefix("transformer."): v for k, v in (meta or {}).items()}
    scale = meta["lora_alpha"] / meta["r"] if meta else 1.0
    names = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in sd}
    return {n: (sd[f"transformer.{n}.lora_B.weight"] @ sd[f"transformer.{n}.lora_A.weight"]).numpy() * scale
            for n in names}


@pytest.mark.parametrize("style, alpha", [("diffusers", None), ("diffusers", 2.0), ("bfl", None),
                                          ("peft", None), ("kohya", 2.0), ("kohya", None)])
def test_key_styles_read_as_diffusers_converts_them(packed, style, alpha):
    ref_pipe, _, tmp = packed
    lora = ml.make_lora(ref_pipe.transformer, BLOCKS + KOHYA_TOP, rank=4, seed=3)
    path = ml.save(lora, tmp / f"{style}-{alpha}.safetensors", style, alpha)
    got, want = deltas_ours(path), deltas_diffusers(path)
    assert set(got) == set(want) and len(got) == 3 * 2 + 6 + len(KOHYA_TOP)  # q, k, v split out of each qkv
    expected = {n: b.numpy() @ a.numpy() for n, (a, b) in ml.to_diffusers(lora).items()}  # the same update
    for name in want:
        err = np.abs(got[name] - want[name]).max() / np.abs(want[name]).max()
        assert err <= DELTA_REL, f"{style}: {name} differs by {err:.2e}"
        assert np.abs(got[name] - expected[name]).max() / np.abs(expected[name]).max() <= DELTA_REL


def test_kohya_block_diagonal_qkv_splits_its_rank(packed):
    """kohya's qkv whose up matrix is block-diagonal over three rank groups: each of q, k, v
    keeps only its group (as diffusers' sparse split), with the same products."""
    ref_pipe, _, tmp = packed
    g = torch.Generator().manual_seed(9)
    D = ref_pipe.transformer.config.num_attention_heads * ref_pipe.transformer.config.attention_head_dim
    down, up = torch.randn(6, D, generator=g), torch.zeros(3 * D, 6)
    for i in range(3):
        up[i * D:(i + 1) * D, 2 * i:2 * i + 2] = torch.randn(D, 2, generator=g)
    path = tmp / "sparse.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(3.0)}, str(path))
    ranks = {k: u.a.shape[0] for k, u in read_lora(path).items()}
    assert ranks == {f"transformer_blocks.0.attn.to_{c}": 2 for c in "qkv"}
    got, want = deltas_ours(path), deltas_diffusers(path)
    for name in want:
        assert np.abs(got[name] - want[name]).max() / np.abs(want[name]).max() <= DELTA_REL


def test_lora_on_binary_pack_matches_diffusers(packed):
    """Two LoRAs (diffusers keys with metadata alpha on packed and dense layers; kohya keys
    with alpha on block layers) on our binary pack, against diffusers with both loaded through
    PEFT on the dequantized weights: at two scale settings, run in parts, and unloaded."""
    pytest.importorskip("peft")
    ref_pipe, root, tmp = packed
    fa = ml.save(ml.make_lora(ref_pipe.transformer, BLOCKS + ALL_TOP, rank=4, seed=1), tmp / "a", "diffusers", 8.0)
    fb = ml.save(ml.make_lora(ref_pipe.transformer, BLOCKS[:3] + BLOCKS[5:7], rank=3, seed=2),
                 tmp / "b.safetensors", "kohya", 1.5)
    noise = mp.initial_noise(W, H, seed=4)
    ref_plain = mp.run_reference(ref_pipe, PROMPT, W, H, 4, noise)
    pipe = ours(root, backend="reference")
    plain = pipe.generate(PROMPT, width=W, height=H, latents=noise).array
    assert np.abs(plain - ref_plain).max() <= IMAGE_BOUND

    try:
        ref_pipe.load_lora_weights(str(fa), adapter_name="one")
        ref_pipe.load_lora_weights(str(fb), adapter_name="two")
        ref_pipe.set_adapters(["one", "two"], adapter_weights=[0.8, -0.6])
        ref_both = mp.run_reference(ref_pipe, PROMPT, W, H, 4, noise)
        ref_pipe.set_adapters(["one", "two"], adapter_weights=[1.3, 0.0])
        ref_a = mp.run_reference(ref_pipe, PROMPT, W, H, 4, noise)
    finally:
        ref_pipe.unload_lora_weights()
    assert np.abs(ref_both - ref_plain).max() > 10 * IMAGE_BOUND  # the LoRAs change the image

    a, b = pipe.load_lora(fa, 0.8, name="a"), pipe.load_lora(fb, -0.6)
    assert pipe.loras == [("a", str(fa), 0.8), ("b", str(fb), -0.6)]
    adapted = [m for _, m in pipe.transformer.named_modules() if isinstance(m, LoraLinear)]
    assert sum(isinstance(m.base, PackedLinear) for m in adapted) == 12  # 6 + 6 split/packed block layers
    assert len(adapted) == 12 + len(ALL_TOP)
    for label, kw in (("one graph", {}), ("in parts", {"plan": MemoryPlan(sync=True, token_chunk=16, overlap=True, hidden_parts=2)})):
        diff = np.abs(pipe.generate(PROMPT, width=W, height=H, latents=noise, **kw).array - ref_both).max()
        assert diff <= IMAGE_BOUND, f"{label}: max abs difference {diff * 255:.2f}/255"
    pipe.release_transformer()  # read again from the pack before denoising: the LoRAs go back on
    diff = np.abs(pipe.generate(PROMPT, width=W, height=H, latents=noise).array - ref_both).max()
    assert diff <= IMAGE_BOUND, f"reloaded: max abs difference {diff * 255:.2f}/255"
    pipe.set_lora_scale(a, 1.3)
    pipe.set_lora_scale(b, 0.0)
    diff = np.abs(pipe.generate(PROMPT, width=W, height=H, latents=noise).array - ref_a).max()
    assert diff <= IMAGE_BOUND, f"rescaled: max abs difference {diff * 255:.2f}/255"
    pipe.unload_lora()
    assert not any(isinstance(m, LoraLinear) for _, m in pipe.transformer.named_modules())
    unloaded = pipe.generate(PROMPT, width=W, height=H, latents=noise).array
    assert np.abs(unloaded - ref_plain).max() <= IMAGE_BOUND
    np.testing.assert_array_equal(unloaded, plain)  # the base layers were never touched


def bad_lora(tmp, name, tensors):
    path = tmp / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_bad_loras_are_refused_whole_naming_the_layer(packed):
    ref_pipe, root, tmp = packed
    good = ml.save(ml.make_lora(ref_pipe.transformer, ["single_blocks.0.linear2"], rank=2, seed=4),
                   tmp / "good.safetensors", "bfl")
    pipe = ours(root, backend="reference", lora=[(good, 0.5)])
    before = [(n, type(m).__name__) for n, m in pipe.transformer.named_modules()]
    r, D = 2, 128
    ok = {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(r, D),
          "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.randn(D, r)}
    cases = [
        ({**ok, "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(r, D + 8),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(D, r)},
         r"layer transformer_blocks\.0\.attn\.to_q is \[128, 128\] but the LoRA's A is \[2, 136\]"),
        ({**ok, "transformer.transformer_blocks.3.attn.to_q.lora_A.weight": torch.randn(r, D),
          "transformer.transformer_blocks.3.attn.to_q.lora_B.weight": torch.randn(D, r)},
         r"layer transformer_blocks\.3\.attn\.to_q is not a linear layer of this transformer"),
        ({**ok, "transformer.transformer_blocks.0.attn.norm_q.lora_A.weight": torch.randn(r, 64),
          "transformer.transformer_blocks.0.attn.norm_q.lora_B.weight": torch.randn(64, r)},
         r"layer transformer_blocks\.0\.attn\.norm_q is not a linear layer"),
        ({**ok, "lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.randn(r, D),
          "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.randn(6 * D, r)},
         r"lora_unet_double_blocks_0_img_mod_lin names no layer"),
        ({**ok, "transformer.transformer_blocks.0.attn.to_k.weight": torch.randn(D, D)},
         r"unrecognised key transformer\.transformer_blocks\.0\.attn\.to_k\.weight"),
        ({"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(r, D)},
         r"transformer\.transformer_blocks\.0\.attn\.to_k has no up/B matrix"),
        ({**ok, "transformer.transformer_blocks.0.attn.to_k.lora_magnitude_vector": torch.randn(D)},
         "is a DoRA adapter"),
        ({"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": torch.randn(4, 4)}, "is a LoKr adapter"),
    ]
    for i, (tensors, pattern) in enumerate(cases):
        with pytest.raises(WeightsError, match=pattern):
            pipe.load_lora(bad_lora(tmp, f"bad{i}", tensors))
        assert pipe.loras == [("good", str(good), 0.5)]  # the loaded LoRA stays, nothing of the bad one
        assert [(n, type(m).__name__) for n, m in pipe.transformer.named_modules()] == before
    with pytest.raises(BonsaiError, match="does not exist"):
        ours(root, lora=[(tmp / "missing.safetensors", 1.0)])
    with pytest.raises(BonsaiError, match="already loaded"):
        pipe.load_lora(good)
    with pytest.raises(BonsaiError, match="no LoRA named 'nope'"):
        pipe.set_lora_scale("nope", 1.0)


@pytest.mark.parametrize("base_kind", ["packed", "dense"])
def test_adapter_rows_are_the_rows_of_the_whole(base_kind):
    """LoraLinear.rows(r0, r1) computes exactly output rows [r0, r1) of the adapted layer
    (float32: the same products, summed the same way; bound 1e-6 relative)."""
    g = np.random.default_rng(0)
    w = mx.array(g.standard_normal((48, 128)).astype(np.float32) / 11)
    base = PackedLinear.from_dense(w, "binary", backend="reference") if base_kind == "packed" else nn.Linear(128, 48)
    updates = [(mx.array(g.standard_normal((r, 128)).astype(np.float32)),
                mx.array(g.standard_normal((48, r)).astype(np.float32)), s) for r, s in ((3, 0.7), (2, -1.5))]
    layer, x = LoraLinear(base, updates), mx.array(g.standard_normal((1, 5, 128)).astype(np.float32))
    full = np.array(layer(x))
    part = np.array(layer.rows(10, 40)(x))
    assert np.abs(part - full[..., 10:40]).max() <= 1e-6 * np.abs(full).max()
    plain = np.array(base(x))
    manual = plain + sum(s * (np.array(x) @ np.array(a).T) @ np.array(b).T for a, b, s in updates)
    assert np.abs(full - manual).max() <= 1e-5 * np.abs(manual).max()


def test_a_lora_set_is_read_as_one_snapshot():
    """A plan reads the LoRA set (the footprint's bytes and scales) while another thread may
    load or unload one: the read sees the set as it was when it started, and does not fail
    on a change made meanwhile."""
    from bonsai_mlx.lora import Lora, LoraSet, LoraUpdate

    loras = LoraSet()
    update = LoraUpdate(mx.zeros((2, 4)), mx.zeros((4, 2)), 1.0)

    class Changing(Lora):  # reading its bytes stands for another thread changing the set then
        @property
        def nbytes(self):
            loras._loras.setdefault("late", Lora("late", "late", 1.0, {"x": update}))
            return super().nbytes

    for name in ("a", "b"):
        loras._loras[name] = Changing(name, name, 1.0, {"x": update})
    assert loras.nbytes == 2 * 2 * 2 * 4 * 4  # a and b, each 2 x (2 x 4) float32; not "late"
    assert [lora.name for lora in loras] == ["a", "b", "late"]
