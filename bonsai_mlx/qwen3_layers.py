"""The weights of a Qwen3 checkpoint, built one module at a time from its safetensors.

The decoder layers are mlx-lm's (`mlx_lm.models.qwen3.TransformerBlock`); this module
decides which keys to read, quantizes each module like the checkpoint stores it, and
either keeps the built modules resident or builds each one when it is needed and lets
it go (streaming). Only the embedding, decoder layers 0..num_layers-1 and, when asked
for, the final norm are ever read: the deeper layers and the lm_head stay untouched in
the memory-mapped files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.models import qwen3

from .errors import WeightsError
from .safe_files import DTYPE_BYTES, FLOAT_DTYPES, ModelFolder, load_safetensors, read_headers, read_rows, shard_files


class WeightIndex:
    """Which safetensors file holds each key, read from the validated file headers only."""

    def __init__(self, folder: ModelFolder):
        self.folder = folder
        self.files = shard_files(folder, what="text encoder weights")
        headers = read_headers(self.files)
        self.entries: dict[str, tuple[Path, tuple[int, ...], str]] = {
            k: (f, t.shape, t.dtype) for k, (f, t) in headers.items()}
        self._headers = {f: {k: t for k, (g, t) in headers.items() if g == f} for f in self.files}

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def require(self, keys: Sequence[str], what: str) -> None:
        missing = [k for k in keys if k not in self.entries]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise WeightsError(
                f"text encoder weights in {self.folder.path} lack {what}: {missing[:5]}{more}; "
                f"files: {[f.name for f in self.files]}"
            )

    def rows(self, key: str, rows) -> mx.array:
        """Rows `rows` (ascending, unique) of the tensor `key`, read from its file alone."""
        f = self.entries[key][0]
        return read_rows(f, self._headers[f][key], rows)

    def load(self, keys: Sequence[str]) -> dict[str, mx.array]:
        """Lazy arrays for `keys`: mx.load maps the file, and only the arrays that
        get evaluated are read, so untouched keys cost nothing."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.entries[k][0], []).append(k)
        out = {}
        for f, ks in by_file.items():
            out.update(load_safetensors(f, self._headers[f], ks))
        return out


def check_shapes(index: WeightIndex, a: qwen3.ModelArgs, quantization: Optional[dict], num_layers: int,
                 final_norm: bool) -> None:
    """Every needed tensor's shape and dtype against the config (and, for quantized layers,
    weight, scales and biases against each other and the quantization), from the headers
    alone: a mismatch is refused before any module is built."""
    q_out, kv_out = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    linears = {"self_attn.q_proj": (q_out, a.hidden_size), "self_attn.k_proj": (kv_out, a.hidden_size),
               "self_attn.v_proj": (kv_out, a.hidden_size), "self_attn.o_proj": (a.hidden_size, q_out),
               "mlp.gate_proj": (a.intermediate_size, a.hidden_size),
               "mlp.up_proj": (a.intermediate_size, a.hidden_size),
               "mlp.down_proj": (a.hidden_size, a.intermediate_size)}
    norms = {"input_layernorm": a.hidden_size, "post_attention_layernorm": a.hidden_size,
             "self_attn.q_norm": a.head_dim, "self_attn.k_norm": a.head_dim}
    _check_matrix(index, quantization, "model.embed_tokens", (a.vocab_size, a.hidden_size))
    for i in range(num_layers):
        for name, shape in linears.items():
            _check_matrix(index, quantization, f"model.layers.{i}.{name}", shape)
        for name, n in norms.items():
            _check_tensor(index, f"model.layers.{i}.{name}.weight", (n,), FLOAT_DTYPES)
    if final_norm:
        _check_tensor(index, "model.norm.weight", (a.hidden_size,), FLOAT_DTYPES)


def _check_tensor(index: WeightIndex, key: str, shape: tuple[int, ...], dtypes) -> None:
    f, got, dt = index.entries[key]
    if got != tuple(shape) or dt not in dtypes:
        raise WeightsError(f"{f}: {key} is {dt} {list(got)}, but the text encoder config needs "
                           f"{' or '.join(dtypes)} {list(shape)}; check that config.json belongs to these weights")


def _check_matrix(index: WeightIndex, quantization: Optional[dict], prefix: str, shape: tuple[int, int]) -> None:
    """A dense [out, in] weight, or an MLX affine-quantized one: weight uint32
    [out, in * bits / 32], scales and biases [out, in / group_size]."""
    out_dims, in_dims = shape
    if f"{prefix}.scales" not in index:
        _check_tensor(index, f"{prefix}.weight", shape, FLOAT_DTYPES)
        return
    q = quantization or {}
    params = q.get(prefix) if isinstance(q.get(prefix), dict) else q
    bits, group = params.get("bits"), params.get("group_size")
    f = index.entries[f"{prefix}.scales"][0]
    if not params or in_dims % group or (in_dims * bits) % 32:
        raise WeightsError(f"{f}: {prefix} is stored quantized, but the config's quantization "
                           f"(bits={bits}, group_size={group}) does not fit its {in_dims} input features; "
                           "check config.json")
    _check_tensor(index, f"{prefix}.weight", (out_dims, in_dims * bits // 32), ("U32",))
    _check_tensor(index, f"{prefix}.scales", (out_dims, in_dims // group), FLOAT_DTYPES)
    if f"{prefix}.biases" in index:
        _check_tensor(index, f"{prefix}.biases", (out_dims, in_dims // group), FLOAT_DTYPES)
    elif params.get("mode", "affine") == "affine":
        raise WeightsError(f"{f}: {prefix} is affine-quantized but has no {prefix}.biases")


class Qwen3Layers:
    """The embedding, decoder layers 0..num_layers-1 and (if `final_norm`) the final norm
    of a Qwen3 checkpoint in `directory`, cast to `dtype`.

    dequantize_matmuls: multiply quantized layers as dequantize(W) @ x instead of through
    mx.quantized_matmul. MLX's CPU quantized matmul runs at 2 GFLOP/s in float32 (0.23 in
    bfloat16) on a 2-core machine, dequantize + BLAS at 65 (examples/bench_cpu_matmul.py):
    a 512-token prompt takes about a minute instead of hours. It holds one dense layer
    weight at a time (at most 100 MB in float32 for Qwen3-4B). None picks it for the
    device: on exactly when MLX's default device is the CPU and the checkpoint is quantized.
    """

    def __init__(self, directory: Path | ModelFolder, args: qwen3.ModelArgs, num_layers: int, final_norm: bool,
                 quantization: Optional[dict], dtype: mx.Dtype, dequantize_matmuls: Optional[bool] = None):
        folder = directory if isinstance(directory, ModelFolder) else ModelFolder(directory)
        self.directory = folder.path
        self.args = args
        self.num_layers = num_layers
        self.has_final_norm = final_norm
        self.quantization = quantization
        self.dtype = dtype
        self.index = WeightIndex(folder)
        keys = self._keys_for(None) + [k for i in range(num_layers) for k in self._keys_for(i)]
        if final_norm:
            keys.append("model.norm.weight")
        self.index.require(keys, "keys the encoder needs")
        check_shapes(self.index, args, quantization, num_layers, final_norm)
        self.quantized = any(k.endswith(".scales") for k in keys)
        if dequantize_matmuls is None:
            dequantize_matmuls = self.quantized and mx.default_device() == mx.cpu
        self._dequantize_matmuls = bool(dequantize_matmuls)
        self._embed: Optional[nn.Module] = None  # resident modules; None when evicted
        self._blocks: list[nn.Module] = []
        self._norm: Optional[nn.RMSNorm] = None
        self._read = False  # weights read since the last evict (resident or streamed)

    @property
    def dequantize_matmuls(self) -> bool:
        return self._dequantize_matmuls

    # -- resident or streamed --------------------------------------------------------

    def load(self) -> "Qwen3Layers":
        """Read every needed weight into memory."""
        if self._embed is None:  # built apart and kept together: a failed read leaves it evicted
            embed = self._build_embedding()
            blocks = [self._build_layer(i) for i in range(self.num_layers)]
            norm = self._build_final_norm() if self.has_final_norm else None
            mx.eval(embed.parameters(), [b.parameters() for b in blocks], norm.parameters() if norm is not None else [])
            self._embed, self._blocks, self._norm = embed, blocks, norm
        return self

    def evict(self) -> None:
        """Drop the resident modules; the next non-streamed use reads them again. The
        buffers of what was read since the last evict go back to the system (clear_cache).
        With nothing read since, nothing of the encoder's is in MLX's buffer cache: what is
        there (a generation's activations, which the next one reuses) stays, and no
        allocation has to be made again."""
        if not self._read:
            return
        self._embed = None
        self._blocks = []
        self._norm = None
        self._read = False
        mx.clear_cache()

    @property
    def resident(self) -> bool:
        return self._embed is not None

    # Each accessor returns the resident module, or with stream=True (or when evicted)
    # one built now from the mapped files, whose weights go when the caller drops it.

    def embedding(self, stream: bool = False) -> nn.Module:
        return self._build_embedding() if stream or not self.resident else self._embed

    def embed(self, input_ids: mx.array, stream: bool = False) -> mx.array:
        """The embeddings [B, L, H] of `input_ids` [B, L]. Streamed (or evicted), only the
        table's rows of the ids present are read, into a table of those rows: the same
        values, without reading the whole table (0.22 GB for Qwen3-4B at 4 bits)."""
        if self.resident and not stream:
            return self._embed(input_ids)
        ids = np.array(input_ids)
        vocab = self.args.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise WeightsError(f"token ids must lie in [0, {vocab}) for this encoder's embedding, got "
                               f"[{int(ids.min())}, {int(ids.max())}]")
        present, inverse = np.unique(ids, return_inverse=True)
        keys = self._keys_for(None)
        holder = nn.Module()
        holder.embed_tokens = nn.Embedding(len(present), self.args.hidden_size)
        table = self._build("", holder, keys, {k: self.index.rows(k, present) for k in keys}).embed_tokens
        return table(mx.array(inverse.reshape(ids.shape).astype(np.int32)))

    def layer(self, i: int, stream: bool = False) -> nn.Module:
        if not 0 <= i < self.num_layers:
            raise IndexError(f"decoder layer {i} is not among the {self.num_layers} this encoder reads")
        return self._build_layer(i) if stream or not self.resident else self._blocks[i]

    def final_norm(self, stream: bool = False) -> nn.RMSNorm:
        if not self.has_final_norm:
            raise WeightsError("this encoder was opened without the final norm")
        return self._build_final_norm() if stream or not self.resident else self._norm

    def weight_bytes(self, layer: Optional[int] = None) -> int:
        """Resident bytes of the embedding (layer None) or of one decoder layer, after the
        cast to `self.dtype`; read from the safetensors headers, no weights touched."""
        total = 0
        for k in self._keys_for(layer):
            _, shape, dt = self.index.entries[k]
            n = 1
            for d in shape:
                n *= d
            total += n * (self.dtype.size if dt in FLOAT_DTYPES else DTYPE_BYTES[dt])
        return total

    # -- building --------------------------------------------------------------------

    def keys_for(self, layer: Optional[int]) -> list[str]:
        """Checkpoint keys of the embedding (layer None) or of decoder layer `layer`."""
        return self._keys_for(layer)

    def _keys_for(self, layer: Optional[int]) -> list[str]:
        if layer is None:
            return [f"model.embed_tokens{s}" for s in self._quant_suffixes("model.embed_tokens")]
        p = f"model.layers.{layer}"
        linears = [f"{p}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [f"{p}.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
        norms = [f"{p}.input_layernorm", f"{p}.post_attention_layernorm",
                 f"{p}.self_attn.q_norm", f"{p}.self_attn.k_norm"]
        return [f"{x}{s}" for x in linears for s in self._quant_suffixes(x)] + [f"{x}.weight" for x in norms]

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
        q = self.quantization or {}
        if isinstance(q.get(key), dict):
            return q[key]
        in_dims = module.weight.shape[-1]
        n_groups = self.index.shape(f"{key}.scales")[-1]
        packed = self.index.shape(f"{key}.weight")[-1]
        return {"group_size": in_dims // n_groups, "bits": packed * 32 // in_dims,
                "mode": q.get("mode", "affine")}

    def _build(self, prefix: str, module: nn.Module, keys: list[str], weights: Optional[dict] = None) -> nn.Module:
        """Quantize `module` like the checkpoint, then load `keys`; `prefix` is the
        module's path in the checkpoint without the leading "model." ("" for the root)."""
        self._read = True
        join = (lambda p: f"{prefix}.{p}") if prefix else (lambda p: p)
        nn.quantize(module, class_predicate=lambda p, m: self._quant_params(join(p), m))
        if self._dequantize_matmuls:
            swap = [(p, DequantizedLinear.like(m)) for p, m in module.named_modules()
                    if type(m) is nn.QuantizedLinear]
            module.update_modules(tree_unflatten(swap))
        cut = len(f"model.{prefix}.") if prefix else len("model.")
        cast = [(k[cut:], v.astype(self.dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
                for k, v in (weights if weights is not None else self.index.load(keys)).items()]
        try:
            module.load_weights(cast, strict=True)
        except ValueError as e:  # wrong shapes, or a quantized/dense mismatch
            raise WeightsError(f"text encoder weights in {self.directory} do not fit this Qwen3 config: {e}") from None
        return module.eval()

    def _build_embedding(self) -> nn.Module:
        # nn.quantize only visits children, so the Embedding sits in a holder whose
        # path for it, "embed_tokens", is the checkpoint's.
        holder = nn.Module()
        holder.embed_tokens = nn.Embedding(self.args.vocab_size, self.args.hidden_size)
        return self._build("", holder, self._keys_for(None)).embed_tokens

    def _build_layer(self, i: int) -> nn.Module:
        return self._build(f"layers.{i}", qwen3.TransformerBlock(self.args), self._keys_for(i))

    def _build_final_norm(self) -> nn.RMSNorm:
        self._read = True
        norm = nn.RMSNorm(self.args.hidden_size, eps=self.args.rms_norm_eps)
        norm.weight = self.index.load(["model.norm.weight"])["model.norm.weight"].astype(self.dtype)
        return norm


class DequantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear that multiplies as dequantize(W) @ x (see
    Qwen3Layers.dequantize_matmuls): the same parameters under the same names, the same
    values up to summation order."""

    @classmethod
    def like(cls, q: nn.QuantizedLinear) -> "DequantizedLinear":
        """An empty one of q's shape and quantization, for load_weights to fill; its
        placeholder weights are lazy and never evaluated."""
        out_dims, packed = q.weight.shape
        return cls(packed * 32 // q.bits, out_dims, "bias" in q, q.group_size, q.bits, mode=q.mode)

    def __call__(self, x: mx.array) -> mx.array:
        w = mx.dequantize(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                          bits=self.bits, mode=self.mode)
        y = x @ w.astype(x.dtype).T
        return y + self["bias"] if "bias" in self else y
