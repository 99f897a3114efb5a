"""Qwen3 prompt encoder for FLUX.2 [klein], matching diffusers' `Flux2KleinPipeline`.

The decoder layers are mlx-lm's (`mlx_lm.models.qwen3.TransformerBlock`); this module
only decides which weights to read, builds the mask diffusers/transformers use, and
collects hidden states. Only decoder layers 0..max(layers)-1 are ever read from disk:
the deeper layers, the final norm (unless a requested index is the last one) and the
lm_head stay untouched in the memory-mapped safetensors.

Prompt -> embeddings, as `Flux2KleinPipeline._get_qwen3_prompt_embeds` does it:
  chat template (one user turn, generation prompt, thinking disabled)
  -> tokenizer(padding="max_length", truncation=True, max_length=L)   ids [B, L]
  -> Qwen3 with mask causal & key-not-padding, positions 0..L-1        h_k [B, L, H]
  -> concat(h_k for k in layers) along features                        [B, L, len(layers)*H]
hidden_states[k] is the residual stream after k layers (0 = embeddings), except
k == num_hidden_layers, which transformers replaces by the final-norm output.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.models import qwen3

from .errors import BonsaiError, ConfigError, WeightsError

DEFAULT_LAYERS = (9, 18, 27)
DEFAULT_MAX_LENGTH = 512

# Subfolders tried, in order, when `path` is a pack or diffusers root.
ENCODER_SUBDIRS = ("text_encoder-mlx-4bit", "text_encoder")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


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
                f"text encoder config has model_type {model_type!r}; FLUX.2 [klein] needs a Qwen3 "
                "(model_type 'qwen3') text encoder"
            )
        if d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or []):
            # mlx-lm's Qwen3 blocks attend globally; a sliding window would silently differ.
            raise ConfigError("text encoder config enables sliding-window attention, which Qwen3 for klein never uses")
        try:
            args = qwen3.ModelArgs.from_dict(d)
        except (TypeError, ValueError) as e:  # missing fields / rope_theta
            raise ConfigError(f"text encoder config is not a usable Qwen3 config: {e}") from None
        layers = tuple(int(k) for k in layers)
        n = args.num_hidden_layers
        if not layers or any(k < 0 or k > n for k in layers):
            raise ConfigError(
                f"hidden-state layers {list(layers)} must be a non-empty list of indices in 0..{n} "
                f"(the model has {n} decoder layers)"
            )
        q = d.get("quantization", d.get("quantization_config"))
        if q is not None and not (isinstance(q, dict) and "bits" in q and "group_size" in q):
            raise ConfigError(
                f"text encoder quantization {q!r} is not mlx-lm's format "
                "({'group_size': ..., 'bits': ...}); convert the checkpoint with mlx_lm.convert"
            )
        return cls(args=args, layers=layers, quantization=q)


_INT_BYTES = {"U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8, "BOOL": 1}


class _WeightIndex:
    """Which safetensors file holds each key, read from the file headers only."""

    def __init__(self, directory: Path):
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise WeightsError(f"no .safetensors files in {directory}")
        index = directory / "model.safetensors.index.json"
        if index.exists():
            try:
                wanted = set(json.loads(index.read_text())["weight_map"].values())
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise WeightsError(f"{index} is not a safetensors index ({e})") from None
            missing = sorted(f for f in wanted if not (directory / f).exists())
            if missing:
                raise WeightsError(f"{index} names files that are missing: {missing}")
            files = [directory / f for f in sorted(wanted)]
        self.files = files
        self.entries: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        for f in files:
            for key, (shape, dtype) in _read_header(f).items():
                self.entries[key] = (f, shape, dtype)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def require(self, keys: Sequence[str], what: str) -> None:
        missing = [k for k in keys if k not in self.entries]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise WeightsError(
                f"text encoder weights lack {what}: {missing[:5]}{more}; "
                f"files: {[f.name for f in self.files]}"
            )

    def load(self, keys: Sequence[str]) -> dict[str, mx.array]:
        """Lazy arrays for `keys`: mx.load maps the file, and only the arrays that
        get evaluated are read, so untouched keys cost nothing."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.entries[k][0], []).append(k)
        out = {}
        for f, ks in by_file.items():
            try:
                arrays = mx.load(str(f))
            except Exception as e:  # mlx raises RuntimeError/ValueError on corrupt files
                raise WeightsError(f"could not read {f}: {e}") from None
            out.update((k, arrays[k]) for k in ks)
        return out


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, struct.error, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e})") from None


class Qwen3TextEncoder:
    """Holds the tokenizer, the weight index, and (unless evicted) the needed layers."""

    def __init__(self, config: TextEncoderConfig, weights_dir: Path, tokenizer, dtype: mx.Dtype):
        self.config = config
        self.weights_dir = weights_dir
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.index = _WeightIndex(weights_dir)
        n = config.num_layers_needed
        keys = self._keys_for(None) + [k for i in range(n) for k in self._keys_for(i)]
        if config.needs_final_norm:
            keys.append("model.norm.weight")
        self.index.require(keys, "keys the encoder needs")
        self._embed: Optional[nn.Module] = None  # resident weights; None when evicted
        self._blocks: list[nn.Module] = []
        self._norm: Optional[nn.RMSNorm] = None
        # Multiply quantized layers by dequantizing each weight first instead of through
        # mx.quantized_matmul. For MLX's CPU back-end only: its quantized matmul ran at
        # 2 GFLOP/s in float32 (0.23 in bfloat16) on our 2-core machine, dequantize + BLAS
        # at 65 (examples/bench_cpu_matmul.py), so a 512-token prompt takes about a minute
        # instead of hours. Holds one
        # dense layer weight at a time (at most 100 MB in float32 for Qwen3-4B).
        self.dequantize_matmuls = False

    # -- weights -------------------------------------------------------------------

    def _keys_for(self, layer: Optional[int]) -> list[str]:
        """Checkpoint keys of the embedding (layer None) or of decoder layer `layer`."""
        if layer is None:
            prefixes = ["model.embed_tokens"]
        else:
            p = f"model.layers.{layer}"
            prefixes = [f"{p}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
            prefixes += [f"{p}.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
            norms = [f"{p}.input_layernorm", f"{p}.post_attention_layernorm",
                     f"{p}.self_attn.q_norm", f"{p}.self_attn.k_norm"]
            return [f"{x}{s}" for x in prefixes for s in self._quant_suffixes(x)] + [f"{x}.weight" for x in norms]
        return [f"{x}{s}" for x in prefixes for s in self._quant_suffixes(x)]

    def _quant_suffixes(self, prefix: str) -> tuple[str, ...]:
        if f"{prefix}.scales" in self.index:
            return (".weight", ".scales", ".biases") if f"{prefix}.biases" in self.index else (".weight", ".scales")
        return (".weight",)

    def _quant_params(self, path: str, module: nn.Module):
        """nn.quantize predicate: quantize exactly the modules stored quantized, with the
        per-path params mlx-lm recorded or, failing that, those implied by the shapes."""
        key = f"model.{path}"
        if not hasattr(module, "to_quantized") or f"{key}.scales" not in self.index:
            return False
        q = self.config.quantization or {}
        if isinstance(q.get(key), dict):
            return q[key]
        in_dims = module.weight.shape[-1]
        n_groups = self.index.shape(f"{key}.scales")[-1]
        packed = self.index.shape(f"{key}.weight")[-1]
        return {"group_size": in_dims // n_groups, "bits": packed * 32 // in_dims,
                "mode": q.get("mode", "affine")}

    def _build(self, prefix: str, module: nn.Module, keys: list[str]) -> nn.Module:
        """Quantize `module` like the checkpoint, then load `keys`; `prefix` is the
        module's path in the checkpoint without the leading "model." ("" for the root)."""
        join = (lambda p: f"{prefix}.{p}") if prefix else (lambda p: p)
        nn.quantize(module, class_predicate=lambda p, m: self._quant_params(join(p), m))
        cut = len(f"model.{prefix}.") if prefix else len("model.")
        cast = [(k[cut:], v.astype(self.dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
                for k, v in self.index.load(keys).items()]
        try:
            module.load_weights(cast, strict=True)
        except ValueError as e:  # wrong shapes, or a quantized/dense mismatch
            raise WeightsError(f"text encoder weights do not fit this Qwen3 config: {e}") from None
        return module.eval()

    def _embedding(self) -> nn.Module:
        args = self.config.args
        # nn.quantize only visits children, so the Embedding sits in a holder whose
        # path for it, "embed_tokens", is the checkpoint's.
        holder = nn.Module()
        holder.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        return self._build("", holder, self._keys_for(None)).embed_tokens

    def _block(self, i: int) -> nn.Module:
        block = self._build(f"layers.{i}", qwen3.TransformerBlock(self.config.args), self._keys_for(i))
        if self.dequantize_matmuls:
            swap = [(p, DequantizedLinear(m)) for p, m in block.named_modules() if isinstance(m, nn.QuantizedLinear)]
            block.update_modules(tree_unflatten(swap))
        return block

    def _final_norm(self) -> nn.RMSNorm:
        if self._norm is None:
            args = self.config.args
            self._norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
            w = self.index.load(["model.norm.weight"])["model.norm.weight"]
            self._norm.weight = w.astype(self.dtype)
        return self._norm

    def load(self) -> "Qwen3TextEncoder":
        """Read every needed weight into memory (layers 0..max(layers)-1 + embeddings)."""
        if self._embed is None:
            self._embed = self._embedding()
            self._blocks = [self._block(i) for i in range(self.config.num_layers_needed)]
            mx.eval(self._embed.parameters(), [b.parameters() for b in self._blocks])
        return self

    def evict(self) -> None:
        """Drop the resident weights; the next encode() reads them again."""
        self._embed = None
        self._blocks = []
        self._norm = None
        mx.clear_cache()

    @property
    def resident(self) -> bool:
        return self._embed is not None

    def weight_bytes(self, layer: Optional[int] = None) -> int:
        """Resident bytes of the embedding (layer None) or of one decoder layer, after the
        cast to `self.dtype`; read from the safetensors headers, no weights touched."""
        float_bytes = mx.zeros((), self.dtype).itemsize
        total = 0
        for k in self._keys_for(layer):
            _, shape, dt = self.index.entries[k]
            n = 1
            for d in shape:
                n *= d
            total += n * (float_bytes if dt in ("F16", "BF16", "F32", "F64") else _INT_BYTES.get(dt, 4))
        return total

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
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for p in prompts
        ]
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        return mx.array(enc["input_ids"]).astype(mx.int32), mx.array(enc["attention_mask"]).astype(mx.bool_)

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

        if stream:
            h = self._embedding()(input_ids)
        else:
            self.load()
            h = self._embed(input_ids)  # [B, L, H]
        if 0 in want:
            hidden[0] = h
        for i in range(self.config.num_layers_needed):
            if stream or sync:
                mx.eval(h)  # streamed: so that the previous layer's weights can be freed
            if stream:
                block = self._block(i)
            else:
                block = self._blocks[i]
            h = block(h, mask)
            del block
            if i + 1 in want:
                hidden[i + 1] = h
        if self.config.needs_final_norm:
            hidden[self.config.args.num_hidden_layers] = self._final_norm()(h)
        out = mx.concatenate([hidden[k] for k in self.config.layers], axis=-1)
        if stream:
            mx.eval(out)
        return out


class DequantizedLinear(nn.Module):
    """A QuantizedLinear's own weights, multiplied as dequantize(W) @ x (see
    Qwen3TextEncoder.dequantize_matmuls): the same values, a different summation order."""

    def __init__(self, q: nn.QuantizedLinear):
        super().__init__()
        self.q = q

    def __call__(self, x: mx.array) -> mx.array:
        q = self.q
        w = mx.dequantize(q.weight, q.scales, q.get("biases"), group_size=q.group_size, bits=q.bits, mode=q.mode)
        y = x @ w.astype(x.dtype).T
        return y + q.bias if "bias" in q else y


def _attention_mask(attention_mask: mx.array) -> mx.array:
    """Causal & key-is-real: [B, L] -> [B, 1, L, L] bool. Padded query rows are kept
    (diffusers keeps all L rows); under right padding they still see the real tokens."""
    L = attention_mask.shape[1]
    pos = mx.arange(L)
    causal = pos[:, None] >= pos[None, :]  # [L, L]
    return causal[None, None] & attention_mask[:, None, None, :]


def _resolve(path: Path, tokenizer_path: Optional[Path]) -> tuple[Path, Path]:
    if not path.exists():
        raise WeightsError(f"text encoder path {path} does not exist")
    if (path / "config.json").exists():
        weights_dir = path
    else:
        found = [path / s for s in ENCODER_SUBDIRS if (path / s / "config.json").exists()]
        if not found:
            raise WeightsError(
                f"{path} has no config.json, nor a {' or '.join(ENCODER_SUBDIRS)} folder with one"
            )
        weights_dir = found[0]
    if tokenizer_path is None:
        candidates = [weights_dir, weights_dir.parent / "tokenizer", path / "tokenizer"]
        found = [c for c in candidates if any((c / f).exists() for f in _TOKENIZER_FILES)]
        if not found:
            raise WeightsError(
                f"no tokenizer found for {path} (looked in {', '.join(str(c) for c in candidates)}); "
                "pass tokenizer_path"
            )
        tokenizer_path = found[0]
    elif not any((tokenizer_path / f).exists() for f in _TOKENIZER_FILES):
        raise WeightsError(f"{tokenizer_path} holds no tokenizer.json / tokenizer_config.json")
    return weights_dir, tokenizer_path


def load_text_encoder(
    path: str | Path,
    dtype: mx.Dtype = mx.float16,
    layers: Sequence[int] = DEFAULT_LAYERS,
    tokenizer_path: str | Path | None = None,
    resident: bool = True,
) -> Qwen3TextEncoder:
    """Open a Qwen3 text encoder (transformers FP16/BF16/FP32 or mlx-lm quantized).

    path: the encoder folder (config.json + *.safetensors), or a pack / diffusers root
    holding `text_encoder-mlx-4bit/` or `text_encoder/`. The tokenizer comes from
    `tokenizer_path`, else the encoder folder, else a sibling `tokenizer/`.
    resident=False reads no weights now: the first encode() does (or use stream=True).
    """
    path = Path(path)
    weights_dir, tok_dir = _resolve(path, Path(tokenizer_path) if tokenizer_path is not None else None)
    try:
        raw = json.loads((weights_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{weights_dir / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{weights_dir / 'config.json'} must hold a JSON object")
    config = TextEncoderConfig.from_dict(raw, layers)

    from transformers import AutoTokenizer  # heavy import, only when loading

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:  # transformers raises many types (OSError, ValueError, ...)
        raise WeightsError(f"could not load the tokenizer from {tok_dir}: {e}") from None
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"the tokenizer in {tok_dir} has no pad token; klein pads prompts to a fixed length")

    encoder = Qwen3TextEncoder(config, weights_dir, tokenizer, dtype)
    if resident:
        encoder.load()
    return encoder
