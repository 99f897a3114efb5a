"""Transformer checkpoints whose block linears are packed binary/ternary.

Two on-disk layouts are read, both with diffusers key names and a
`quantization_config.json` beside the safetensors:

- PrismML's official MLX packs: `{"bits": 1|2, "group_size": 128, "skip_patterns": [...]}`;
  a packed linear `P` has `P.weight` (uint32 affine codes), `P.scales`, `P.biases`.
  They are converted losslessly to our formats on load (packing.mlx_affine_lazy).
- Our own packs: `{"format": "bonsai", "weight_format": "binary"|"ternary"|"ternary2",
  "group_size": 128}`; a packed linear has `P.weight` (our codes) and `P.scales`, no bias.

A dense checkpoint can also be quantized on load (post-training, packing.quantize).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import BonsaiError, ConfigError, WeightsError
from .safe_files import ModelFolder, read_json
from .validate import brief, is_int
from .packed_linear import BACKENDS, PackedLinear
from .packing import FORMATS, GROUP_SIZE, PackedWeight, affine_faults, data_shape, mlx_affine_lazy, quantize
from .weight_names import block_linear_names

QUANT_CONFIG = "quantization_config.json"


def read_quant_config(folder: ModelFolder) -> dict | None:
    """The folder's quantization_config.json (bounded, validated), or None without one."""
    if not folder.exists(QUANT_CONFIG):
        return None
    path = folder.file(QUANT_CONFIG, "quantization config")
    qc = read_json(path, "quantization config")
    if qc.get("format") == "bonsai":
        if qc.get("weight_format") not in FORMATS:
            raise ConfigError(f"{path}: weight_format must be one of {FORMATS}, got {brief(qc.get('weight_format'))}")
    elif qc.get("bits") not in (1, 2) or not is_int(qc.get("bits")):
        raise ConfigError(
            f"{path}: bits={brief(qc.get('bits'))}; Bonsai packs are bits=1 (binary) or bits=2 (ternary). "
            "Other MLX quantizations are not binary/ternary and are not supported."
        )
    group = qc.get("group_size", GROUP_SIZE)
    if group != GROUP_SIZE or not is_int(group):
        raise ConfigError(f"{path}: group_size={brief(group)}; Bonsai packs use {GROUP_SIZE}")
    skip = qc.get("skip_patterns", [])
    if not isinstance(skip, list) or not all(isinstance(p, str) for p in skip):
        raise ConfigError(f"{path}: skip_patterns must be a list of strings, got {brief(skip)}")
    return qc


def _module(model: nn.Module, path: str):
    """(parent, last name, module) at the dotted `path`; KeyError/IndexError when it names
    no submodule. Only children are followed (modules are dicts of them): a name read
    from a file never reaches other attributes."""
    parent, obj = None, model
    for part in path.split("."):
        parent = obj
        if isinstance(obj, list) and part.isascii() and part.isdigit():
            obj = obj[int(part)]
        elif isinstance(obj, dict):
            obj = obj[part]
        else:
            raise KeyError(path)
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
    """Swap every packed linear named in `weights` for a PackedLinear, popping its tensors,
    each read and checked as it is swapped. Returns the module paths that were packed."""
    packed = sorted(k[: -len(".scales")] for k in weights if k.endswith(".scales"))
    pending = None  # the layer in flight: its conversion runs while the next one is built
    for p in packed:
        try:
            current = _start_layer(model, weights, qc, backend, p)
        except BonsaiError:
            _settle(pending, qc)  # layers are checked in order: the one before reports first
            raise
        _settle(pending, qc)
        pending = current
    _settle(pending, qc)
    stray = sorted(k for k in weights if k.endswith(".biases"))
    if stray:
        raise WeightsError(f"biases without scales (a truncated pack?): {stray[:8]}")
    return set(packed)


def _start_layer(model: nn.Module, weights: dict, qc: dict, backend: str, p: str):
    """Swap layer `p` for a PackedLinear whose conversion from an official pack has started;
    returns what `_settle` waits for (None for our own packs, which need no conversion)."""
    if f"{p}.weight" not in weights:
        raise WeightsError(f"packed layer {p} has scales but no {p}.weight")
    expected = _dense_shape(model, p)
    w, s = weights.pop(f"{p}.weight"), weights.pop(f"{p}.scales")
    current = None
    if qc.get("format") != "bonsai":  # an official MLX affine pack
        if f"{p}.biases" not in weights:
            raise WeightsError(f"{p}: an MLX affine pack needs {p}.biases beside {p}.scales")
        source = (w, s, weights.pop(f"{p}.biases"))
        pw, faults = mlx_affine_lazy(*source, bits=qc["bits"], group_size=GROUP_SIZE, name=p)
        mx.async_eval(pw.data, pw.scales, faults)
        current = (p, faults, source)
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
        _settle(current, qc)  # a fault in the layer's data is reported first
        raise WeightsError(f"{p}: packed weight is {list(pw.shape)} but the model expects {list(expected)}")
    _replace(model, p, PackedLinear.from_packed(pw, backend=backend))
    return current


def _settle(pending, qc: dict) -> None:
    """Wait for a converted layer and raise what its fault count stands for."""
    if pending is not None:
        p, faults, source = pending
        affine_faults(faults, *source, bits=qc["bits"], name=p)


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
    # Written under a name no loader reads, renamed when complete: no half-written pack.
    tmp = directory / f".model.safetensors.{os.getpid()}.partial"
    try:
        with open(tmp, "wb") as fh:  # a file object: MLX appends .safetensors to names
            mx.save_safetensors(fh, weights, metadata={"format": "mlx"})
        os.replace(tmp, directory / "model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    return directory


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
