"""Configs, shapes and tokens checked before anything is built, with messages naming the
file and the field; the models of a pipeline checked against each other."""

import json
import shutil
import time

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bonsai_mlx import BonsaiPipeline, load_transformer, load_vae
from bonsai_mlx.errors import ConfigError, PromptTruncatedWarning, WeightsError
from bonsai_mlx.text_encoder import load_text_encoder
from fixtures import make_pipeline as mp
from fixtures import make_qwen3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mp.make_pipeline(tmp_path_factory.mktemp("val") / "tiny")[1]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return make_qwen3.make_all(tmp_path_factory.mktemp("valq"), num_layers=4)


def edited(src, dst, part, edit):
    """A copy of the pipeline `src` whose `part`/config.json went through `edit`."""
    shutil.copytree(src, dst)
    f = dst / part / "config.json"
    cfg = json.loads(f.read_text())
    edit(cfg)
    f.write_text(json.dumps(cfg))
    return dst / part


# ---- transformer -----------------------------------------------------------------------------

@pytest.mark.parametrize("change, pattern", [
    ({"num_layers": True}, "num_layers must be an integer in 0..1024, got True"),
    ({"num_layers": 10**9}, "num_layers must be an integer in 0..1024"),
    ({"in_channels": 16.0}, "in_channels must be a positive integer"),
    ({"mlp_ratio": "2"}, "mlp_ratio must be a number"),
    ({"rope_theta": -1}, "rope_theta must be a positive number"),
    ({"axes_dims_rope": 16}, "axes_dims_rope must be a list"),
    ({"guidance_embeds": 0}, "guidance_embeds must be true or false"),
    ({"num_layers": 2}, r"num_layers=2, but the checkpoint holds transformer_blocks\.\* blocks 0"),
    ({"num_single_layers": 0}, r"num_single_layers=0, but the checkpoint holds single_transformer_blocks\.\* blocks 0, 1"),
])
def test_transformer_config_errors_name_file_and_field(tiny, tmp_path, change, pattern):
    d = edited(tiny, tmp_path / "p", "transformer", lambda c: c.update(change))
    with pytest.raises(ConfigError, match=pattern) as e:
        load_transformer(tmp_path / "p")
    assert str(d) in str(e.value)


def test_a_config_wider_than_the_files_is_refused_before_building(tiny, tmp_path):
    # 512 heads of 64: 32768 wide, about 4e10 parameters described by a 4 MB file.
    d = edited(tiny, tmp_path / "p", "transformer", lambda c: c.update(num_attention_heads=512))
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=r"describes a model of [\d,]+ parameters, but the files hold only") as e:
        load_transformer(d)
    assert time.perf_counter() - t < 10 and str(d) in str(e.value)


# ---- VAE -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, pattern", [
    ({"block_out_channels": "8,16"}, "block_out_channels must be a list"),
    ({"layers_per_block": 1000}, "layers_per_block must be an integer in 0..16"),
    ({"use_quant_conv": "yes"}, "use_quant_conv must be true or false"),
    ({"latent_channels": 4.5}, "latent_channels must be an integer"),
    ({"decoder_block_out_channels": [8, 8, 16, True]}, "decoder_block_out_channels must be a list of 1 to 8"),
])
def test_vae_config_errors_name_file_and_field(tiny, tmp_path, change, pattern):
    d = edited(tiny, tmp_path / "p", "vae", lambda c: c.update(change))
    with pytest.raises(ConfigError, match=pattern) as e:
        load_vae(d)
    assert str(d / "config.json") in str(e.value)


def test_vae_integer_weights_are_refused(tiny, tmp_path):
    shutil.copytree(tiny / "vae", tmp_path / "vae")
    f = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["decoder.conv_out.bias"] = sd["decoder.conv_out.bias"].astype(np.int32)
    save_file(sd, str(f))
    with pytest.raises(WeightsError, match="not floating point: decoder.conv_out.bias"):
        load_vae(tmp_path / "vae")


# ---- text encoder ------------------------------------------------------------------------------

def test_text_encoder_config_errors(tiny, tmp_path):
    d = edited(tiny, tmp_path / "a", "text_encoder", lambda c: c.update(num_key_value_heads=3))
    with pytest.raises(ConfigError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
        load_text_encoder(tmp_path / "a", layers=mp.TEXT_LAYERS)
    d = edited(tiny, tmp_path / "b", "text_encoder", lambda c: c.update(hidden_size=-64))
    with pytest.raises(ConfigError, match=f"(?s){d / 'config.json'}.*hidden_size must be an integer"):
        load_text_encoder(tmp_path / "b", layers=mp.TEXT_LAYERS)
    d = edited(tiny, tmp_path / "c", "text_encoder", lambda c: c.update(rope_parameters={"rope_type": "yarn"}))
    with pytest.raises(ConfigError, match="only Qwen3's default RoPE"):
        load_text_encoder(tmp_path / "c", layers=mp.TEXT_LAYERS)
    # Shapes against the config, from the headers: a wider config than the weights.
    d = edited(tiny, tmp_path / "d", "text_encoder", lambda c: c.update(intermediate_size=256))
    with pytest.raises(WeightsError, match=r"model.layers.0.mlp.gate_proj.weight is F32 \[128, 64\], but the text "
                                           r"encoder config needs .* \[256, 64\]"):
        load_text_encoder(tmp_path / "d", layers=mp.TEXT_LAYERS, resident=False)


def test_quantized_shapes_checked_against_config_and_each_other(quantized, tmp_path):
    src = quantized / "text_encoder-mlx-4bit"
    d = tmp_path / "q8" / "text_encoder-mlx-4bit"
    shutil.copytree(src, d)
    shutil.copytree(quantized / "tokenizer", tmp_path / "q8" / "tokenizer")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization"]["bits"] = 8  # the files hold 4-bit codes
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"model.safetensors: model.embed_tokens.weight is U32 \[448, 8\], but .* "
                                           r"U32 \[448, 16\]"):
        load_text_encoder(d, layers=(1, 2, 3), resident=False)
    cfg["quantization"]["bits"] = 7
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="not mlx-lm's affine format"):
        load_text_encoder(d, layers=(1, 2, 3), resident=False)
    cfg["quantization"]["bits"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    w = dict(mx.load(str(d / "model.safetensors")))
    w["model.layers.2.mlp.up_proj.biases"] = w["model.layers.2.mlp.up_proj.biases"][:64]
    mx.save_safetensors(str(d / "model.safetensors"), w)
    with pytest.raises(WeightsError, match=r"model.layers.2.mlp.up_proj.biases is \w+ \[64, 1\], but .* \[128, 1\]"):
        load_text_encoder(d, layers=(1, 2, 3), resident=False)


def test_tokenizer_must_fit_the_embedding(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "p")
    te = tmp_path / "p" / "text_encoder"
    # An embedding of 400 rows for a tokenizer of about 405 tokens.
    f = te / "model.safetensors"
    sd = load_file(str(f))
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:400]
    save_file(sd, str(f))
    cfg = json.loads((te / "config.json").read_text())
    cfg["vocab_size"] = 400
    (te / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"tokens .*but the text encoder's embedding has 400 rows"):
        load_text_encoder(tmp_path / "p", layers=mp.TEXT_LAYERS, resident=False)


def test_token_ids_beyond_the_embedding_are_refused_before_the_gather(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "p")
    tok = tmp_path / "p" / "tokenizer" / "tokenizer.json"
    t = json.loads(tok.read_text())
    t["model"]["vocab"]["a"] = 5000  # a token id past the 448 embedding rows
    tok.write_text(json.dumps(t))
    enc = load_text_encoder(tmp_path / "p", layers=mp.TEXT_LAYERS, resident=False)
    with pytest.raises(WeightsError, match=r"produced token ids .*5000 .*embedding has 448 rows"):
        enc.encode("a", max_length=16)


def test_long_prompts_warn_how_many_tokens_are_dropped(tiny):
    pipe = BonsaiPipeline.from_pretrained(tiny, dtype=mx.float32, text_layers=mp.TEXT_LAYERS)
    pipe.models.max_sequence_length = 16
    with pytest.warns(PromptTruncatedWarning, match=r"its last \d+ tokens are dropped"):
        pipe.generate("the quick brown fox jumps over the lazy dog " * 3, width=64, height=64, seed=0, steps=1)


def test_pipeline_models_must_fit_each_other(tiny):
    with pytest.raises(ConfigError, match="the text encoder gives 128 features per token .* reads 192"):
        BonsaiPipeline.from_pretrained(tiny, dtype=mx.float32, text_layers=(1, 2))


def test_a_chat_template_that_drops_the_prompt_is_refused(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "p")
    (tmp_path / "p" / "tokenizer" / "chat_template.jinja").write_text("<|im_start|>user\nhello<|im_end|>\n")
    with pytest.raises(ConfigError, match="chat template .* leaves the prompt out"):
        load_text_encoder(tmp_path / "p", layers=mp.TEXT_LAYERS, resident=False)
