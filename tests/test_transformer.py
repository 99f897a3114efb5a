"""The MLX transformer against diffusers' Flux2Transformer2DModel on random weights."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from bonsai_mlx import KLEIN_4B, KLEIN_9B, TransformerConfig, load_transformer
from bonsai_mlx.errors import ConfigError, WeightsError
import mlx.nn as nn

from bonsai_mlx.packed_linear import PackedLinear
from bonsai_mlx.execution import Execution
from bonsai_mlx.transformer import Flux2Transformer, linear_rows
from fixtures import make_flux2 as fx

# Relative L2 bounds: ||out - ref|| / ||ref||.
BOUNDS = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}
MX = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
JOIN_ALL = 1 << 30  # Execution.join_upto: blocks of any length join their parts


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (diffusers model, diffusers dir, BFL file) for every tiny config."""
    root = tmp_path_factory.mktemp("flux2")
    out = {}
    for i, name in enumerate(fx.CONFIGS):
        model = fx.build_model(name, seed=i)
        # tiny_a is saved in shards with an index, the others as one file.
        fx.save_diffusers(model, root / name, max_shard_size="20KB" if name == "tiny_a" else None)
        out[name] = (model, root / name, fx.save_bfl(model, root / f"{name}-bfl.safetensors"))
    return out


def run(model, inputs, dtype, batched_ids=False, execution=Execution()):
    a = lambda x: mx.array(x).astype(dtype)
    img_ids, txt_ids = mx.array(inputs["img_ids"]), mx.array(inputs["txt_ids"])
    if batched_ids:
        B = inputs["hidden_states"].shape[0]
        img_ids = mx.broadcast_to(img_ids[None], (B, *img_ids.shape))
        txt_ids = mx.broadcast_to(txt_ids[None], (B, *txt_ids.shape))
    out = model(
        a(inputs["hidden_states"]), a(inputs["encoder_hidden_states"]), mx.array(inputs["timestep"]),
        img_ids, txt_ids, guidance=None if inputs["guidance"] is None else mx.array(inputs["guidance"]),
        execution=execution,
    )
    return np.array(out.astype(mx.float32))


@pytest.mark.parametrize("name", list(fx.CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_matches_diffusers(saved, name, dtype):
    ref_model, directory, _ = saved[name]
    inputs = fx.make_inputs(name, batch=2, grid=(3, 5), txt_len=7)
    ref = fx.reference_forward(ref_model, inputs, TORCH[dtype])
    model = load_transformer(directory, dtype=MX[dtype])
    out = run(model, inputs, MX[dtype])
    cfg = fx.CONFIGS[name]
    assert out.shape == (2, 15, cfg.get("out_channels") or cfg["in_channels"])
    err = rel_err(out, ref)
    assert err <= BOUNDS[dtype], f"{name} {dtype}: relative error {err:.2e} > {BOUNDS[dtype]}"
    if dtype != "float32":
        # Random weights make both implementations drift from float32 in low precision
        # (diffusers itself: 0.4-31%). Ours must drift no more than the reference does.
        ref32 = fx.reference_forward(ref_model, inputs, torch.float32)
        assert rel_err(out, ref32) <= 1.25 * rel_err(ref, ref32) + 1e-3


def test_batched_ids_and_other_lengths(saved):
    ref_model, directory, _ = saved["tiny_b"]
    inputs = fx.make_inputs("tiny_b", batch=2, grid=(4, 2), txt_len=11, seed=5)
    ref = fx.reference_forward(ref_model, inputs)
    model = load_transformer(directory, dtype=mx.float32)
    assert rel_err(run(model, inputs, mx.float32, batched_ids=True), ref) <= BOUNDS["float32"]


def test_memory_saving_modes_change_nothing(saved):
    """Token chunks, attention chunks, passes over the MLP hidden units and block-by-block
    evaluation, with or without a flush after every part, give the same output."""
    ref_model, directory, _ = saved["tiny_a"]
    inputs = fx.make_inputs("tiny_a", batch=2, grid=(4, 6), txt_len=9)
    model = load_transformer(directory, dtype=mx.float32)
    plain = run(model, inputs, mx.float32)
    for ex in (Execution(token_chunk=5, attention_rows=7, sync=True), Execution(sync=True, overlap=True),
               Execution(token_chunk=5, sync=True, overlap=True), Execution(hidden_parts=3),
               Execution(hidden_parts=4, sync=True, overlap=True), Execution(hidden_parts=2, sync=True),
               Execution(sync=True, overlap=True, attention_apart=True),
               Execution(token_chunk=5, hidden_parts=2, sync=True, overlap=True),
               Execution(token_chunk=5, hidden_parts=2, sync=True, overlap=True, flush_above=0),
               Execution(hidden_parts=2, sync=True, overlap=True, join_upto=JOIN_ALL),
               Execution(hidden_parts=4, sync=True, overlap=True, join_upto=JOIN_ALL, flush_above=0)):
        chunked = run(model, inputs, mx.float32, execution=ex)
        np.testing.assert_allclose(chunked, plain, rtol=0, atol=1e-5 * np.abs(plain).max())
        assert rel_err(chunked, fx.reference_forward(ref_model, inputs)) <= BOUNDS["float32"]


def test_blocks_over_all_tokens_start_parts_only_where_memory_is_decided(saved, monkeypatch):
    """With the MLP in passes over all tokens, a block starts a part for its attention (q, k
    and v in it), one per pass and one that ends it: a double block 1 + 2 x 2 + 1, a single
    block 1 + 2 + 1. Joined (`Execution.joins`: two in flight, up to `join_upto` tokens), the
    attention runs in the first pass's part and each stream's last pass in the block's end: a
    double block 2 + 1, a single block 1 + 1. With its attention apart and the MLP in one
    pass: the attention and the rest. In token chunks, each chunk's q, k and v and output are
    parts too."""
    from bonsai_mlx import execution

    _, directory, _ = saved["tiny_a"]
    inputs = fx.make_inputs("tiny_a", batch=1, grid=(4, 6), txt_len=9)
    model = load_transformer(directory, dtype=mx.float32)
    cfg = model.config
    started, call = [], execution.Pace.__call__
    monkeypatch.setattr(execution.Pace, "__call__", lambda self, *a, **k: (started.append(1) if self.active else None,
                                                                            call(self, *a, **k))[1])
    for ex, double, single in ((Execution(sync=True, overlap=True, hidden_parts=2), 6, 4),
                               (Execution(sync=True, hidden_parts=2), 6, 4),
                               (Execution(sync=True, overlap=True), 1, 1),
                               (Execution(sync=True, overlap=True, attention_apart=True), 2, 2),
                               (Execution(sync=True, overlap=True, attention_apart=True, hidden_parts=2), 6, 4),
                               (Execution(sync=True, overlap=True, hidden_parts=2, join_upto=JOIN_ALL), 2 + 1, 1 + 1),
                               (Execution(sync=True, overlap=True, hidden_parts=4, join_upto=JOIN_ALL), 2 * 3 + 1, 3 + 1),
                               (Execution(sync=True, hidden_parts=2, join_upto=JOIN_ALL), 6, 4),  # strict: never
                               # 24 image and 9 text tokens: over 32, blocks do not join
                               (Execution(sync=True, overlap=True, hidden_parts=2, join_upto=32), 6, 4),
                               # 24 image and 9 text tokens in 16-token chunks. Double: 1 + 2 chunks'
                               # q/k/v, the attention, 2 image chunks of the output projection, 2
                               # image chunks of 2 passes and an output each, 1 text chunk of 2
                               # passes, the end. Single: 3 chunks of 33 tokens' q/k/v, the
                               # attention, 3 chunks of 2 passes and an output, the end.
                               (Execution(token_chunk=16, sync=True, overlap=True, hidden_parts=2),
                                3 + 1 + 2 + 2 * 3 + 2 + 1, 3 + 1 + 3 * 3 + 1)):
        started.clear()
        run(model, inputs, mx.float32, execution=ex)
        assert len(started) == cfg.num_layers * double + cfg.num_single_layers * single, ex


def test_paced_blocks_keep_at_most_three_parts_in_flight(saved, monkeypatch):
    """Two parts in flight, a part is started and the host then waits for the one before: on a
    device that runs parts in order, a block in parts never has more than three parts started and
    not known finished (the estimate's OVERLAP_PARTS), also where it runs its MLP in passes over
    all its tokens without its q, k and v as a part of their own (its attention waits for the
    block's inputs instead); whole blocks, their attention apart or not, never more than two
    blocks. MLX signals a started part's arrays when all of it is done: a wait on an array that
    no started part returned (one inside the newest part's graph) waits for every part, the
    newest too, and idles the device meanwhile. Those happen only where a block's inputs are no
    part's result (the step's first double block and first single block)."""
    from bonsai_mlx import execution
    from bonsai_mlx.memory import OVERLAP_PARTS

    _, directory, _ = saved["tiny_a"]
    inputs = fx.make_inputs("tiny_a", batch=1, grid=(4, 6), txt_len=9)
    model = load_transformer(directory, dtype=mx.float32)
    started, done, most, stalls = [], [0], [0], [0]  # the arrays each started part returned (kept: no id reused)
    real_eval, real_async = mx.eval, mx.async_eval

    def async_eval(*arrays):
        real_async(*arrays)
        started.append(arrays)
        most[0] = max(most[0], len(started) - done[0])

    def wait(*arrays):
        real_eval(*arrays)
        hit = [i for i, part in enumerate(started) if any(a is b for a in arrays for b in part)]
        if not hit and done[0] < len(started):
            stalls[0] += 1
        done[0] = max(done[0], hit[-1] + 1 if hit else len(started))

    monkeypatch.setattr(execution.mx, "async_eval", async_eval)
    monkeypatch.setattr(execution.mx, "eval", wait)
    for ex, bound in ((Execution(sync=True, overlap=True, hidden_parts=2), OVERLAP_PARTS),
                      (Execution(sync=True, overlap=True, hidden_parts=4), OVERLAP_PARTS),
                      (Execution(sync=True, overlap=True, hidden_parts=2, join_upto=JOIN_ALL), OVERLAP_PARTS),
                      (Execution(sync=True, overlap=True, hidden_parts=4, join_upto=JOIN_ALL), OVERLAP_PARTS),
                      (Execution(sync=True, overlap=True), 2),  # whole blocks
                      (Execution(sync=True, overlap=True, attention_apart=True), 2 * 2)):  # two parts a block
        started.clear()
        done[0] = most[0] = stalls[0] = 0
        run(model, inputs, mx.float32, execution=ex)
        assert 2 <= most[0] <= bound, (ex, most[0])
        assert stalls[0] <= 2, (ex, stalls[0])

@pytest.mark.parametrize("name", ["tiny_a", "tiny_c"])  # tiny_c embeds guidance
def test_every_steps_modulations_at_once_drive_each_step_to_diffusers(saved, name):
    """`modulations` over a sampler's sigmas at once, taken step by step (`Modulations.step`),
    give `forward` diffusers' output at each of those timesteps, for a batch of two."""
    ref_model, directory, _ = saved[name]
    model = load_transformer(directory, dtype=mx.float32)
    sigmas = [1.0, 0.71, 0.35, 0.05]
    guidance = 3.5 if fx.CONFIGS[name]["guidance_embeds"] else None
    mods = model.modulations(mx.array(sigmas), mx.float32,
                             None if guidance is None else mx.array([guidance] * len(sigmas)))
    for i, sigma in enumerate(sigmas):
        inputs = fx.make_inputs(name, batch=2, grid=(3, 4), txt_len=6, seed=10 + i)
        inputs["timestep"] = np.full(2, sigma, np.float32)
        if guidance is not None:
            inputs["guidance"] = np.full(2, guidance, np.float32)
        ctx = model.prepare(mx.array(inputs["encoder_hidden_states"]), mx.array(inputs["img_ids"]),
                            mx.array(inputs["txt_ids"]))
        out = model.forward(mx.array(inputs["hidden_states"]), mods.step(i), ctx)
        err = rel_err(np.array(out), fx.reference_forward(ref_model, inputs))
        assert err <= BOUNDS["float32"], (sigma, err)
        np.testing.assert_allclose(np.array(out), run(model, inputs, mx.float32), rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["diffusers", "bfl"])
def test_a_transformer_source_reads_its_modulation_layers_lazily(saved, which):
    """`TransformerSource.lazy_weights`: exactly the modulation layers' weights, cast as the
    loader casts them, equal to the loaded model's, and nothing read until they are evaluated."""
    from mlx.utils import tree_flatten

    from bonsai_mlx.loading import TransformerSource
    from bonsai_mlx.transformer import MODULATION_LAYERS

    _, directory, bfl_file = saved["tiny_c"]
    config = TransformerConfig.from_json(directory / "config.json")  # a BFL file's RoPE axes
    source = TransformerSource(directory if which == "diffusers" else bfl_file, mx.bfloat16, config=config)
    model = source()
    want = {k: v for k, v in tree_flatten(model.parameters()) if k.startswith(MODULATION_LAYERS)}
    assert {k.split(".")[0] for k in want} == set(MODULATION_LAYERS)
    mx.synchronize()
    before = mx.get_active_memory()
    lazy = source.lazy_weights(MODULATION_LAYERS)
    assert mx.get_active_memory() == before
    assert set(lazy) == set(want)
    for k, w in lazy.items():
        assert w.dtype == mx.bfloat16
        np.testing.assert_array_equal(np.array(w.astype(mx.float32)), np.array(want[k].astype(mx.float32)), k)
    with pytest.raises(WeightsError, match="no weights of"):
        source.lazy_weights(("no_such_layer",))

def test_rereading_a_bfl_output_norm_counts_its_rearranged_copy(saved):
    """A BFL checkpoint's output norm is made anew from the file's tensor (its halves swapped):
    reading it again holds the file's tensor beside the copy, which `cast_read_bytes` counts
    (with nothing cast, that weight's bytes; a diffusers checkpoint's weights are read as they
    are: 0). Measured here: the read peaks at the tensor and its copy."""
    from bonsai_mlx.loading import TransformerSource
    from bonsai_mlx.transformer import MODULATION_LAYERS

    _, directory, bfl_file = saved["tiny_c"]
    config = TransformerConfig.from_json(directory / "config.json")  # a BFL file's RoPE axes
    bfl, diffusers = (TransformerSource(p, mx.float32, config=config) for p in (bfl_file, directory))
    norm = bfl.lazy_weights(MODULATION_LAYERS)["norm_out.linear.weight"]
    assert bfl.cast_read_bytes(MODULATION_LAYERS) == norm.nbytes
    assert diffusers.cast_read_bytes(MODULATION_LAYERS) == 0
    mx.synchronize()
    mx.clear_cache()  # a cached buffer larger than a request would count whole
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(norm)
    beside = mx.get_peak_memory() - base - norm.nbytes  # what the read held beside its result
    assert norm.nbytes <= beside <= bfl.cast_read_bytes(MODULATION_LAYERS) + (16 << 10)


def test_linear_rows_equals_slicing_the_full_output():
    """Running a fused projection part by part gives exactly the parts of the whole."""
    mx.random.seed(3)
    x = mx.random.normal((2, 7, 256))
    dense = nn.Linear(256, 96, bias=True)
    packed = PackedLinear.from_dense(mx.random.normal((96, 256)), "ternary", backend="reference")
    biased = PackedLinear.from_dense(mx.random.normal((96, 256)), "binary", bias=mx.random.normal((96,)),
                                     backend="reference")
    quantized = nn.QuantizedLinear(256, 96, bias=False, group_size=64, bits=4)  # no row path: falls back
    for layer in (dense, packed, biased, quantized):
        full = layer(x)
        for r0, r1 in ((0, 40), (40, 96), (13, 14)):
            np.testing.assert_allclose(linear_rows(layer, x, r0, r1), full[..., r0:r1], rtol=0, atol=1e-5)


def test_bfl_checkpoint_gives_same_output(saved):
    ref_model, directory, bfl_file = saved["tiny_c"]
    inputs = fx.make_inputs("tiny_c")
    cfg = TransformerConfig.from_json(directory / "config.json")
    from_bfl = run(load_transformer(bfl_file, dtype=mx.float32, config=cfg), inputs, mx.float32)
    from_diffusers = run(load_transformer(directory, dtype=mx.float32), inputs, mx.float32)
    np.testing.assert_array_equal(from_bfl, from_diffusers)
    assert rel_err(from_bfl, fx.reference_forward(ref_model, inputs)) <= BOUNDS["float32"]


def test_bfl_checkpoint_infers_klein_shapes(tmp_path):
    """A BFL file with 128-dim heads needs no config: everything is read off its shapes."""
    cfg = dict(fx.CONFIGS["tiny_a"], attention_head_dim=128, num_attention_heads=1,
               axes_dims_rope=(32, 32, 32, 32), mlp_ratio=3.0)
    from diffusers import Flux2Transformer2DModel
    torch.manual_seed(0)
    ref = Flux2Transformer2DModel(**cfg).eval()
    fx.save_bfl(ref, tmp_path / "klein-like.safetensors")
    model = load_transformer(tmp_path / "klein-like.safetensors", dtype=mx.float32)
    got = model.config
    assert (got.num_attention_heads, got.attention_head_dim, got.num_layers, got.num_single_layers) == (1, 128, 2, 2)
    assert (got.in_channels, got.joint_attention_dim, got.mlp_ratio, got.rope_theta) == (16, 40, 3.0, 2000)


def count(model):
    from mlx.utils import tree_flatten
    return sum(v.size for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("cfg", [KLEIN_4B, KLEIN_9B], ids=["klein-4b", "klein-9b"])
def test_full_size_parameter_count_matches_diffusers(cfg):
    """Built lazily from random init: nothing is evaluated, so this costs no memory."""
    d = cfg.to_dict()
    d.pop("_class_name")
    assert count(Flux2Transformer(cfg)) == fx.count_parameters(d)


def test_klein_4b_config_matches_published_architecture():
    c = KLEIN_4B
    assert (c.inner_dim, c.num_layers, c.num_single_layers, c.mlp_hidden_dim, c.joint_attention_dim) == (
        3072, 5, 20, 9216, 7680)
    assert 3.8e9 < count(Flux2Transformer(c)) < 3.95e9


def test_config_from_diffusers_json(saved):
    _, directory, _ = saved["tiny_b"]
    cfg = TransformerConfig.from_json(directory / "config.json")
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.mlp_ratio, cfg.out_channels) == (5, 8, 2.5, 8)
    assert cfg.axes_dims_rope == (2, 2, 2, 2) and cfg.rope_theta == 10000


def test_loading_peak_memory_under_1_15x_weight_bytes(tmp_path):
    """Loading must not hold a checkpoint twice: peak <= 1.15 x the weight bytes, for a
    same-dtype load and for a bf16 -> fp16 cast on the way in."""
    from diffusers import Flux2Transformer2DModel
    cfg = dict(fx.CONFIGS["tiny_a"], attention_head_dim=64, num_attention_heads=6, joint_attention_dim=512,
               axes_dims_rope=(16, 16, 16, 16), num_layers=2, num_single_layers=4)
    torch.manual_seed(0)
    for src, dst in ((torch.float16, mx.float16), (torch.bfloat16, mx.float16)):
        ref = Flux2Transformer2DModel(**cfg).to(src)
        ref.save_pretrained(tmp_path / str(src), safe_serialization=True)
        weight_bytes = sum(p.numel() for p in ref.parameters()) * 2
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        model = load_transformer(tmp_path / str(src), dtype=dst)
        peak = mx.get_peak_memory() - base
        assert weight_bytes > 20e6
        assert peak <= 1.15 * weight_bytes, f"{src}: peak {peak / 1e6:.1f} MB vs weights {weight_bytes / 1e6:.1f} MB"
        del model


# ---- errors: each names what is wrong and how to fix it ----

def test_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_transformer(tmp_path / "nope")


def test_directory_without_config_or_weights(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        load_transformer(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps(fx.CONFIGS["tiny_a"]))
    with pytest.raises(WeightsError, match="no \\*.safetensors"):
        load_transformer(tmp_path / "a")


def test_missing_unexpected_and_misshaped_weights_are_listed(saved, tmp_path):
    from safetensors.numpy import load_file, save_file
    _, directory, _ = saved["tiny_b"]
    sd = load_file(str(directory / "diffusion_pytorch_model.safetensors"))
    sd.pop("proj_out.weight")
    sd["extra.weight"] = np.zeros((2, 2), np.float32)
    sd["x_embedder.weight"] = np.zeros((40, 13), np.float32)
    (tmp_path / "bad").mkdir()
    save_file(sd, str(tmp_path / "bad" / "model.safetensors"))
    (tmp_path / "bad" / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(WeightsError) as e:
        load_transformer(tmp_path / "bad")
    msg = str(e.value)
    assert "missing weights (1): proj_out.weight" in msg
    assert "unexpected weights (1): extra.weight" in msg
    assert "x_embedder.weight: expected [40, 12], got [40, 13]" in msg


def test_corrupt_safetensors(saved, tmp_path):
    _, directory, _ = saved["tiny_b"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text((directory / "config.json").read_text())
    data = (directory / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "c" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or incomplete"):
        load_transformer(tmp_path / "c")


def test_missing_shard_named(saved, tmp_path):
    import shutil
    _, directory, _ = saved["tiny_a"]
    shutil.copytree(directory, tmp_path / "s")
    shard = sorted((tmp_path / "s").glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(WeightsError, match=shard.name):
        load_transformer(tmp_path / "s")


@pytest.mark.parametrize("change, pattern", [
    ({"axes_dims_rope": [4, 4, 4]}, "must add up to attention_head_dim"),
    ({"patch_size": 2}, "patch_size 2 is not supported"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ({"some_new_option": True}, "does not understand"),
    ({"_class_name": "FluxTransformer2DModel"}, "expected 'Flux2Transformer2DModel'"),
])
def test_unrepresentable_config(tmp_path, change, pattern):
    (tmp_path / "config.json").write_text(json.dumps({**fx.CONFIGS["tiny_a"], **change}))
    with pytest.raises(ConfigError, match=pattern):
        load_transformer(tmp_path)


def test_bad_call_shapes(saved):
    model = load_transformer(saved["tiny_a"][1], dtype=mx.float32)
    inputs = fx.make_inputs("tiny_a")
    inputs["img_ids"] = inputs["img_ids"][:-1]
    with pytest.raises(ValueError, match="img_ids must be"):
        run(model, inputs, mx.float32)
