"""Qwen3 prompt encoding: bonsai_mlx vs diffusers' Flux2KleinPipeline (+ transformers)
and, for the 4-bit path, vs mlx-lm's own loader on the same quantized weights.

Bounds (relative Frobenius error ||out - ref|| / ||ref|| against diffusers in float32):
  float32 <= 1e-4, float16 and bfloat16 <= 2e-2.
4-bit vs mlx-lm's loader + model on the identical quantized weights: bit-exact through
mx.quantized_matmul; dequantize + matmul (the CPU path) within 1e-5 of it in float32.
Fixtures are tiny random Qwen3s written by tests/fixtures/make_qwen3.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline  # noqa: E402
from transformers import AutoTokenizer, Qwen3ForCausalLM  # noqa: E402

from bonsai_mlx.errors import BonsaiError, ConfigError, PromptTruncatedWarning, WeightsError  # noqa: E402
from bonsai_mlx.text_encoder import load_text_encoder  # noqa: E402

FP32_BOUND = 1e-4
FP16_BOUND = 2e-2
SMALL_LAYERS = (1, 2, 3)  # 4-layer fixture; the real indices are covered by the 28-layer one
L = 48

PROMPTS = ["a cat on a chair", "neon city street at night, rain, reflections, cinematic é 😀"]

_spec = importlib.util.spec_from_file_location("make_qwen3", Path(__file__).parent / "fixtures" / "make_qwen3.py")
make_qwen3 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_qwen3)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def to_np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_qwen3.make_all(tmp_path_factory.mktemp("q3small"), num_layers=4, dtype="float32")


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    # 28 layers so that hidden_states[27] exists; bf16 on disk like the real encoder.
    return make_qwen3.make_all(tmp_path_factory.mktemp("q3deep"), num_layers=28, dtype="bfloat16", quantized=False)


@pytest.fixture(scope="module")
def hf_small(small):
    tok = AutoTokenizer.from_pretrained(small / "tokenizer")
    model = Qwen3ForCausalLM.from_pretrained(small / "text_encoder", dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="module")
def enc_small(small):
    return load_text_encoder(small / "text_encoder", dtype=mx.float32, layers=SMALL_LAYERS)


def diffusers_embeds(model, tok, prompts, max_length, layers):
    """The reference: diffusers' own prompt-encoding function; also returns the
    input_ids / attention_mask it fed the model (captured by a forward pre-hook)."""
    seen = {}

    def grab(_module, args, kwargs):
        seen["ids"] = kwargs["input_ids"].numpy()
        seen["mask"] = kwargs["attention_mask"].numpy()

    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = Flux2KleinPipeline._get_qwen3_prompt_embeds(
                model, tok, prompts, max_sequence_length=max_length, hidden_states_layers=list(layers)
            )
    finally:
        handle.remove()
    return out.float().numpy(), seen["ids"], seen["mask"]


# -- tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("prompts,max_length", [
    (PROMPTS, L),
    ([""], L),  # empty prompt still gets the template
    (["the quick brown fox jumps over the lazy dog " * 4], 16),  # truncated mid-template
])
def test_token_ids_match_diffusers(hf_small, enc_small, prompts, max_length):
    model, tok = hf_small
    _, ref_ids, ref_mask = diffusers_embeds(model, tok, prompts, max_length, SMALL_LAYERS)
    ids, mask = enc_small.tokenize(prompts, max_length=max_length)
    assert ids.shape == (len(prompts), max_length) and mask.dtype == mx.bool_
    np.testing.assert_array_equal(np.array(ids), ref_ids)
    np.testing.assert_array_equal(np.array(mask), ref_mask.astype(bool))


def test_template_and_padding(enc_small):
    tok = enc_small.tokenizer
    ids, mask = enc_small.tokenize(PROMPTS, max_length=L)
    for p, row, m in zip(PROMPTS, np.array(ids), np.array(mask)):
        text = tok.decode(row[m].tolist())
        assert text == f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # right padding
        assert (row[n:] == tok.convert_tokens_to_ids("<|endoftext|>")).all()
    assert np.array(mask).sum(1)[0] < np.array(mask).sum(1)[1]  # the two prompts differ in length


def test_truncation_cuts_the_template(enc_small):
    prompt = "the quick brown fox jumps over the lazy dog " * 4
    tok = enc_small.tokenizer  # the count below is transformers' own, untruncated
    full = len(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True,
                                       enable_thinking=False, return_dict=True)["input_ids"])
    assert full > 16
    with pytest.warns(PromptTruncatedWarning, match=f"is {full} tokens .* its last {full - 16} tokens are dropped"):
        ids, mask = enc_small.tokenize(prompt, max_length=16)
    assert np.array(mask).all()
    think_end = enc_small.tokenizer.convert_tokens_to_ids("</think>")
    assert think_end not in np.array(ids).tolist()[0]


# -- embeddings -----------------------------------------------------------------------


@pytest.mark.parametrize("prompts,max_length", [
    (PROMPTS, L),  # batch of 2, different lengths, padded rows kept
    ([""], L),
    (["the quick brown fox jumps over the lazy dog " * 4], 16),
])
def test_embeddings_fp32_match_diffusers(hf_small, enc_small, prompts, max_length):
    model, tok = hf_small
    ref, _, _ = diffusers_embeds(model, tok, prompts, max_length, SMALL_LAYERS)
    out = enc_small.encode(prompts, max_length=max_length)
    assert out.shape == (len(prompts), max_length, 3 * 64) and out.dtype == mx.float32
    assert rel(to_np(out), ref) <= FP32_BOUND


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_embeddings_half_match_diffusers(hf_small, small, dtype):
    model, tok = hf_small
    ref, _, _ = diffusers_embeds(model, tok, PROMPTS, L, SMALL_LAYERS)
    enc = load_text_encoder(small / "text_encoder", dtype=dtype, layers=SMALL_LAYERS)
    out = enc.encode(PROMPTS, max_length=L)
    assert out.dtype == dtype
    err = rel(to_np(out), ref)
    assert err <= FP16_BOUND
    assert err > 0  # really computed in half precision


def test_padded_rows_depend_on_the_prompt(enc_small):
    # diffusers keeps all rows; padded rows attend to the real tokens, so they differ
    # between prompts and are not the pad embedding.
    out = to_np(enc_small.encode(PROMPTS, max_length=L))
    assert not np.allclose(out[0, -1], out[1, -1])


def test_last_layer_index_is_final_norm(hf_small, small):
    # transformers replaces hidden_states[num_layers] by the final-norm output.
    model, tok = hf_small
    ref, _, _ = diffusers_embeds(model, tok, PROMPTS, L, (2, 4))
    enc = load_text_encoder(small / "text_encoder", dtype=mx.float32, layers=(2, 4))
    assert rel(to_np(enc.encode(PROMPTS, max_length=L)), ref) <= FP32_BOUND


def test_real_layer_indices_default_length(deep):
    # Layers (9, 18, 27) of a 28-layer model, default max_length 512, bf16 weights.
    tok = AutoTokenizer.from_pretrained(deep / "tokenizer")
    model = Qwen3ForCausalLM.from_pretrained(deep / "text_encoder", dtype=torch.float32).eval()
    ref, _, _ = diffusers_embeds(model, tok, ["a bonsai tree"], 512, (9, 18, 27))
    enc = load_text_encoder(deep, dtype=mx.float32)  # root: finds text_encoder/ and tokenizer/
    loaded = []
    orig = enc.weights.index.load
    enc.weights.index.load = lambda keys: (loaded.extend(keys), orig(keys))[1]
    enc.evict()
    out = enc.encode("a bonsai tree")
    assert out.shape == (1, 512, 3 * 64)
    assert rel(to_np(out), ref) <= FP32_BOUND
    assert any(k.startswith("model.layers.26.") for k in loaded)
    assert not any(k.startswith(("model.layers.27.", "model.norm", "lm_head")) for k in loaded)


def test_unneeded_weights_may_be_absent(hf_small, small, tmp_path):
    # Layers >= max(layers) and the final norm are never read: a checkpoint without them works.
    d = tmp_path / "te"
    shutil.copytree(small / "text_encoder", d)
    w = mx.load(str(d / "model.safetensors"))
    keep = {k: v for k, v in w.items() if not k.startswith(("model.layers.2.", "model.layers.3.", "model.norm"))}
    assert len(keep) < len(w)
    mx.save_safetensors(str(d / "model.safetensors"), keep)
    enc = load_text_encoder(d, dtype=mx.float32, layers=(1, 2), tokenizer_path=small / "tokenizer")
    model, tok = hf_small
    ref, _, _ = diffusers_embeds(model, tok, PROMPTS, L, (1, 2))
    assert rel(to_np(enc.encode(PROMPTS, max_length=L)), ref) <= FP32_BOUND


def test_sharded_checkpoint(hf_small, enc_small, tmp_path):
    # diffusers' text_encoder/ is sharded with model.safetensors.index.json.
    model, tok = hf_small
    model.save_pretrained(tmp_path / "te", max_shard_size="200KB")
    assert len(list((tmp_path / "te").glob("*.safetensors"))) > 1
    enc = load_text_encoder(tmp_path / "te", dtype=mx.float32, layers=SMALL_LAYERS,
                            tokenizer_path=enc_small.tokenizer.name_or_path)
    np.testing.assert_array_equal(np.array(enc.encode(PROMPTS, max_length=L)),
                                  np.array(enc_small.encode(PROMPTS, max_length=L)))


def test_stream_and_evict_are_identical(enc_small):
    out = np.array(enc_small.encode(PROMPTS, max_length=L))
    np.testing.assert_array_equal(np.array(enc_small.encode(PROMPTS, max_length=L, stream=True)), out)
    enc_small.evict()
    assert not enc_small.resident
    np.testing.assert_array_equal(np.array(enc_small.encode(PROMPTS, max_length=L)), out)
    assert enc_small.resident


def test_a_streamed_encode_reads_the_prompts_rows_only(small, monkeypatch):
    """Streamed, the embedding table is never loaded whole: the rows of the prompt's ids are
    read from the file (equal results: the tests above). Ids outside the table are refused."""
    from bonsai_mlx.errors import WeightsError
    from bonsai_mlx.qwen3_layers import WeightIndex

    enc = load_text_encoder(small, dtype=mx.float32, layers=SMALL_LAYERS, resident=False)
    loaded, rows = [], []
    load, read = WeightIndex.load, WeightIndex.rows
    monkeypatch.setattr(WeightIndex, "load", lambda self, keys: loaded.extend(keys) or load(self, keys))
    monkeypatch.setattr(WeightIndex, "rows", lambda self, key, r: rows.append((key, len(r))) or read(self, key, r))
    ids, mask = enc.tokenize(PROMPTS, max_length=L)
    enc.encode_tokens(ids, mask, stream=True)
    assert loaded and not [k for k in loaded if "embed_tokens" in k]
    present = len(np.unique(np.array(ids)))
    assert {k for k, _ in rows} == {"model.embed_tokens.weight", "model.embed_tokens.scales",
                                    "model.embed_tokens.biases"} and {n for _, n in rows} == {present}
    with pytest.raises(WeightsError, match="token ids must lie in"):
        enc.weights.embed(mx.array([[0, enc.config.args.vocab_size]]), stream=True)


# -- 4-bit ----------------------------------------------------------------------------


def mlx_lm_hidden(qdir: Path, ids: mx.array, mask: mx.array, layers, dtype):
    """Reference on the same quantized weights: mlx-lm's loader and full model, run
    layer by layer with mlx-lm's own causal + right-padding mask."""
    from mlx.utils import tree_map
    from mlx_lm.models.base import create_causal_mask
    from mlx_lm.utils import load_model

    model, _ = load_model(qdir)
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))
    n = ids.shape[1]
    attn = create_causal_mask(n, right_padding=n - mask.sum(axis=1))
    h = model.model.embed_tokens(ids)
    hs = [h]
    for layer in model.model.layers:
        h = layer(h, attn)
        hs.append(h)
    return mx.concatenate([hs[k] for k in layers], axis=-1), model


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_quantized_matches_mlx_lm(small, dtype):
    # pack root: picks text_encoder-mlx-4bit; mx.quantized_matmul, as mlx-lm multiplies
    enc = load_text_encoder(small, dtype=dtype, layers=SMALL_LAYERS, dequantize_matmuls=False)
    assert enc.weights.directory.name == "text_encoder-mlx-4bit"
    ids, mask = enc.tokenize(PROMPTS, max_length=L)
    ref, model = mlx_lm_hidden(small / "text_encoder-mlx-4bit", ids, mask, SMALL_LAYERS, dtype)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    out = enc.encode(PROMPTS, max_length=L)
    assert out.dtype == dtype
    np.testing.assert_array_equal(to_np(out), to_np(ref))
    np.testing.assert_array_equal(to_np(enc.encode(PROMPTS, max_length=L, stream=True)), to_np(out))


def test_dequantized_matmuls_match_quantized(small):
    """The CPU speed path (dequantize each weight, then matmul) gives mlx-lm's numbers up
    to summation order, streamed or resident."""
    plain = load_text_encoder(small, dtype=mx.float32, layers=SMALL_LAYERS, resident=False, dequantize_matmuls=False)
    ref = to_np(plain.encode(PROMPTS, max_length=L, stream=True))
    enc = load_text_encoder(small, dtype=mx.float32, layers=SMALL_LAYERS, resident=False, dequantize_matmuls=True)
    assert enc.dequantize_matmuls
    for stream in (True, False):
        out = to_np(enc.encode(PROMPTS, max_length=L, stream=stream))
        assert rel(out, ref) < 1e-5
    assert type(enc.weights.layer(0).mlp.down_proj).__name__ == "DequantizedLinear"
    enc.evict()


def test_loader_picks_the_matmul_path_for_the_device(small):
    """Dequantized matmuls exactly on MLX's CPU back-end and for a quantized checkpoint,
    on every device this machine has; an explicit argument wins."""
    devices = [mx.cpu] + ([mx.gpu] if mx.is_available(mx.gpu) else [])
    original = mx.default_device()
    try:
        for device in devices:
            mx.set_default_device(device)
            on_cpu = mx.default_device() == mx.cpu
            quantized = load_text_encoder(small, layers=SMALL_LAYERS, resident=False)
            dense = load_text_encoder(small / "text_encoder", layers=SMALL_LAYERS, resident=False)
            assert quantized.weights.directory.name == "text_encoder-mlx-4bit"
            assert quantized.dequantize_matmuls is on_cpu
            assert dense.dequantize_matmuls is False
            for explicit in (True, False):
                for path in (small, small / "text_encoder"):
                    enc = load_text_encoder(path, layers=SMALL_LAYERS, resident=False, dequantize_matmuls=explicit)
                    assert enc.dequantize_matmuls is explicit
    finally:
        mx.set_default_device(original)
    assert mx.default_device() == original
    with pytest.raises(AttributeError, match="load_text_encoder"):
        quantized.dequantize_matmuls = not quantized.dequantize_matmuls


def test_default_dtype_is_bfloat16(small):
    # Qwen3's residual stream exceeds float16's range; float16 stays available when asked.
    enc = load_text_encoder(small / "text_encoder", layers=SMALL_LAYERS, resident=False)
    assert enc.dtype == mx.bfloat16
    assert enc.encode("x", max_length=16, stream=True).dtype == mx.bfloat16
    assert load_text_encoder(small / "text_encoder", dtype=mx.float16, layers=SMALL_LAYERS,
                             resident=False).dtype == mx.float16


def test_quantized_is_really_quantized(small, enc_small):
    import mlx.nn as nn

    enc = load_text_encoder(small / "text_encoder-mlx-4bit", dtype=mx.float32, layers=SMALL_LAYERS,
                            tokenizer_path=small / "tokenizer", dequantize_matmuls=False)
    down = enc.weights.layer(0).mlp.down_proj
    assert isinstance(enc.weights.embedding(), nn.QuantizedEmbedding)
    assert type(down) is nn.QuantizedLinear
    assert down.bits == 4 and down.group_size == 64
    # 4-bit weights are not the FP32 ones: close (same model) but not equal.
    a = to_np(enc.encode(PROMPTS, max_length=L))
    b = to_np(enc_small.encode(PROMPTS, max_length=L))
    assert 1e-3 < rel(a, b) < 0.5


# -- errors ---------------------------------------------------------------------------


def _copy(small, tmp_path, sub="text_encoder"):
    d = tmp_path / sub
    shutil.copytree(small / sub, d)
    shutil.copytree(small / "tokenizer", tmp_path / "tokenizer")
    return d


def test_error_missing_path(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_text_encoder(tmp_path / "nope")
    with pytest.raises(WeightsError, match="no config.json"):
        load_text_encoder(tmp_path)


def test_error_not_qwen3(small, tmp_path):
    d = _copy(small, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="Qwen3"):
        load_text_encoder(d, layers=SMALL_LAYERS)


def test_error_sliding_window(small, tmp_path):
    d = _copy(small, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["use_sliding_window"], cfg["sliding_window"] = True, 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="sliding"):
        load_text_encoder(d, layers=SMALL_LAYERS)


def test_error_bad_layers(small):
    with pytest.raises(ConfigError, match="0..4"):
        load_text_encoder(small / "text_encoder", layers=(9, 18, 27))  # the fixture has 4 layers
    with pytest.raises(ConfigError):
        load_text_encoder(small / "text_encoder", layers=())


def test_error_missing_weights(small, tmp_path):
    d = _copy(small, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no .safetensors"):
        load_text_encoder(d, layers=SMALL_LAYERS)


def test_error_missing_key(small, tmp_path):
    d = _copy(small, tmp_path, "text_encoder-mlx-4bit")
    w = mx.load(str(d / "model.safetensors"))
    del w["model.layers.1.self_attn.k_proj.scales"], w["model.layers.1.self_attn.k_proj.biases"]
    mx.save_safetensors(str(d / "model.safetensors"), w)
    # The packed uint32 weight alone cannot fill a dense Linear of the config's shape.
    with pytest.raises(WeightsError, match="k_proj"):
        load_text_encoder(d, layers=SMALL_LAYERS)
    del w["model.layers.1.self_attn.k_proj.weight"]
    mx.save_safetensors(str(d / "model.safetensors"), w)
    with pytest.raises(WeightsError, match="model.layers.1.self_attn.k_proj.weight"):
        load_text_encoder(d, layers=SMALL_LAYERS)


def test_error_missing_tokenizer(small, tmp_path):
    d = tmp_path / "te"
    shutil.copytree(small / "text_encoder", d)
    with pytest.raises(WeightsError, match="tokenizer"):
        load_text_encoder(d, layers=SMALL_LAYERS)


def test_error_left_padding_and_bad_prompts(enc_small):
    with pytest.raises(BonsaiError, match="at least one"):
        enc_small.encode([], max_length=L)
    with pytest.raises(BonsaiError, match="max_length"):
        enc_small.encode("x", max_length=0)
    ids, mask = enc_small.tokenize("x", max_length=L)
    with pytest.raises(BonsaiError, match=r"\[B, L\]"):
        enc_small.encode_tokens(ids, mask[:, :-1])
    enc_small.tokenizer.padding_side = "left"
    try:
        with pytest.raises(ConfigError, match="left"):
            enc_small.encode("x", max_length=L)
    finally:
        enc_small.tokenizer.padding_side = "right"


def test_evict_gives_back_only_what_was_read_since(enc_small):
    """evict() returns MLX's cached buffers after the encoder read weights (resident or
    streamed), and leaves them after nothing was read: a generation whose prompt is cached
    keeps the buffers the last generation left for it to reuse."""
    enc_small.encode(PROMPTS, max_length=L, stream=True)
    enc_small.evict()
    a = mx.ones((1 << 20,))
    mx.eval(a)
    del a
    mx.synchronize()  # a GPU may put buffers back after eval returns
    cached = mx.get_cache_memory()
    assert cached >= 4 << 20  # the 4 MB buffer is in the cache
    enc_small.evict()  # nothing read since
    mx.synchronize()
    assert mx.get_cache_memory() >= cached
    enc_small.encode(PROMPTS, max_length=L, stream=True)  # streamed: read, then dropped
    assert not enc_small.resident
    enc_small.evict()
    mx.synchronize()
    assert mx.get_cache_memory() < 1 << 20
    enc_small.encode(PROMPTS, max_length=L)  # resident
    assert enc_small.resident
    enc_small.evict()
    mx.synchronize()
    assert not enc_small.resident and mx.get_cache_memory() < 1 << 20


def test_a_failed_read_leaves_the_encoder_evicted(enc_small, monkeypatch):
    """A layer that cannot be read leaves nothing half-resident: the next encode reads again."""
    out = np.array(enc_small.encode(PROMPTS, max_length=L, stream=True))
    enc_small.evict()
    build = enc_small.weights._build_layer

    def broken(i):
        if i == 1:
            raise OSError("read error")
        return build(i)

    monkeypatch.setattr(enc_small.weights, "_build_layer", broken)
    with pytest.raises(OSError):
        enc_small.weights.load()
    assert not enc_small.resident
    monkeypatch.undo()
    np.testing.assert_array_equal(np.array(enc_small.encode(PROMPTS, max_length=L)), out)
