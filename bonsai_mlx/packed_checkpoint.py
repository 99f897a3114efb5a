"""Transformer checkpoints whose block linears are packed binary/ternary.

Two on-disk layouts are read, both with diffusers key names and a
`quantization_config.json` beside the safetensors:

- PrismML's official MLX packs: `{"bits": 1|2, "group_size": 128, "skip_patterns": [...]}`;
  a packed linear `P` has `P.weight` (uint32 affine codes), `P.scales`, `P.biases`.
  They are converted losslessly to our formats on load (packing.from_mlx_affine).
- Our own packs: `{"format": "bonsai", "weight_format": "binary"|"ternary"|"ternary2",
  "group_size": 128}`; a packed linear has `P.weight` (our codes) and `P.scales`, no bias.

A dense checkpoint can also be quantized on load (post-training, packing.quantize).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import ConfigError, WeightsError
from .packed_linear import BACKENDS, PackedLinear
from .packing import FORMATS, GROUP_SIZE, PackedWeight, data_shape, dequantize, from_mlx_affine, quantize
from .weight_names import block_linear_names

QUANT_CONFIG = "quantization_config.json"


def read_quant_config(directory: Path) -> dict | None:
    path = directory / QUANT_CONFIG
    if not path.exists():
        return None
    try:
        qc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(qc, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    if qc.get("format") == "bonsai":
        if qc.get("weight_format") not in FORMATS:
            raise ConfigError(f"{path}: weight_format must be one of {FORMATS}, got {qc.get('weight_format')!r}")
    elif qc.get("bits") not in (1, 2):
        raise ConfigError(
            f"{path}: bits={qc.get('bits')!r}; Bonsai packs are bits=1 (binary) or bits=2 (ternary). "
            "Other MLX quantizations are not binary/ternary and are not supported."
        )
    if qc.get("group_size", GROUP_SIZE) != GROUP_SIZE:
        raise ConfigError(f"{path}: group_size={qc.get('group_size')}; Bonsai packs use {GROUP_SIZE}")
    return qc


def _module(model: nn.Module, path: str):
    parent, obj = None, model
    for part in path.split("."):
        parent = obj
        obj = obj[int(part)] if isinstance(obj, list) else obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return parent, part, obj


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, last, _ = _module(model, path)
    if isinstance(parent, list):
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def _dense_shape(model: nn.Module, path: str) -> tuple[int, int]:
    try:
        _, _, lin = _module(model, path)
    except (AttributeError, KeyError, IndexError, ValueError):
        raise WeightsError(f"packed weight {path} names no linear layer of this model config") from None
    if not isinstance(lin, nn.Linear):
        raise WeightsError(f"packed weight {path} is not a linear layer of this model")
    return tuple(lin.weight.shape)


def pack_model_from_checkpoint(model: nn.Module, weights: dict[str, mx.array], qc: dict, backend: str) -> set[str]:
    """Swap every packed linear named in `weights` for a PackedLinear, popping its tensors.
    Returns the module paths that were packed."""
    packed = sorted(k[: -len(".scales")] for k in weights if k.endswith(".scales"))
    official = qc.get("format") != "bonsai"
    for p in packed:
        if f"{p}.weight" not in weights:
            raise WeightsError(f"packed layer {p} has scales but no {p}.weight")
        expected = _dense_shape(model, p)
        w, s = weights.pop(f"{p}.weight"), weights.pop(f"{p}.scales")
        if official:
            if f"{p}.biases" not in weights:
                raise WeightsError(f"{p}: an MLX affine pack needs {p}.biases beside {p}.scales")
            pw = from_mlx_affine(w, s, weights.pop(f"{p}.biases"), bits=qc["bits"], group_size=GROUP_SIZE, name=p)
        else:
            fmt = qc["weight_format"]
            (rows, cols), dt = data_shape(fmt, expected)
            if tuple(w.shape) != (rows, cols) or w.dtype != dt:
                raise WeightsError(
                    f"{p}.weight: a {fmt} pack of a {list(expected)} linear is {dt} [{rows}, {cols}], "
                    f"got {w.dtype} {list(w.shape)}; does {QUANT_CONFIG} match the file?"
                )
            pw = PackedWeight(fmt, w, s, expected)
        if pw.shape != expected:
            raise WeightsError(f"{p}: packed weight is {list(pw.shape)} but the model expects {list(expected)}")
        _replace(model, p, PackedLinear.from_packed(pw, backend=backend))
    stray = sorted(k for k in weights if k.endswith(".biases"))
    if stray:
        raise WeightsError(f"biases without scales (a truncated pack?): {stray[:8]}")
    return set(packed)


def quantize_model(model: nn.Module, weights: dict[str, mx.array], fmt: str, backend: str) -> set[str]:
    """Post-training quantize the block linears of a dense checkpoint, one layer at a time."""
    if fmt not in FORMATS:
        raise ConfigError(f"quantize must be one of {FORMATS}, got {fmt!r}")
    cfg = model.config
    names = block_linear_names(cfg.num_layers, cfg.num_single_layers)
    for p in names:
        w = weights.pop(f"{p}.weight", None)
        if w is None:
            continue  # reported as missing by the weight check
        expected = _dense_shape(model, p)
        if tuple(w.shape) != expected:
            raise WeightsError(f"{p}.weight: expected {list(expected)}, got {list(w.shape)}")
        _replace(model, p, PackedLinear.from_packed(quantize(w, fmt), backend=backend))
    return set(names)


def packed_params(model: nn.Module, packed: set[str]) -> dict[str, mx.array]:
    """The tensors the PackedLinears hold, under their checkpoint names."""
    out = {}
    for p in packed:
        _, _, lin = _module(model, p)
        if isinstance(lin, PackedLinear):
            out[f"{p}.weight"], out[f"{p}.scales"] = lin.weight, lin.scales
    return out


def save_packed(model: nn.Module, directory: str | Path) -> Path:
    """Write `model` as one of our packs: config.json, quantization_config.json and
    model.safetensors (packed block linears, 16-bit rest)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fmts = {m.fmt for _, m in model.named_modules() if isinstance(m, PackedLinear)}
    if len(fmts) != 1:
        raise ConfigError(f"save_packed needs a model whose linears share one packed format, found {sorted(fmts) or 'none'}")
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    (directory / QUANT_CONFIG).write_text(
        json.dumps({"format": "bonsai", "weight_format": fmts.pop(), "group_size": GROUP_SIZE}, indent=2))
    weights = dict(tree_flatten(model.parameters()))
    tmp = directory / "model.partial.safetensors"  # renamed when complete: no half-written pack
    mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
    tmp.replace(directory / "model.safetensors")
    return directory


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")


def transformer_in_format(source: Path, fmt: str, dtype=mx.bfloat16) -> nn.Module:
    """The transformer of a pipeline or pack directory with its block linears in our format
    `fmt`: a dense checkpoint is quantized (post-training), an official pack converts
    losslessly (refused when its bits cannot hold `fmt`), ternary <-> ternary2 re-encodes
    exactly; the weights that stay unpacked are in `dtype`."""
    from .loading import _transformer_dir, load_transformer

    tdir = _transformer_dir(source)
    already = read_quant_config(tdir)
    if already is not None and already.get("format") != "bonsai":
        want_bits = 1 if fmt == "binary" else 2
        if already["bits"] != want_bits:
            raise ConfigError(f"{tdir} is a bits={already['bits']} pack; it converts losslessly only to "
                              f"{'binary' if already['bits'] == 1 else 'ternary/ternary2'}, not {fmt}")
    model = load_transformer(source, dtype=dtype, quantize=None if already else fmt, backend="reference")
    for name, m in list(model.named_modules()):
        if isinstance(m, PackedLinear) and m.fmt != fmt:
            if {m.fmt, fmt} != {"ternary", "ternary2"}:
                raise ConfigError(f"{tdir} holds {m.fmt} weights, which do not convert exactly to {fmt}")
            _replace(model, name, PackedLinear.from_packed(quantize(dequantize(m.packed, mx.float32), fmt)))
    return model


def convert_pipeline(source: str | Path, output: str | Path, fmt: str, overwrite: bool = False,
                     dtype=mx.bfloat16) -> Path:
    """Write `source` (diffusers klein pipeline or PrismML pack) as a pack whose transformer
    is in our format `fmt`, its unpacked weights stored in `dtype`; text encoder,
    tokenizer, VAE and model_index are copied."""
    import shutil

    source, output = Path(source), Path(output)
    if not source.is_dir():
        raise ConfigError(f"{source} is not a directory: pass a diffusers pipeline or a pack directory")
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} exists; choose a new directory or pass --overwrite")
    model = transformer_in_format(source, fmt, dtype)
    tmp = output.with_name(output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_packed(model, tmp / "transformer-packed-mflux")
    for part in ("text_encoder-mlx-4bit", "text_encoder", "tokenizer", "vae", "model_index.json"):
        src = source / part
        if src.is_dir():
            shutil.copytree(src, tmp / part)
        elif src.is_file():
            shutil.copy2(src, tmp / part)
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return output
