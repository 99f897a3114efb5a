"""The weights of a Qwen3 checkpoint, built one module at a time from its safetensors.

The decoder layers are mlx-lm's (`mlx_lm.models.qwen3.TransformerBlock`); this module
decides which keys to read, quantizes each module like the checkpoint stores it, and
either keeps the built modules resident or builds each one when it is needed and lets
it go (streaming). Only the embedding, decoder layers 0..num_layers-1 and, when asked
for, the final norm are ever read: the deeper layers and the lm_head stay untouched in
the memory-mapped files.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.models import qwen3

from .errors import WeightsError

_INT_BYTES = {"U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8, "BOOL": 1}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class WeightIndex:
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

    def __init__(self, directory: Path, args: qwen3.ModelArgs, num_layers: int, final_norm: bool,
                 quantization: Optional[dict], dtype: mx.Dtype, dequantize_matmuls: Optional[bool] = None):
        self.directory = Path(directory)
        self.args = args
        self.num_layers = num_layers
        self.has_final_norm = final_norm
        self.quantization = quantization
        self.dtype = dtype
        self.index = WeightIndex(self.directory)
        keys = self._keys_for(None) + [k for i in range(num_layers) for k in self._keys_for(i)]
        if final_norm:
            keys.append("model.norm.weight")
        self.index.require(keys, "keys the encoder needs")
        self.quantized = any(k.endswith(".scales") for k in keys)
        if dequantize_matmuls is None:
            dequantize_matmuls = self.quantized and mx.default_device() == mx.cpu
        self._dequantize_matmuls = bool(dequantize_matmuls)
        self._embed: Optional[nn.Module] = None  # resident modules; None when evicted
        self._blocks: list[nn.Module] = []
        self._norm: Optional[nn.RMSNorm] = None

    @property
    def dequantize_matmuls(self) -> bool:
        return self._dequantize_matmuls

    # -- resident or streamed --------------------------------------------------------

    def load(self) -> "Qwen3Layers":
        """Read every needed weight into memory."""
        if self._embed is None:
            self._embed = self._build_embedding()
            self._blocks = [self._build_layer(i) for i in range(self.num_layers)]
            self._norm = self._build_final_norm() if self.has_final_norm else None
            mx.eval(self._embed.parameters(), [b.parameters() for b in self._blocks],
                    self._norm.parameters() if self._norm is not None else [])
        return self

    def evict(self) -> None:
        """Drop the resident modules; the next non-streamed use reads them again."""
        self._embed = None
        self._blocks = []
        self._norm = None
        mx.clear_cache()

    @property
    def resident(self) -> bool:
        return self._embed is not None

    # Each accessor returns the resident module, or with stream=True (or when evicted)
    # one built now from the mapped files, whose weights go when the caller drops it.

    def embedding(self, stream: bool = False) -> nn.Module:
        return self._build_embedding() if stream or not self.resident else self._embed

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
            total += n * (self.dtype.size if dt in _FLOAT_DTYPES else _INT_BYTES.get(dt, 4))
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

    def _build(self, prefix: str, module: nn.Module, keys: list[str]) -> nn.Module:
        """Quantize `module` like the checkpoint, then load `keys`; `prefix` is the
        module's path in the checkpoint without the leading "model." ("" for the root)."""
        join = (lambda p: f"{prefix}.{p}") if prefix else (lambda p: p)
        nn.quantize(module, class_predicate=lambda p, m: self._quant_params(join(p), m))
        if self._dequantize_matmuls:
            swap = [(p, DequantizedLinear.like(m)) for p, m in module.named_modules()
                    if type(m) is nn.QuantizedLinear]
            module.update_modules(tree_unflatten(swap))
        cut = len(f"model.{prefix}.") if prefix else len("model.")
        cast = [(k[cut:], v.astype(self.dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
                for k, v in self.index.load(keys).items()]
        try:
            module.load_weights(cast, strict=True)
        except ValueError as e:  # wrong shapes, or a quantized/dense mismatch
            raise WeightsError(f"text encoder weights do not fit this Qwen3 config: {e}") from None
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
