"""`convert`: a klein pipeline or PrismML pack -> a pack in our native binary/ternary format.

The new pack is written into a temporary sibling of the output and renamed into place
only when complete, so an interrupted conversion leaves no pack, or the old one, under
the output's name, never a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx

from .errors import BonsaiError, ConfigError
from .layouts import OUR_PACK, PACK_COPIED
from .loading import load_transformer, transformer_folder
from .packed_checkpoint import QUANT_CONFIG, _replace, read_quant_config, save_packed
from .packed_linear import PackedLinear
from .packing import FORMATS, dequantize, quantize
from .safe_files import ModelFolder, check_regular, read_json

# What a pack holds besides its transformer, copied as is.
COPIED_PARTS = PACK_COPIED
PACK_TRANSFORMER = OUR_PACK.transformer


def is_our_pack(directory: Path) -> bool:
    """Whether `directory` holds a pack this module wrote (the only kind --overwrite replaces)."""
    try:
        qc = read_json(directory / PACK_TRANSFORMER / QUANT_CONFIG, "quantization config")
    except BonsaiError:
        return False
    return qc.get("format") == "bonsai"


def _check_output(source: Path, output: Path, overwrite: bool) -> None:
    src, out = Path(os.path.realpath(source)), Path(os.path.realpath(output))
    if out == src or src in out.parents or out in src.parents:
        raise ConfigError(f"the output {output} and the source {source} must not contain one another")
    if not output.parent.is_dir():
        raise ConfigError(f"the folder {output.parent} does not exist; create it first")
    if not os.path.lexists(output):
        return
    if not overwrite:
        raise ConfigError(f"{output} exists; choose a new directory or pass --overwrite")
    if output.is_symlink() or not output.is_dir():
        raise ConfigError(f"{output} exists and is not a directory; --overwrite replaces only a pack directory "
                          "written by convert: remove it yourself or choose another name")
    if any(output.iterdir()) and not is_our_pack(output):
        raise ConfigError(f"{output} is not a pack written by convert; --overwrite will not delete it. "
                          "Remove it yourself or choose another name")


def _copy_part(root: ModelFolder, name: str, dest: Path) -> None:
    """Copy root/name (file or folder) to dest: regular files inside the model directory only
    (a symlink out of it, a FIFO or a device is refused, not followed or copied)."""
    src = root.path / name
    if not os.path.lexists(src):
        return
    if not src.is_dir():
        check_regular(root.contained(src), "model file")
        shutil.copy2(src, dest)
        return
    folder = root.subfolder(name)
    dest.mkdir()
    for item in sorted(src.iterdir()):
        _copy_part(folder, item.name, dest / item.name)


def _repack(model, fmt: str) -> None:
    """Re-encode packed layers of another format as `fmt` (ternary <-> ternary2 is exact)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, PackedLinear) and m.fmt != fmt:
            _replace(model, name, PackedLinear.from_packed(quantize(dequantize(m.packed, mx.float32), fmt)))


def transformer_in_format(source: Path, fmt: str, dtype=mx.bfloat16):
    """The transformer of a pipeline or pack directory with its block linears in our format
    `fmt`: a dense checkpoint is quantized (post-training), an official pack converts
    losslessly (refused when its bits cannot hold `fmt`), ternary <-> ternary2 re-encodes
    exactly; the weights that stay unpacked are in `dtype`."""
    tdir = transformer_folder(ModelFolder(source))
    already = read_quant_config(tdir)
    if already is not None and already.get("format") != "bonsai":
        want_bits = 1 if fmt == "binary" else 2
        if already["bits"] != want_bits:
            raise ConfigError(f"{tdir.path} is a bits={already['bits']} pack; it converts losslessly only to "
                              f"{'binary' if already['bits'] == 1 else 'ternary/ternary2'}, not {fmt}")
    model = load_transformer(source, dtype=dtype, quantize=None if already else fmt, backend="reference")
    _repack(model, fmt)
    return model


def convert_pipeline(source: str | Path, output: str | Path, fmt: str, overwrite: bool = False,
                     dtype=mx.bfloat16) -> Path:
    """Write `source` (diffusers klein pipeline or PrismML pack) as a pack whose transformer
    is in our format `fmt`, its unpacked weights stored in `dtype`; text encoder,
    tokenizer, VAE and model_index are copied. `overwrite` replaces an existing pack that
    convert wrote (nothing else)."""
    source, output = Path(source).expanduser(), Path(output).expanduser()
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not source.is_dir():
        raise ConfigError(f"{source} is not a directory: pass a diffusers pipeline or a pack directory")
    _check_output(source, output, overwrite)
    root = ModelFolder(source)
    model = transformer_in_format(source, fmt, dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    old = None
    try:
        save_packed(model, tmp / PACK_TRANSFORMER)
        for part in COPIED_PARTS:
            _copy_part(root, part, tmp / part)
        if os.path.lexists(output):  # kept aside until the new pack is in place
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
            os.replace(output, old / output.name)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.lexists(output) and os.path.lexists(old / output.name):
            os.replace(old / output.name, output)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return output
