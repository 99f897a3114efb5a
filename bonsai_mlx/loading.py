"""Reading transformer checkpoints: diffusers directories and BFL single files.

Weights are memory-mapped lazily by `mx.load` and materialised block by block straight
into the model's parameters, so a checkpoint is never held twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import TransformerConfig, preset
from .errors import BonsaiError, ConfigError, WeightsError
from .packed_checkpoint import (QUANT_CONFIG, check_backend, pack_model_from_checkpoint, packed_params,
                                quantize_model, read_quant_config)
from .text_encoder import ENCODER_SUBDIRS
from .transformer import Flux2Transformer
from .weight_names import bfl_to_diffusers, is_bfl_checkpoint

_MAX_LISTED = 12
# Where a pack (PrismML's MLX layout) or a diffusers pipeline keeps its transformer.
TRANSFORMER_SUBDIRS = ("transformer-packed-mflux", "transformer")


def _listing(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def read_safetensors(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path), format="safetensors")
    except Exception as e:  # mlx raises RuntimeError/ValueError with terse texts
        raise WeightsError(
            f"could not read {path} as safetensors ({e}). The file is corrupt or incomplete: "
            "delete it and download it again."
        ) from None


def safetensors_files(directory: Path) -> list[Path]:
    """The shard files of a diffusers model directory, via its index when it has one."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{indexes[0]} is not a valid safetensors index ({e}); download it again") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise WeightsError(
                f"{directory} is incomplete: its index names shard files that are not there: {_listing(missing)}. "
                "Download the missing shards."
            )
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{directory} holds no *.safetensors file: download the transformer weights into it")
    return files


def read_checkpoint(files: list[Path]) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in files:
        shard = read_safetensors(f)
        clash = weights.keys() & shard.keys()
        if clash:
            raise WeightsError(f"{f.name} repeats weights already read from another shard: {_listing(clash)}")
        weights.update(shard)
    return weights


def infer_bfl_config(weights: dict[str, mx.array]) -> TransformerConfig:
    """Read the architecture off a BFL checkpoint's shapes (it ships without a config).

    RoPE axes and theta cannot be seen in the weights; FLUX.2 uses (32, 32, 32, 32) and
    2000 with 128-dim heads, and any other head size needs an explicit config.
    """
    try:
        D, c_in = weights["img_in.weight"].shape
        head_dim = weights["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0] if any(
            k.startswith("double_blocks.") for k in weights) else weights["single_blocks.0.norm.query_norm.scale"].shape[0]
        blocks = lambda kind: len({k.split(".")[1] for k in weights if k.startswith(kind + ".")})
        num_layers, num_single = blocks("double_blocks"), blocks("single_blocks")
        if num_layers:
            hidden = weights["double_blocks.0.img_mlp.2.weight"].shape[1]
        else:
            hidden = weights["single_blocks.0.linear2.weight"].shape[1] - D
        out_channels = weights["final_layer.linear.weight"].shape[0]
        t_channels = weights["time_in.in_layer.weight"].shape[1]
        joint = weights["txt_in.weight"].shape[1]
    except KeyError as e:
        raise WeightsError(f"this does not look like a FLUX.2 checkpoint: weight {e} is missing") from None
    if head_dim != 128:
        raise ConfigError(
            f"this BFL checkpoint has {head_dim}-dim heads; its RoPE axes cannot be inferred. "
            "Pass config=TransformerConfig(...) (or a preset name) to load_transformer."
        )
    ratio = hidden / D
    if int(D * ratio) != hidden:  # keep diffusers' int(D * ratio) landing on `hidden`
        ratio = (hidden + 0.5) / D
    return TransformerConfig(
        in_channels=c_in, out_channels=out_channels, num_layers=num_layers, num_single_layers=num_single,
        attention_head_dim=head_dim, num_attention_heads=D // head_dim, joint_attention_dim=joint,
        timestep_guidance_channels=t_channels, mlp_ratio=ratio,
        guidance_embeds="guidance_in.in_layer.weight" in weights,
    )


def check_weights(model: nn.Module, weights: dict[str, mx.array], packed: set[str] = frozenset()) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped weight."""
    expected = dict(tree_flatten(model.parameters()))
    missing = expected.keys() - weights.keys()
    unexpected = weights.keys() - expected.keys()
    wrong = [
        f"{k}: expected {list(expected[k].shape)}, got {list(weights[k].shape)}"
        for k in sorted(expected.keys() & weights.keys())
        if tuple(expected[k].shape) != tuple(weights[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing weights ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected weights ({len(unexpected)}): {_listing(unexpected)}")
    if wrong:
        shown = wrong[:_MAX_LISTED] + ([f"... ({len(wrong) - _MAX_LISTED} more)"] if len(wrong) > _MAX_LISTED else [])
        problems.append("shape mismatches:\n    " + "\n    ".join(shown))
    if problems:
        raise WeightsError(
            "the checkpoint does not fit the model config:\n  - " + "\n  - ".join(problems)
            + "\nCheck that config.json belongs to these weights (or pass the right config)."
        )
    not_float = sorted(k for k, w in weights.items()
                       if not mx.issubdtype(w.dtype, mx.floating) and k.rpartition(".")[0] not in packed)
    if not_float:
        raise WeightsError(
            f"weights that are not floating point in a dense checkpoint: {_listing(not_float)}. "
            "If this is a packed (binary/ternary) checkpoint, load its directory with its quantization_config.json."
        )


def materialize(model: nn.Module, weights: dict[str, mx.array], dtype, packed: set[str] = frozenset()) -> None:
    """Cast and evaluate weights one top-level child at a time, so peak memory stays at
    the final weights plus one tensor in flight (the lazily read source is freed).
    Packed layers keep their codes and fp16 scales as they are."""
    cast = {k: w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) and k.rpartition(".")[0] not in packed else w
            for k, w in weights.items()}
    weights.clear()
    model.update(tree_unflatten(list(cast.items())))
    del cast
    for _, child in model.children().items():
        for sub in child if isinstance(child, list) else [child]:
            mx.eval(sub.parameters())


def _resolve_config(config) -> TransformerConfig | None:
    if config is None or isinstance(config, TransformerConfig):
        return config
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, dict):
        return TransformerConfig.from_dict(config)
    raise ConfigError(f"config must be a TransformerConfig, a preset name or a dict, got {type(config).__name__}")


def _transformer_dir(path: Path) -> Path:
    """Accept a pack or pipeline root as well as the transformer directory itself."""
    if (path / "config.json").exists():
        return path
    for sub in TRANSFORMER_SUBDIRS:
        if (path / sub / "config.json").exists():
            return path / sub
    return path


def load_transformer(path, dtype=mx.float16, config=None, quantize: str | None = None,
                     backend: str = "auto") -> Flux2Transformer:
    """Load a FLUX.2 transformer.

    path: a diffusers transformer directory (config.json + one or several *.safetensors,
    with or without an index), a packed directory (the same plus quantization_config.json:
    PrismML's MLX packs or ours), a pack/pipeline root holding such a directory, or one
    BFL-format .safetensors file (converted in memory).
    config: overrides the directory's config.json, or tells a BFL file's RoPE settings.
    quantize: "binary", "ternary" or "ternary2" packs the 100 block linears of a dense
    checkpoint on load (post-training quantization, rules in docs/formats.md).
    backend: packed matmul backend ("auto", "reference", "metal", "cuda").
    dtype: of activations and 16-bit weights; packed scales stay fp16.
    """
    path = Path(path).expanduser()
    cfg = _resolve_config(config)
    check_backend(backend)
    if not path.exists():
        raise WeightsError(
            f"{path} does not exist. Pass a diffusers transformer directory (config.json + *.safetensors) "
            "or a FLUX.2 .safetensors checkpoint."
        )
    qc = None
    if path.is_dir():
        path = _transformer_dir(path)
        qc = read_quant_config(path)
        if cfg is None:
            if not (path / "config.json").exists():
                raise WeightsError(f"{path} has no config.json: a diffusers transformer directory needs one")
            cfg = TransformerConfig.from_json(path / "config.json")
        weights = read_checkpoint(safetensors_files(path))
    else:
        weights = read_safetensors(path)
        if is_bfl_checkpoint(weights):
            cfg = cfg or infer_bfl_config(weights)
            weights = bfl_to_diffusers(weights)
        elif cfg is None:
            sibling = path.parent / "config.json"
            if not sibling.exists():
                raise ConfigError(f"{path} has diffusers weight names but no config.json beside it; pass config=")
            cfg = TransformerConfig.from_json(sibling)
    if dtype not in (mx.float16, mx.bfloat16, mx.float32):
        raise ValueError(f"dtype must be mx.float16, mx.bfloat16 or mx.float32, got {dtype}")
    model = Flux2Transformer(cfg)  # parameters are lazy and never evaluated before replacement
    packed: set[str] = set()
    if qc is not None:
        if quantize:
            raise ConfigError(f"{path} is already packed ({QUANT_CONFIG}); drop quantize={quantize!r}")
        packed = pack_model_from_checkpoint(model, weights, qc, backend)
    elif quantize:
        packed = quantize_model(model, weights, quantize, backend)
    weights.update(packed_params(model, packed))
    check_weights(model, weights, packed)
    materialize(model, weights, dtype, packed)
    model.eval()
    return model


# ---------------------------------------------------------------------------- Hugging Face Hub

# Known names for `resolve_model`; anything with a "/" is taken as a Hugging Face repo id.
MODELS = {
    "bonsai-binary": "prism-ml/bonsai-image-binary-4B-mlx-1bit",
    "bonsai-ternary": "prism-ml/bonsai-image-ternary-4B-mlx-2bit",
}
# PrismML's packs ship no VAE; they decode with BFL's small decoder.
DEFAULT_VAE_REPO = "black-forest-labs/FLUX.2-small-decoder"
# What a pipeline reads; repos also hold root-level single-file checkpoints we never need.
PIPELINE_FILES = ["model_index.json"] + [
    f"{d}/*" for d in (*TRANSFORMER_SUBDIRS, *ENCODER_SUBDIRS, "tokenizer", "vae")]
VAE_FILES = ["*.json", "*.safetensors", "vae/*"]


def has_part(root: Path, part: str) -> bool:
    subdirs = {
        "transformer": TRANSFORMER_SUBDIRS,
        "text encoder": ENCODER_SUBDIRS,
        "tokenizer": ("tokenizer", *ENCODER_SUBDIRS),
    }[part]
    return any((root / s).is_dir() for s in subdirs)


def resolve_model(name: str | os.PathLike, *, revision=None, cache_dir=None, files=tuple(PIPELINE_FILES),
                  what: str = "the model") -> Path:
    """A local directory, a known model name, or a Hub repo id -> a local directory.

    Only the files a pipeline needs are fetched; HF_HUB_OFFLINE and the HF cache are
    honoured by huggingface_hub itself.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    name = str(name)
    repo_id = MODELS.get(name, name)
    if path.exists() or (repo_id.count("/") != 1 or name.startswith((".", "/", "~"))):
        raise BonsaiError(
            f"{name!r} is neither a model directory nor a known model name. Known names: "
            f"{', '.join(sorted(MODELS))}; or pass a Hugging Face repo id like 'org/name', or a local directory."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(files))
    except LocalEntryNotFoundError:
        raise WeightsError(
            f"{what} ({repo_id}) is not in the Hugging Face cache and downloads are off (HF_HUB_OFFLINE) or the "
            f"Hub cannot be reached. Download it once while online (huggingface-cli download {repo_id}) or pass "
            "a local directory."
        ) from None
    except HfHubHTTPError as e:
        raise WeightsError(f"could not fetch {what} ({repo_id}) from the Hugging Face Hub: {e}") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"could not fetch {what} ({repo_id}): {e}") from None
    return Path(local)
