"""Qwen3 prompt encoder for FLUX.2 [klein], matching diffusers' `Flux2KleinPipeline`.

This module turns prompts into token ids and runs them through the layers that
`qwen3_layers.Qwen3Layers` builds, collecting hidden states; which weights are read,
and whether they stay resident, is that class's business. Only decoder layers
0..max(layers)-1 are needed, and the final norm only when a requested index is the last.

Prompt -> embeddings, as `Flux2KleinPipeline._get_qwen3_prompt_embeds` does it:
  chat template (one user turn, generation prompt, thinking disabled)
  -> tokenizer(padding="max_length", truncation=True, max_length=L)   ids [B, L]
  -> Qwen3 with mask causal & key-not-padding, positions 0..L-1        h_k [B, L, H]
  -> concat(h_k for k in layers) along features                        [B, L, len(layers)*H]
hidden_states[k] is the residual stream after k layers (0 = embeddings), except
k == num_hidden_layers, which transformers replaces by the final-norm output.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models import qwen3

from .errors import BonsaiError, ConfigError, PromptTruncatedWarning, WeightsError
from .layouts import ENCODER_SUBDIRS  # noqa: F401  (re-exported: where pipelines keep their encoder)
from .qwen3_layers import Qwen3Layers
from .safe_files import ModelFolder, in_file, read_json
from .tokenizer import describe, has_tokenizer, load_tokenizer
from .validate import brief, is_int, is_real

DEFAULT_LAYERS = (9, 18, 27)
DEFAULT_MAX_LENGTH = 512

# Subfolders tried, in order, when `path` is a pack or diffusers root.


@dataclass(frozen=True)
class TextEncoderConfig:
    args: qwen3.ModelArgs
    layers: tuple[int, ...]  # hidden_states indices to concatenate, in output order
    quantization: Optional[dict]  # mlx-lm's config["quantization"], None when dense

    @property
    def num_layers_needed(self) -> int:
        return max(self.layers)

    @property
    def needs_final_norm(self) -> bool:
        return self.args.num_hidden_layers in self.layers

    @property
    def output_dim(self) -> int:
        return len(self.layers) * self.args.hidden_size

    @classmethod
    def from_dict(cls, d: dict, layers: Sequence[int] = DEFAULT_LAYERS) -> "TextEncoderConfig":
        model_type = d.get("model_type")
        if model_type != "qwen3":
            raise ConfigError(
                f"text encoder config has model_type {brief(model_type)}; FLUX.2 [klein] needs a Qwen3 "
                "(model_type 'qwen3') text encoder"
            )
        if d.get("use_sliding_window") or "sliding_attention" in _list_or_empty(d.get("layer_types")):
            # mlx-lm's Qwen3 blocks attend globally; a sliding window would silently differ.
            raise ConfigError("text encoder config enables sliding-window attention, which Qwen3 for klein never uses")
        _check_qwen3_fields(d)
        try:
            args = qwen3.ModelArgs.from_dict(d)
        except (TypeError, ValueError) as e:  # missing fields / rope_theta
            raise ConfigError(f"text encoder config is not a usable Qwen3 config: {e}") from None
        if not is_real(args.rope_theta) or not args.rope_theta > 0:
            raise ConfigError(f"text encoder config: rope_theta must be a positive number, got {brief(args.rope_theta)}")
        if not isinstance(layers, (list, tuple)) or not all(is_int(k) for k in layers):
            raise ConfigError(f"hidden-state layers must be a list of integers, got {brief(layers)}")
        layers = tuple(int(k) for k in layers)
        n = args.num_hidden_layers
        if not layers or any(k < 0 or k > n for k in layers):
            raise ConfigError(
                f"hidden-state layers {list(layers)} must be a non-empty list of indices in 0..{n} "
                f"(the model has {n} decoder layers)"
            )
        q = d.get("quantization", d.get("quantization_config"))
        if q is not None:
            _check_quantization(q)
        return cls(args=args, layers=layers, quantization=q)


# Bounds far above Qwen3 (4B: 2560 wide, 36 layers, 151936 tokens); a config beyond them is
# refused before anything is built.
_QWEN3_INTS = {"hidden_size": 1 << 16, "num_hidden_layers": 1024, "intermediate_size": 1 << 18,
               "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
               "vocab_size": 1 << 22, "max_position_embeddings": 1 << 24}
_QUANT_BITS, _QUANT_GROUPS = (2, 3, 4, 5, 6, 8), (32, 64, 128)


def _list_or_empty(v) -> list:
    return v if isinstance(v, list) else []


def _check_qwen3_fields(d: dict) -> None:
    problems = []
    for name, top in _QWEN3_INTS.items():
        if name in d and (not is_int(d[name]) or not 0 < d[name] <= top):
            problems.append(f"{name} must be an integer in 1..{top}, got {brief(d[name])}")
    eps = d.get("rms_norm_eps")
    if "rms_norm_eps" in d and (not is_real(eps) or not 0 < eps < 1):
        problems.append(f"rms_norm_eps must be a number in (0, 1), got {brief(eps)}")
    if "tie_word_embeddings" in d and not isinstance(d["tie_word_embeddings"], bool):
        problems.append(f"tie_word_embeddings must be true or false, got {brief(d['tie_word_embeddings'])}")
    if not problems and is_int(d.get("num_attention_heads")) and is_int(d.get("num_key_value_heads")):
        if d["num_attention_heads"] % d["num_key_value_heads"]:
            problems.append(f"num_attention_heads ({d['num_attention_heads']}) must be a multiple of "
                            f"num_key_value_heads ({d['num_key_value_heads']})")
    if is_int(d.get("head_dim")) and d["head_dim"] % 2:
        problems.append(f"head_dim must be even for RoPE, got {d['head_dim']}")
    for name in ("rope_scaling", "rope_parameters"):
        rope = d.get(name)
        if rope is None:
            continue
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
        if kind != "default":
            problems.append(f"{name} {brief(rope)}: only Qwen3's default RoPE (rope_type 'default') is supported")
    if problems:
        raise ConfigError("Unsupported text encoder config:\n  - " + "\n  - ".join(problems))


def _check_quantization(q) -> None:
    def fits(p: dict) -> bool:
        return (p.get("bits") in _QUANT_BITS and is_int(p.get("bits")) and p.get("group_size") in _QUANT_GROUPS
                and is_int(p.get("group_size")) and p.get("mode", "affine") == "affine")

    per_layer_ok = isinstance(q, dict) and all(
        isinstance(v, bool) or (isinstance(v, dict) and fits(v))
        for k, v in q.items() if k not in ("bits", "group_size", "mode"))
    if not (isinstance(q, dict) and fits(q) and per_layer_ok):
        raise ConfigError(
            f"text encoder quantization {brief(q)} is not mlx-lm's affine format "
            f"({{'group_size': one of {_QUANT_GROUPS}, 'bits': one of {_QUANT_BITS}}}); "
            "convert the checkpoint with mlx_lm.convert"
        )


class Qwen3TextEncoder:
    """Prompt encoding: the tokenizer and chat template, and the hidden-state taps over
    the layers of `weights` (a Qwen3Layers, resident or streamed)."""

    def __init__(self, config: TextEncoderConfig, weights: Qwen3Layers, tokenizer, tokenizer_path: str | None = None):
        """tokenizer_path: how messages name the tokenizer (its folder and files)."""
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.tokenizer_path = tokenizer_path

    @property
    def dtype(self) -> mx.Dtype:
        return self.weights.dtype

    @property
    def dequantize_matmuls(self) -> bool:
        """Whether quantized layers multiply as dequantize(W) @ x (Qwen3Layers.dequantize_matmuls);
        load_text_encoder chooses it for the device."""
        return self.weights.dequantize_matmuls

    @dequantize_matmuls.setter
    def dequantize_matmuls(self, _value) -> None:
        # The resident layers are built for one matmul path; switching it afterwards
        # would leave them and this flag disagreeing.
        raise AttributeError(
            "dequantize_matmuls is chosen when loading: load_text_encoder(..., dequantize_matmuls=...)"
        )

    # -- weights -------------------------------------------------------------------

    def load(self) -> "Qwen3TextEncoder":
        """Read every needed weight into memory (layers 0..max(layers)-1 + embeddings)."""
        self.weights.load()
        return self

    def evict(self) -> None:
        """Drop the resident weights; the next encode() reads them again."""
        self.weights.evict()

    @property
    def resident(self) -> bool:
        return self.weights.resident

    def weight_bytes(self, layer: Optional[int] = None) -> int:
        """Resident bytes of the embedding (layer None) or of one decoder layer, in self.dtype."""
        return self.weights.weight_bytes(layer)

    # -- tokens --------------------------------------------------------------------

    def tokenize(self, prompts: str | Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> tuple[mx.array, mx.array]:
        """Token ids [B, L] int32 and attention mask [B, L] bool (True = real token),
        exactly as diffusers' klein pipeline tokenizes."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise BonsaiError("encode() needs at least one prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise BonsaiError("prompts must be strings")
        if not isinstance(max_length, int) or max_length < 1:
            raise BonsaiError(f"max_length must be a positive integer, got {max_length!r}")
        where = f"the tokenizer in {self.tokenizer_path}" if self.tokenizer_path else "the tokenizer"
        try:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                    enable_thinking=False)
                for p in prompts
            ]
            lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False, padding=False)["input_ids"]]
            enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                                 return_tensors="np")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # jinja2 and tokenizers errors; Rust panics are BaseExceptions
            raise WeightsError(f"{where} could not tokenize the prompt: {type(e).__name__}: {e}") from None
        for i, n in enumerate(lengths):
            if n > max_length:
                warnings.warn(PromptTruncatedWarning(
                    f"prompt {i + 1} is {n} tokens with the chat template; the text encoder reads {max_length}, "
                    f"so its last {n - max_length} tokens are dropped"), stacklevel=3)
        ids = np.asarray(enc["input_ids"])
        rows = self.config.args.vocab_size
        if ids.shape != (len(prompts), max_length) or ids.size and not (0 <= ids.min() and ids.max() < rows):
            raise WeightsError(
                f"{where} produced token ids {ids.min() if ids.size else '-'}..{ids.max() if ids.size else '-'} "
                f"(shape {list(ids.shape)}), but the text encoder's embedding has {rows} rows: the tokenizer "
                "does not belong to these weights")
        return mx.array(ids.astype(np.int32)), mx.array(np.asarray(enc["attention_mask"])).astype(mx.bool_)

    # -- forward -------------------------------------------------------------------

    def encode(self, prompts: str | Sequence[str], max_length: int = DEFAULT_MAX_LENGTH, stream: bool = False,
               sync: bool = False) -> mx.array:
        """Prompt embeddings [B, max_length, len(layers) * hidden] in self.dtype."""
        input_ids, attention_mask = self.tokenize(prompts, max_length)
        return self.encode_tokens(input_ids, attention_mask, stream=stream, sync=sync)

    def encode_tokens(self, input_ids: mx.array, attention_mask: mx.array, stream: bool = False,
                      sync: bool = False) -> mx.array:
        """stream=True reads, runs and frees one layer at a time from the mapped files
        (peak ~ one layer + activations) and gives bit-identical results. sync=True
        evaluates a resident encoder layer by layer too: one graph over all layers held
        ~2 GB of activations for a 512-token prompt (H200); streaming always does."""
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise BonsaiError(
                f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be [B, L]"
            )
        attention_mask = attention_mask.astype(mx.bool_)
        if not bool(mx.all(attention_mask[:, 0])):
            # With left padding the leading pad queries see no key at all; torch's SDPA
            # returns zeros for such rows where MLX's would not, so refuse rather than differ.
            raise ConfigError("the tokenizer pads on the left; the klein prompt encoding needs right padding")
        mask = _attention_mask(attention_mask)  # [B, 1, L, L]
        want = set(self.config.layers)
        hidden: dict[int, mx.array] = {}

        w = self.weights
        if not stream:
            w.load()
        h = w.embed(input_ids, stream)  # [B, L, H]
        if 0 in want:
            hidden[0] = h
        n = self.config.num_layers_needed
        # Streamed, the next layer is built and its weights are read while this one runs:
        # reading the files, not computing, is what a streamed encode waits for. Two layers'
        # weights live at once (memory.Footprint.text_stream_bytes counts them).
        following = w.layer(0, stream) if n else None
        for i in range(n):
            if stream or sync:
                mx.eval(h)  # streamed: so that the previous layer's weights can be freed
            block, following = following, w.layer(i + 1, stream) if i + 1 < n else None
            if stream and following is not None:
                mx.async_eval(following.parameters())
            h = block(h, mask)
            del block
            if i + 1 in want:
                hidden[i + 1] = h
        if self.config.needs_final_norm:
            hidden[self.config.args.num_hidden_layers] = w.final_norm(stream)(h)
        out = mx.concatenate([hidden[k] for k in self.config.layers], axis=-1)
        if stream:
            mx.eval(out)
        return out


def _attention_mask(attention_mask: mx.array) -> mx.array:
    """Causal & key-is-real: [B, L] -> [B, 1, L, L] bool. Padded query rows are kept
    (diffusers keeps all L rows); under right padding they still see the real tokens."""
    L = attention_mask.shape[1]
    pos = mx.arange(L)
    causal = pos[:, None] >= pos[None, :]  # [L, L]
    return causal[None, None] & attention_mask[:, None, None, :]


def _resolve(path: Path, tokenizer_path: Optional[Path]) -> tuple[ModelFolder, ModelFolder]:
    """The weights folder and the tokenizer folder for `path`, each contained in its model
    directory (a tokenizer beside the encoder folder belongs to the pipeline around them)."""
    if not os.path.lexists(path):
        raise WeightsError(f"text encoder path {path} does not exist")
    if not path.is_dir():
        raise WeightsError(f"text encoder path {path} is not a directory")
    root = ModelFolder(path)
    if root.exists("config.json"):
        weights = root
    else:
        found = [s for s in ENCODER_SUBDIRS if os.path.lexists(path / s / "config.json")]
        if not found:
            raise WeightsError(
                f"{path} has no config.json, nor a {' or '.join(ENCODER_SUBDIRS)} folder with one"
            )
        weights = root.subfolder(found[0])
    if tokenizer_path is not None:
        if not tokenizer_path.is_dir() or not has_tokenizer(tokenizer_path):
            raise WeightsError(f"{tokenizer_path} holds no tokenizer.json / tokenizer_config.json")
        return weights, ModelFolder(tokenizer_path)
    pipeline = weights.path.parent
    candidates = [(weights.path, weights.root), (pipeline / "tokenizer", pipeline if weights is root else path),
                  (path / "tokenizer", path)]
    for folder, within in candidates:
        if folder.is_dir() and has_tokenizer(folder):
            return weights, ModelFolder(folder, within)
    raise WeightsError(
        f"no tokenizer found for {path} (looked in {', '.join(str(c) for c, _ in candidates)}); pass tokenizer_path"
    )


def load_text_encoder(
    path: str | Path,
    dtype: mx.Dtype = mx.bfloat16,
    layers: Sequence[int] = DEFAULT_LAYERS,
    tokenizer_path: str | Path | None = None,
    resident: bool = True,
    dequantize_matmuls: Optional[bool] = None,
) -> Qwen3TextEncoder:
    """Open a Qwen3 text encoder (transformers FP16/BF16/FP32 or mlx-lm quantized).

    path: the encoder folder (config.json + *.safetensors), or a pack / diffusers root
    holding `text_encoder-mlx-4bit/` or `text_encoder/`. The tokenizer comes from
    `tokenizer_path`, else the encoder folder, else a sibling `tokenizer/`.
    dtype: bfloat16 by default; Qwen3's residual stream exceeds float16's range.
    resident=False reads no weights now: the first encode() does (or use stream=True).
    dequantize_matmuls: None picks the matmul path for the device (on exactly when MLX's
    default device is the CPU and the checkpoint is quantized, see Qwen3Layers); a bool
    overrides it. Every file is read through safe_files, and every needed tensor's shape
    is checked against the config before anything is built.
    """
    path = Path(path).expanduser()
    weights_dir, tok_dir = _resolve(path, Path(tokenizer_path).expanduser() if tokenizer_path is not None else None)
    cfg_file = weights_dir.file("config.json", "text encoder config")
    with in_file(cfg_file):
        config = TextEncoderConfig.from_dict(read_json(cfg_file, "text encoder config"), layers)
    weights = Qwen3Layers(weights_dir, config.args, config.num_layers_needed, config.needs_final_norm,
                          config.quantization, dtype, dequantize_matmuls)
    tokenizer = load_tokenizer(tok_dir, config.args.vocab_size)
    encoder = Qwen3TextEncoder(config, weights, tokenizer, describe(tok_dir))
    if resident:
        encoder.load()
    return encoder
