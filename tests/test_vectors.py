"""`export --test-vectors`: every vector checked against the reference, not against our code
that wrote it: packed weights decoded here from the documented bit layout, the blocks by
diffusers' own Flux2 blocks, the schedule by diffusers' scheduler, the VAE tile by diffusers'
AutoencoderKLFlux2, the tokens by transformers' tokenizer and chat template."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from bonsai_mlx import export_bundle
from bonsai_mlx.random_weights import write_random_pack
from test_random_weights import TEXT_LAYERS, TINY


def decode(fmt, data, scales, k):
    """W [N, K] float64 from the bytes, by docs/formats.md (binary: bit k%32 of little-endian
    word k//32, 1 = +s; ternary: trit k%5 of byte k//5, base 3, digit + 1 stored)."""
    data = np.asarray(data)
    if fmt == "binary":
        bits = (data[:, :, None].astype(np.uint64) >> np.arange(32, dtype=np.uint64)) & 1
        v = bits.reshape(data.shape[0], -1)[:, :k].astype(np.float64) * 2 - 1
    else:
        digits = (data[:, :, None].astype(np.int64) // (3 ** np.arange(5))) % 3
        v = digits.reshape(data.shape[0], -1)[:, :k].astype(np.float64) - 1
    return v * np.repeat(np.asarray(scales, np.float64), 128, axis=1)


@pytest.fixture(scope="module", params=["binary", "ternary"])
def bundle(request, tmp_path_factory):
    fmt = request.param
    root = tmp_path_factory.mktemp(f"vec-{fmt}")
    pack = write_random_pack(root / "pack", fmt, **TINY)
    return export_bundle(pack, root / "bundle", fmt, text_layers=TEXT_LAYERS, test_vectors=True), fmt


def load(bundle, name):
    v = json.loads((bundle / "vectors" / "vectors.json").read_text())[name]
    return {k: np.array(a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a)
            for k, a in mx.load(str(bundle.parent / bundle.name / v["file"])).items()}, v


def test_packed_linear_vectors(bundle):
    b, _ = bundle
    for fmt in ("binary", "ternary"):
        v, meta = load(b, f"packed_linear_{fmt}")
        assert meta["packing"] == fmt
        ref = v["x"].astype(np.float64) @ decode(fmt, v["weight"], v["scales"], v["x"].shape[1]).T
        np.testing.assert_allclose(v["y"], ref, rtol=0, atol=1e-4 * np.abs(ref).max())  # float32 sums of 256


def _diffusers_blocks(b, fmt):
    from diffusers import Flux2Transformer2DModel

    cfg = {k: v for k, v in json.loads((b / "transformer" / "config.json").read_text()).items()
           if not k.startswith("_")}
    model = Flux2Transformer2DModel(**cfg).float().eval()
    w = mx.load(str(b / "transformer" / "model.safetensors"))
    sd = {}
    for k, a in w.items():
        if k.endswith(".scales"):
            continue
        if f"{k[:-len('.weight')]}.scales" in w:  # packed: decode the codes here
            base = k[:-len(".weight")]
            sd[k] = decode(fmt, np.array(a), np.array(w[f"{base}.scales"].astype(mx.float32)),
                           model.get_parameter(k).shape[1])
        else:
            sd[k] = np.array(a.astype(mx.float32))
    missing, _ = model.load_state_dict({k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in sd.items()},
                                       strict=False)
    assert not [m for m in missing if "blocks.0." in m]
    return model


def test_block_vectors_match_diffusers(bundle):
    b, fmt = bundle
    model = _diffusers_blocks(b, fmt)
    t = lambda a: torch.tensor(a)  # noqa: E731
    v, _ = load(b, "double_block")
    rot = model.pos_embed(torch.tensor(v["ids"]).long())
    with torch.no_grad():
        txt, img = model.transformer_blocks[0](t(v["img"]), t(v["txt"]), t(v["temb_mod_img"]), t(v["temb_mod_txt"]),
                                               rot)
    for got, ref in ((v["out_img"], img), (v["out_txt"], txt)):
        ref = ref.numpy()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5  # float32 both sides
    v, _ = load(b, "single_block")
    with torch.no_grad():
        out = model.single_transformer_blocks[0](t(v["x"]), None, t(v["temb_mod"]),
                                                 model.pos_embed(torch.tensor(v["ids"]).long()))
    assert np.linalg.norm(v["out"] - out.numpy()) / np.linalg.norm(out.numpy()) < 1e-5


def test_sampler_vector_matches_diffusers(bundle):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    v, _ = load(bundle[0], "sampler_step")
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                        base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                        max_image_seq_len=4096, time_shift_type="exponential")
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=compute_empirical_mu(64, 4))
    np.testing.assert_allclose(v["sigmas"], s.sigmas.numpy(), rtol=0, atol=1e-6)
    step = s.step(torch.tensor(v["v"]), s.timesteps[0], torch.tensor(v["x"])).prev_sample.numpy()
    np.testing.assert_allclose(v["x_next"], step, rtol=0, atol=1e-6)


def test_vae_tile_vector_matches_diffusers(bundle):
    from diffusers import AutoencoderKLFlux2

    b, _ = bundle
    cfg = {k: v for k, v in json.loads((b / "vae" / "config.json").read_text()).items() if not k.startswith("_")}
    ref = AutoencoderKLFlux2(**cfg).float().eval()
    sd = {}
    for k, a in mx.load(str(b / "vae" / "vae.safetensors")).items():
        a = np.array(a.astype(mx.float32))
        target = ref.state_dict()[k]
        sd[k] = torch.tensor(a.transpose(0, 3, 1, 2) if a.ndim == 4 else a.reshape(target.shape))
    ref.load_state_dict(sd, strict=False)
    v, _ = load(b, "vae_tile")
    tokens = torch.tensor(v["tokens"])  # [1, 4, 4C]: a 2x2 grid of packed latents
    B, L, C4 = tokens.shape
    p = tokens.reshape(B, 2, 2, C4).permute(0, 3, 1, 2)  # [B, 4C, 2, 2]
    bn_mean = ref.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    p = p * bn_std + bn_mean
    z = p.reshape(B, C4 // 4, 2, 2, 2, 2).permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // 4, 4, 4)  # (c, pi, pj, h, w)
    with torch.no_grad():
        img = (ref.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(v["image"], img, rtol=0, atol=1e-5)


def test_token_vector_matches_transformers(bundle):
    from transformers import AutoTokenizer

    b, _ = bundle
    v, meta = load(b, "prompt_tokens")
    tok = AutoTokenizer.from_pretrained(str(b / "tokenizer"))
    text = tok.apply_chat_template([{"role": "user", "content": meta["prompt"]}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    enc = tok([text], padding="max_length", truncation=True, max_length=meta["max_length"], return_tensors="np")
    np.testing.assert_array_equal(v["ids"], enc["input_ids"])
    np.testing.assert_array_equal(v["mask"], enc["attention_mask"])
