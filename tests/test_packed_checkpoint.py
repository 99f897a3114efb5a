"""Packed transformers (official MLX packs, our packs, PTQ on load) against diffusers
running the dense weights the pack encodes."""

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.torch import save_file

from bonsai_mlx import load_transformer
from bonsai_mlx.errors import BonsaiError, ConfigError, WeightsError
from bonsai_mlx.packed_checkpoint import save_packed
from bonsai_mlx.packed_linear import PackedLinear
from bonsai_mlx.packing import dequantize
from fixtures import make_flux2 as fx
from fixtures import make_packs

# The reference backend computes packed matmuls in float32: float32 parity holds.
F32_BOUND = 1e-4


def rel_err(a, b):
    return float(np.linalg.norm(np.float64(a) - b) / np.linalg.norm(np.float64(b)))


def run(model, inputs):
    out = model(mx.array(inputs["hidden_states"]), mx.array(inputs["encoder_hidden_states"]),
                mx.array(inputs["timestep"]), mx.array(inputs["img_ids"]), mx.array(inputs["txt_ids"]))
    return np.array(out.astype(mx.float32))


def packed_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


@pytest.fixture(scope="module", params=[1, 2], ids=["binary", "ternary"])
def official(request, tmp_path_factory):
    bits = request.param
    model = fx.build_model("packable", seed=3)
    d = make_packs.make_official_pack(model, tmp_path_factory.mktemp(f"pack{bits}") / "transformer-packed-mflux", bits)
    return bits, model, d


def test_official_pack_matches_diffusers(official):
    bits, ref_model, d = official
    inputs = fx.make_inputs("packable", batch=2, grid=(2, 3), txt_len=5)
    model = load_transformer(d.parent, dtype=mx.float32, backend="reference")  # the pack root works too
    layers = packed_layers(model)
    assert len(layers) == 12 + 2 * 2
    assert {m.fmt for m in layers.values()} == {"binary" if bits == 1 else "ternary"}
    err = rel_err(run(model, inputs), fx.reference_forward(ref_model, inputs))
    assert err <= F32_BOUND, err


def test_official_pack_dequantizes_bit_exactly(official):
    """Every packed layer decodes to exactly what MLX's own affine dequantize gives."""
    bits, _, d = official
    raw = mx.load(str(d / "diffusion_pytorch_model.safetensors"))
    model = load_transformer(d, dtype=mx.float16)
    for name, layer in packed_layers(model).items():
        ref = mx.dequantize(raw[f"{name}.weight"], raw[f"{name}.scales"].astype(mx.float16),
                            raw[f"{name}.biases"].astype(mx.float16), group_size=128, bits=bits)
        ours = dequantize(layer.packed, mx.float16)
        assert mx.array_equal(ref.view(mx.uint16), ours.view(mx.uint16)), name


def test_our_pack_round_trips(official, tmp_path):
    _, ref_model, d = official
    inputs = fx.make_inputs("packable")
    model = load_transformer(d, dtype=mx.float32, backend="reference")
    before = run(model, inputs)
    save_packed(model, tmp_path / "ours")
    again = load_transformer(tmp_path / "ours", dtype=mx.float32, backend="reference")
    np.testing.assert_array_equal(run(again, inputs), before)
    qc = json.loads((tmp_path / "ours" / "quantization_config.json").read_text())
    assert qc["format"] == "bonsai" and qc["group_size"] == 128


@pytest.mark.parametrize("fmt", ["binary", "ternary", "ternary2"])
def test_quantize_on_load_matches_diffusers_with_dequantized_weights(tmp_path, fmt):
    import torch
    ref_model = fx.build_model("packable", seed=4)
    fx.save_diffusers(ref_model, tmp_path / "dense")
    model = load_transformer(tmp_path / "dense", dtype=mx.float32, quantize=fmt, backend="reference")
    layers = packed_layers(model)
    assert len(layers) == 16
    with torch.no_grad():  # put the packed values into the reference model
        for name, layer in layers.items():
            w = np.array(dequantize(layer.packed, mx.float32))
            ref_model.get_submodule(name).weight.copy_(torch.from_numpy(w))
    inputs = fx.make_inputs("packable")
    assert rel_err(run(model, inputs), fx.reference_forward(ref_model, inputs)) <= F32_BOUND


def test_packed_resident_size_is_small(official):
    bits, _, d = official
    model = load_transformer(d, dtype=mx.float16)
    for layer in packed_layers(model).values():
        n, k = layer.out_features, layer.in_features
        bits_total = 8 * (layer.weight.nbytes + layer.scales.nbytes)
        # binary: K bits + 16 per 128; ternary: 8 bits per 5 weights (rows padded to whole bytes) + 16 per 128
        expected = n * (k + 16 * k // 128) if bits == 1 else n * (8 * -(-k // 5) + 16 * k // 128)
        assert bits_total == expected, (bits_total, expected)


# ---- mismatches get clear errors ----

def _rewrite(d, tmp_path, edit_tensors=None, qc=None):
    import shutil
    out = tmp_path / "edited"
    shutil.copytree(d, out)
    if qc is not None:
        (out / "quantization_config.json").write_text(json.dumps(qc))
    if edit_tensors is not None:
        from safetensors.torch import load_file as tload
        t = tload(str(out / "diffusion_pytorch_model.safetensors"))
        edit_tensors(t)
        save_file(t, str(out / "diffusion_pytorch_model.safetensors"))
    return out


def test_config_bits_disagree_with_tensors(official, tmp_path):
    bits, _, d = official
    bad = _rewrite(d, tmp_path, qc={"bits": 3 - bits, "group_size": 128})
    with pytest.raises(WeightsError, match="does quantization_config.json match"):
        load_transformer(bad)


def test_unsupported_quant_config(official, tmp_path):
    _, _, d = official
    with pytest.raises(ConfigError, match="bits=4"):
        load_transformer(_rewrite(d, tmp_path, qc={"bits": 4, "group_size": 64}))


def test_scales_of_wrong_shape(official, tmp_path):
    _, _, d = official
    name = "single_transformer_blocks.0.attn.to_out"
    bad = _rewrite(d, tmp_path, edit_tensors=lambda t: t.update(
        {f"{name}.scales": t[f"{name}.scales"][:, :-1].contiguous(), f"{name}.biases": t[f"{name}.biases"][:, :-1].contiguous()}))
    with pytest.raises(WeightsError, match=name):
        load_transformer(bad)


@pytest.mark.parametrize("where", [0, "middle", -1])
def test_a_faulty_layer_is_named_wherever_it_is(official, tmp_path, where):
    """Layers are converted and checked in flight, one behind the next: a fault in the
    first, a middle or the last layer read is still reported, naming that layer."""
    bits, _, d = official
    from safetensors import safe_open
    with safe_open(str(d / "diffusion_pytorch_model.safetensors"), "np") as f:
        names = sorted(k[: -len(".scales")] for k in f.keys() if k.endswith(".scales"))
    name = names[len(names) // 2 if where == "middle" else where]

    def corrupt(t):
        if bits == 1:  # one group whose bias is not -scale / 2
            t[f"{name}.biases"][0, 0] = t[f"{name}.biases"][0, 0] * 3
        else:  # one weight with code 3
            import torch
            t[f"{name}.weight"].view(torch.int32)[0, 0] |= 3
    bad = _rewrite(d, tmp_path, edit_tensors=corrupt)
    rule = "not a binary pack: 1 groups" if bits == 1 else "not a ternary pack: 1 weights use code 3"
    with pytest.raises(WeightsError, match=f"{name}: {rule}"):
        load_transformer(bad)


def test_the_earlier_faulty_layer_is_reported_first(official, tmp_path):
    """A layer's data is checked while the next layer is read: when the next one is missing a
    tensor, the earlier layer's fault is still the error, as when each was checked in turn."""
    bits, _, d = official
    from safetensors import safe_open
    with safe_open(str(d / "diffusion_pytorch_model.safetensors"), "np") as f:
        first, second = sorted(k[: -len(".scales")] for k in f.keys() if k.endswith(".scales"))[:2]

    def corrupt(t):
        t[f"{first}.biases"][0, 0] = t[f"{first}.biases"][0, 0] * 3
        t.pop(f"{second}.biases")
    with pytest.raises(WeightsError, match=f"{first}: not a"):
        load_transformer(_rewrite(d, tmp_path, edit_tensors=corrupt))


def test_missing_biases(official, tmp_path):
    _, _, d = official
    name = "transformer_blocks.0.attn.to_q"
    bad = _rewrite(d, tmp_path, edit_tensors=lambda t: t.pop(f"{name}.biases"))
    with pytest.raises(WeightsError, match=f"{name}.biases"):
        load_transformer(bad)


def test_quantize_already_packed_and_unknown_format(official, tmp_path):
    _, _, d = official
    with pytest.raises(ConfigError, match="already packed"):
        load_transformer(d, quantize="binary")
    with pytest.raises(BonsaiError, match="backend"):
        load_transformer(d, backend="tpu")
