"""Reading transformer checkpoints: diffusers directories and BFL single files.

Weights are memory-mapped lazily by `mx.load` and materialised block by block straight
into the model's parameters, so a checkpoint is never held twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import TransformerConfig, preset
from .errors import BonsaiError, ConfigError, UnsafeFileError, WeightsError
from .packed_checkpoint import (QUANT_CONFIG, check_backend, pack_model_from_checkpoint, packed_params,
                                quantize_model, read_quant_config)
from .safe_files import PICKLE_SUFFIXES, ModelFolder, files_named, in_file, load_shards, shard_files
from .layouts import (DEMO_TERNARY_TRANSFORMER, ENCODER_SUBDIRS, MODEL_DEFAULTS, MODEL_INDEX, TOKENIZER_SUBDIRS,
                      TRANSFORMER_SUBDIRS, VAE_SUBDIRS)
from .transformer import Flux2Transformer
from .weight_names import BFL_REARRANGED, bfl_to_diffusers, is_bfl_checkpoint

_MAX_LISTED = 12
# Where a pack (PrismML's MLX layout) or a diffusers pipeline keeps its transformer.


def _listing(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


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
    except (ValueError, IndexError):  # a tensor of the wrong rank
        raise WeightsError("this does not look like a FLUX.2 checkpoint: its embedding and block weights do not "
                           "have the ranks of FLUX.2's") from None
    if head_dim != 128:
        raise ConfigError(
            f"this BFL checkpoint has {head_dim}-dim heads; its RoPE axes cannot be inferred. "
            "Pass config=TransformerConfig(...) (or a preset name) to load_transformer."
        )
    if D < head_dim or hidden < 1:
        raise WeightsError(f"this does not look like a FLUX.2 checkpoint: width {D}, MLP width {hidden}")
    ratio = hidden / D
    if int(D * ratio) != hidden:  # keep diffusers' int(D * ratio) landing on `hidden`
        ratio = (hidden + 0.5) / D
    return TransformerConfig(
        in_channels=c_in, out_channels=out_channels, num_layers=num_layers, num_single_layers=num_single,
        attention_head_dim=head_dim, num_attention_heads=D // head_dim, joint_attention_dim=joint,
        timestep_guidance_channels=t_channels, mlp_ratio=ratio,
        guidance_embeds="guidance_in.in_layer.weight" in weights,
    )


def check_blocks(cfg: TransformerConfig, weights: dict[str, mx.array], source) -> None:
    """The config's block counts against the blocks the checkpoint holds, before a model is
    built: a config asking for more (or fewer) blocks than the files have is refused here."""
    for prefix, field in (("transformer_blocks.", "num_layers"), ("single_transformer_blocks.", "num_single_layers")):
        found = {k[len(prefix):].split(".", 1)[0] for k in weights if k.startswith(prefix)}
        want = getattr(cfg, field)
        if found != {str(i) for i in range(want)}:
            shown = sorted(found, key=lambda i: (len(i), i))
            raise ConfigError(
                f"{source}: the config says {field}={want}, but the checkpoint holds {prefix}* blocks "
                f"{_listing(shown) if shown else '(none)'}; check that config.json belongs to these weights")


def check_size(model: nn.Module, weights: dict[str, mx.array], source) -> None:
    """Refuse a config whose model has more parameters than the files could encode at one
    bit each (binary packs are the smallest: 1.125 bits), before anything is evaluated."""
    params = sum(p.size for _, p in tree_flatten(model.parameters()))
    stored = sum(w.nbytes for w in weights.values())
    if params > 8 * stored:
        raise ConfigError(
            f"{source}: the config describes a model of {params:,} parameters, but the files hold only "
            f"{stored:,} bytes of tensors; check that config.json belongs to these weights")


def check_weights(model: nn.Module, weights: dict[str, mx.array], packed: set[str] = frozenset(),
                  source="the checkpoint") -> None:
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
            f"{source} does not fit the model config:\n  - " + "\n  - ".join(problems)
            + "\nCheck that config.json belongs to these weights (or pass the right config)."
        )
    not_float = sorted(k for k, w in weights.items()
                       if not mx.issubdtype(w.dtype, mx.floating) and k.rpartition(".")[0] not in packed)
    if not_float:
        raise WeightsError(
            f"{source}: weights that are not floating point in a dense checkpoint: {_listing(not_float)}. "
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


def transformer_folder(root: ModelFolder) -> ModelFolder:
    """The transformer folder of a pack or pipeline root (or the root itself, when it is one)."""
    if root.exists("config.json"):
        return root
    for sub in TRANSFORMER_SUBDIRS:
        if os.path.lexists(root.path / sub / "config.json"):
            return root.subfolder(sub)
    return root


def _read_folder(folder: ModelFolder, cfg):
    qc = read_quant_config(folder)
    if cfg is None:
        if not folder.exists("config.json"):
            raise WeightsError(f"{folder.path} has no config.json: a diffusers transformer directory needs one")
        cfg = TransformerConfig.from_json(folder.file("config.json", "transformer config"))
    files = shard_files(folder, what="transformer weights")
    return cfg, qc, load_shards(files), files_named(files)


def _read_file(path: Path, cfg):
    """A single-file checkpoint: BFL names (config inferred) or diffusers names (config.json
    beside it); the folder holding it is the model directory."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFileError(f"{path} is a pickled checkpoint; bonsai_mlx never unpickles weights (loading a "
                              "pickle can run code). Convert it to safetensors first.")
    if path.suffix.lower() != ".safetensors":
        raise WeightsError(f"{path} is not a .safetensors file; pass a .safetensors checkpoint or a directory")
    folder = ModelFolder(path.parent)
    weights, rearranged = load_shards([folder.file(path.name, "safetensors checkpoint")]), frozenset()
    if is_bfl_checkpoint(weights):
        with in_file(path):
            cfg = cfg or infer_bfl_config(weights)
            weights = bfl_to_diffusers(weights)
        rearranged = frozenset(BFL_REARRANGED & weights.keys())
    elif cfg is None:
        if not folder.exists("config.json"):
            raise ConfigError(f"{path} has diffusers weight names but no config.json beside it; pass config=")
        cfg = TransformerConfig.from_json(folder.file("config.json", "transformer config"))
    return cfg, weights, rearranged


def _read(path: Path, cfg):
    """(config, quantization config or None, lazy weights, the source to name in errors, the
    names of the weights made anew from the file's tensors rather than read as they are)."""
    if path.is_dir():
        return (*_read_folder(transformer_folder(ModelFolder(path)), cfg), frozenset())
    cfg, weights, rearranged = _read_file(path, cfg)
    return cfg, None, weights, path, rearranged


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
    Every file is read through safe_files; the config is checked against the tensors'
    shapes before a layer is built.
    """
    path = Path(path).expanduser()
    cfg = _resolve_config(config)
    check_backend(backend)
    if dtype not in (mx.float16, mx.bfloat16, mx.float32):
        raise BonsaiError(f"dtype must be mx.float16, mx.bfloat16 or mx.float32, got {dtype}")
    if not os.path.lexists(path):
        raise WeightsError(
            f"{path} does not exist. Pass a diffusers transformer directory (config.json + *.safetensors) "
            "or a FLUX.2 .safetensors checkpoint."
        )
    cfg, qc, weights, source, _ = _read(path, cfg)
    check_blocks(cfg, weights, source)
    model = Flux2Transformer(cfg)  # parameters are lazy and never evaluated before replacement
    check_size(model, weights, source)
    packed: set[str] = set()
    with in_file(source):
        if qc is not None:
            if quantize:
                raise ConfigError(f"{source} is already packed ({QUANT_CONFIG}); drop quantize={quantize!r}")
            packed = pack_model_from_checkpoint(model, weights, qc, backend)
        elif quantize:
            packed = quantize_model(model, weights, quantize, backend)
    weights.update(packed_params(model, packed))
    check_weights(model, weights, packed, source)
    materialize(model, weights, dtype, packed)
    model.eval()
    return model


@dataclass(frozen=True)
class TransformerSource:
    """Where a pipeline's transformer is read from, and how, to read it again: whole (after a
    plan released it) or only some of its 16-bit layers (after a plan left them on disk)."""
    path: Path
    dtype: mx.Dtype = mx.bfloat16
    quantize: str | None = None
    backend: str = "auto"
    config: TransformerConfig | str | dict | None = None  # as load_transformer's

    def __call__(self) -> Flux2Transformer:
        return load_transformer(self.path, self.dtype, self.config, self.quantize, self.backend)

    def lazy_weights(self, modules: tuple[str, ...]) -> dict[str, mx.array]:
        """The weights of the layers under `modules` (module paths), cast to the dtype as
        `load_transformer` casts them and not read: mx.load maps the file lazily, so each
        takes memory only once evaluated. Never packed: a pack packs block linears only."""
        return {k: w.astype(self.dtype) for k, w in self._file_weights(modules)[0].items()}

    def cast_read_bytes(self, modules: tuple[str, ...]) -> int:
        """What reading the weights under `modules` again one at a time holds beside their
        results, for the two weights that hold the most (the last one's may live until the
        device is done with it): the checkpoint's tensor where it holds a weight in another
        dtype than the pipeline's, and once more where the weight is made anew from it (a BFL
        checkpoint's output norm, its halves swapped). 0 where every weight is read as it is."""
        weights, rearranged = self._file_weights(modules)
        held = sorted(w.nbytes * ((w.dtype != self.dtype) + (k in rearranged)) for k, w in weights.items())
        return sum(held[-2:])

    def _file_weights(self, modules: tuple[str, ...]) -> tuple[dict[str, mx.array], frozenset]:
        """The checkpoint's weights under `modules`, lazy, as the file holds them (renamed), and
        the names of those made anew from the file's tensors."""
        path = Path(self.path).expanduser()
        if not os.path.lexists(path):
            raise WeightsError(f"{path} no longer exists: the transformer's modulation layers cannot be read again. "
                               "Load the pipeline again")
        _, _, weights, source, rearranged = _read(path, _resolve_config(self.config))
        prefixes = tuple(m + "." for m in modules)
        out = {k: w for k, w in weights.items() if k.startswith(prefixes)}
        if not out:
            raise WeightsError(f"{source} holds no weights of {', '.join(modules)}")
        return out, rearranged


# ---------------------------------------------------------------------------- Hugging Face Hub

# Known names for `resolve_model`; anything with a "/" is taken as a Hugging Face repo id.
MODELS = {
    "bonsai-binary": "prism-ml/bonsai-image-binary-4B-mlx-1bit",
    "bonsai-ternary": "prism-ml/bonsai-image-ternary-4B-mlx-2bit",
}
# Models inside the package, used offline: the binary demo trained on the coloured-shapes
# task (docs/quality.md), a klein-shaped pipeline small enough to ship.
DEMO_DIR = Path(__file__).resolve().parent / "demo"
# name -> (the model's root, its transformer folder where that is not the root's own)
LOCAL_MODELS = {"demo": (DEMO_DIR, None), "demo-ternary": (DEMO_DIR, DEMO_DIR / DEMO_TERNARY_TRANSFORMER)}


def transformer_source(name, root: Path) -> Path:
    """Where the transformer of `name` (resolved to `root`) is: the root, except for local
    models that share one root between several transformers."""
    local = LOCAL_MODELS.get(str(name))
    return local[1] if local and local[1] is not None else root
# PrismML's packs ship no VAE; they decode with BFL's small decoder.
DEFAULT_VAE_REPO = "black-forest-labs/FLUX.2-small-decoder"
# What a pipeline reads; repos also hold root-level single-file checkpoints we never need.
PIPELINE_FILES = [MODEL_INDEX, MODEL_DEFAULTS] + [
    f"{d}/*" for d in (*TRANSFORMER_SUBDIRS, *ENCODER_SUBDIRS, *TOKENIZER_SUBDIRS, *VAE_SUBDIRS)]
VAE_FILES = ["*.json", "*.safetensors", "vae/*"]


def has_part(root: Path, part: str) -> bool:
    subdirs = {
        "transformer": TRANSFORMER_SUBDIRS,
        "text encoder": ENCODER_SUBDIRS,
        "tokenizer": (*TOKENIZER_SUBDIRS, *ENCODER_SUBDIRS),
    }[part]
    return any((root / s).is_dir() for s in subdirs)


# Downloads left running by a Ctrl-C: their pool's threads outlive the call, and the
# interpreter waits for them at exit (see cli.main).
ABANDONED_DOWNLOADS: list[str] = []


def _interruptible(fn):
    """fn() run in a daemon thread that the caller waits for: Ctrl-C reaches the caller at once.
    huggingface_hub downloads in a thread pool whose shutdown waits for every worker, retries
    included, so a KeyboardInterrupt raised inside it is held until the downloads end. The
    files stay consistent either way: the Hub writes `.incomplete` files and renames them
    when whole."""
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            out["error"] = e

    worker = threading.Thread(target=run, name="bonsai-download", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        ABANDONED_DOWNLOADS.append(worker.name)
        raise
    if "error" in out:
        raise out["error"]
    return out["value"]


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
    if name in LOCAL_MODELS:
        missing = [p for p in LOCAL_MODELS[name] if p is not None and not p.is_dir()]
        if missing:
            raise WeightsError(f"the {name!r} model is missing from this installation ({missing[0]}); "
                               "reinstall bonsai-mlx")
        return LOCAL_MODELS[name][0]
    repo_id = MODELS.get(name, name)
    if path.exists() or (repo_id.count("/") != 1 or name.startswith((".", "/", "~"))):
        raise BonsaiError(
            f"{name!r} is neither a model directory nor a known model name. Known names: "
            f"{', '.join(sorted([*MODELS, *LOCAL_MODELS]))}; or pass a Hugging Face repo id like 'org/name', or a local directory."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = _interruptible(lambda: snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(files),
            ignore_patterns=[f"*{s}" for s in PICKLE_SUFFIXES]))  # never read: not fetched
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
