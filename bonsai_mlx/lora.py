"""LoRA adapters on the transformer, packed layers included, without a dense copy of any weight.

A layer with LoRAs computes base(x) + sum_i s_i * (x @ A_i.T) @ B_i.T, where `base` is the
layer exactly as loaded (packed codes and scales, or a dense matrix) and is never changed:
unloading puts it back and the model is bit for bit what it was; a scale is a number on
the adapter, so changing one needs no reload. The fused projection of the single blocks
runs in row parts (transformer.linear_rows); `LoraLinear.rows` gives the same part of the
sum, B's rows sliced. Dense layers take the same adapters instead of a merged W + s B A:
that is what PEFT computes for diffusers unless asked to fuse, and it keeps no second copy.

Key styles read (those diffusers' Flux2LoraLoaderMixin reads for FLUX.2, mapped the same way):
  diffusers    transformer.<module>.lora_A.weight / .lora_B.weight; scale lora_alpha / r
               from the file's `lora_adapter_metadata` (PEFT's LoraConfig), 1 without it
  PEFT         base_model.model.<module>..., read as the BFL style
  BFL          diffusion_model.<BFL or diffusers module>.lora_A / lora_B (or lora_down /
  (ai-toolkit) lora_up); a double block's fused qkv is split into q, k, v rows
  kohya        lora_unet_<BFL module, '_' for '.'>.lora_down / lora_up / alpha; scale alpha / rank
Every key must be understood and every target must be a linear of the model with matching
shapes, or the LoRA is refused as a whole, naming the key or layer, before anything changes.
DoRA, LoKr and LoRA biases are refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from .config import TransformerConfig
from .errors import BonsaiError, WeightsError
from .packed_linear import PackedLinear
from .transformer import Flux2Transformer
from .weight_names import bfl_module_to_diffusers

_A_SUFFIXES = (".lora_A.weight", ".lora_down.weight")
_B_SUFFIXES = (".lora_B.weight", ".lora_up.weight")
# kohya module names (after `lora_unet_`) that diffusers converts, as BFL paths.
_KOHYA_BLOCK = {"img_attn_qkv": "img_attn.qkv", "txt_attn_qkv": "txt_attn.qkv", "img_attn_proj": "img_attn.proj",
                "txt_attn_proj": "txt_attn.proj", "img_mlp_0": "img_mlp.0", "img_mlp_2": "img_mlp.2",
                "txt_mlp_0": "txt_mlp.0", "txt_mlp_2": "txt_mlp.2", "linear1": "linear1", "linear2": "linear2"}
_KOHYA_TOP = {"img_in": "img_in", "txt_in": "txt_in", "time_in_in_layer": "time_in.in_layer",
              "time_in_out_layer": "time_in.out_layer", "final_layer_linear": "final_layer.linear"}
# diffusers block names that the BFL style may also use (`sformer_blocks` is an alias some exports write).
_EXPANDED = {"transformer_blocks.": "transformer_blocks.", "single_transformer_blocks.": "single_transformer_blocks.",
             "sformer_blocks.": "transformer_blocks."}


class LoraUpdate(NamedTuple):
    """One layer's low-rank update: A [r, in], B [out, r], and the file's own scale (alpha / rank)."""
    a: mx.array
    b: mx.array
    scale: float


# ---------------------------------------------------------------------------- reading

def read_lora(path) -> dict[str, LoraUpdate]:
    """A LoRA file (safetensors; or a folder holding one) as diffusers module name -> update."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        named = [f for f in files if f.name == "pytorch_lora_weights.safetensors"]
        if len(named) != 1 and len(files) != 1:
            raise WeightsError(f"{path} is a folder without one LoRA .safetensors file in it (found {len(files)})")
        path = (named or files)[0]
    if not path.is_file():
        raise WeightsError(f"LoRA file {path} does not exist")
    try:
        tensors, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # MLX's messages are terse; say what the file should be
        raise WeightsError(f"could not read {path} as a safetensors LoRA ({e})") from None
    return convert_lora(tensors, metadata, str(path))


def convert_lora(tensors: dict, metadata: dict | None = None, source: str = "the LoRA") -> dict[str, LoraUpdate]:
    """Tensors in any supported key style -> diffusers module name -> LoraUpdate."""
    if not tensors:
        raise WeightsError(f"{source} holds no tensors")
    for marks, what in ((("dora_scale", "lora_magnitude_vector"), "DoRA"), ((".lokr_", "lycoris_"), "LoKr"),
                        ((".lora_B.bias", ".lora_up.bias"), "LoRA with biases")):
        hit = next((k for k in tensors if any(m in k for m in marks)), None)
        if hit:
            raise WeightsError(f"{source} is a {what} adapter (key {hit}); only plain LoRA is supported")
    out: dict[str, LoraUpdate] = {}
    for module, parts in _group(tensors, source).items():
        targets, kohya = _targets(module, source)
        a, b = parts.get("A"), parts.get("B")
        if a is None or b is None:
            raise WeightsError(f"{source}: {module} has no {'down/A' if a is None else 'up/B'} matrix")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise WeightsError(f"{source}: {module} has A {list(a.shape)} and B {list(b.shape)}, which are not "
                               "[rank, in] and [out, rank]")
        if "alpha" in parts and not kohya:
            raise WeightsError(f"{source}: unrecognised key {module}.alpha (alpha keys belong to the kohya style)")
        rank = a.shape[0]
        scale = float(parts["alpha"].reshape(-1)[0].item()) / rank if "alpha" in parts else 1.0
        for target, (ta, tb) in zip(targets, _split(a, b, len(targets), module, source)):
            if target in out:
                raise WeightsError(f"{source}: layer {target} is given twice (as {module} and once more)")
            out[target] = LoraUpdate(ta, tb, scale)
    if metadata and metadata.get("lora_adapter_metadata"):
        out = _apply_config(out, metadata["lora_adapter_metadata"], source)
    return out


def _group(tensors: dict, source: str) -> dict[str, dict]:
    """key -> (module, part): part A (down), B (up) or alpha; anything else is refused."""
    modules: dict[str, dict] = {}
    for key, value in tensors.items():
        for suffixes, part in ((_A_SUFFIXES, "A"), (_B_SUFFIXES, "B"), ((".alpha",), "alpha")):
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix:
                modules.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            raise WeightsError(f"{source}: unrecognised key {key} (expected <module>.lora_A.weight / lora_B.weight, "
                               "lora_down.weight / lora_up.weight, or kohya's .alpha)")
    return modules


def _targets(module: str, source: str) -> tuple[tuple[str, ...], bool]:
    """The diffusers module(s) a file's module path stands for, and whether it is kohya's."""
    names = None
    if module.startswith("transformer."):
        names = (module.removeprefix("transformer."),)
    elif module.startswith(("diffusion_model.", "base_model.model.")):
        inner = module.removeprefix("diffusion_model.").removeprefix("base_model.model.")
        alias = next((p for p in _EXPANDED if inner.startswith(p)), None)
        names = (_EXPANDED[alias] + inner[len(alias):],) if alias else bfl_module_to_diffusers(inner)
    elif module.startswith("lora_unet_"):
        inner = module.removeprefix("lora_unet_")
        m = re.fullmatch(r"(double|single)_blocks_(\d+)_(.+)", inner)
        bfl = f"{m[1]}_blocks.{m[2]}.{_KOHYA_BLOCK[m[3]]}" if m and m[3] in _KOHYA_BLOCK else _KOHYA_TOP.get(inner)
        names = bfl_module_to_diffusers(bfl) if bfl else None
        if names:
            return names, True
    if not names:
        raise WeightsError(f"{source}: {module} names no layer of the FLUX.2 transformer in any supported key style "
                           "(diffusers transformer.*, PEFT base_model.model.*, BFL diffusion_model.*, kohya lora_unet_*)")
    return names, False


def _split(a: mx.array, b: mx.array, n: int, module: str, source: str) -> list[tuple[mx.array, mx.array]]:
    """A fused layer's update as n row parts of equal height. A is shared, except when B is
    block-diagonal over n equal rank groups (kohya's sparse qkv), where each part keeps its
    own group: the same product with a third of the rank."""
    if n == 1:
        return [(a, b)]
    if b.shape[0] % n:
        raise WeightsError(f"{source}: {module} is a fused layer of {n} parts but B has {b.shape[0]} rows")
    rows, rank = b.shape[0] // n, a.shape[0]
    if rank % n == 0:
        g = rank // n
        blocks = [[b[i * rows:(i + 1) * rows, j * g:(j + 1) * g] for j in range(n)] for i in range(n)]
        if all(not bool(mx.any(blocks[i][j] != 0)) for i in range(n) for j in range(n) if i != j):
            return [(a[i * g:(i + 1) * g], blocks[i][i]) for i in range(n)]
    return [(a, b[i * rows:(i + 1) * rows]) for i in range(n)]


def _apply_config(updates: dict[str, LoraUpdate], text: str, source: str) -> dict[str, LoraUpdate]:
    """Scales from diffusers' saved PEFT LoraConfig: lora_alpha / r (sqrt(r) with rsLoRA),
    per-module overrides by PEFT's pattern rule (a pattern matches a name's dotted suffix)."""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{source}: its lora_adapter_metadata is not valid JSON ({e})") from None
    cfg = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
    if not cfg:
        return updates
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)  # LoraConfig's defaults

    def pick(patterns: dict, name: str, default):
        key = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", name)), None)
        return patterns[key] if key is not None else default

    out = {}
    for name, u in updates.items():
        r, alpha = pick(cfg.get("rank_pattern") or {}, name, r0), pick(cfg.get("alpha_pattern") or {}, name, alpha0)
        if r != u.a.shape[0]:
            raise WeightsError(f"{source}: layer {name} has rank {u.a.shape[0]} but the file's config says {r}")
        out[name] = u._replace(scale=u.scale * alpha / (math.sqrt(r) if cfg.get("use_rslora") else r))
    return out


# ---------------------------------------------------------------------------- checking

@lru_cache(maxsize=4)
def linear_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear of a transformer with this config, by module name. The
    model is built lazily and never evaluated: its weights take no memory."""
    return {name: tuple(m.weight.shape) for name, m in Flux2Transformer(cfg).named_modules()
            if isinstance(m, nn.Linear)}


def check_lora(updates: dict[str, LoraUpdate], cfg: TransformerConfig, source: str) -> None:
    """Refuse, naming the layer, a LoRA that targets a layer the model lacks or whose
    shapes differ from the layer's."""
    shapes = linear_shapes(cfg)
    for name, u in updates.items():
        if name not in shapes:
            raise WeightsError(f"{source}: layer {name} is not a linear layer of this transformer "
                               f"({cfg.num_layers} double and {cfg.num_single_layers} single blocks)")
        out_f, in_f = shapes[name]
        if u.a.shape[1] != in_f or u.b.shape[0] != out_f:
            raise WeightsError(f"{source}: layer {name} is [{out_f}, {in_f}] but the LoRA's A is {list(u.a.shape)} "
                               f"and B {list(u.b.shape)} (a LoRA made for another model?)")


# ---------------------------------------------------------------------------- applying

class LoraLinear(nn.Module):
    """`base(x) + sum s * (x @ A.T) @ B.T` over its updates (A, B, s). The updates sit in a
    private tuple: they are not parameters of the model, whose weights stay the loaded ones."""

    def __init__(self, base, updates):
        super().__init__()
        self.base = base
        self._updates = tuple(updates)

    @property
    def out_features(self) -> int:
        return self.base.out_features if isinstance(self.base, PackedLinear) else self.base.weight.shape[0]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        for a, b, s in self._updates:
            y = y + (((x.astype(a.dtype) @ a.T) @ b.T) * s).astype(y.dtype)
        return y

    def rows(self, r0: int, r1: int) -> "LoraLinear":
        """The layer over output rows [r0, r1): the base's rows and B's rows, nothing copied."""
        base = self.base
        if isinstance(base, PackedLinear):
            part = base.rows(r0, r1)
        else:
            w, bias = base.weight[r0:r1], (base.bias[r0:r1] if "bias" in base else None)
            part = (lambda x: x @ w.T) if bias is None else (lambda x: x @ w.T + bias)
        return LoraLinear(part, [(a, b[r0:r1], s) for a, b, s in self._updates])


def _locate(model, path: str):
    parent, parts = model, path.split(".")
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else getattr(parent, p)
    return parent, parts[-1]


def _swap(model, path: str, module) -> None:
    parent, last = _locate(model, path)
    if isinstance(parent, list):
        parent[int(last)] = module
    else:
        setattr(parent, last, module)


def detach(model) -> None:
    """Put every adapted layer's base back."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]:
        _swap(model, name, m.base)


@dataclass
class Lora:
    name: str
    source: str
    scale: float
    updates: dict[str, LoraUpdate]

    @property
    def nbytes(self) -> int:
        return sum(u.a.nbytes + u.b.nbytes for u in self.updates.values())


class LoraSet:
    """A pipeline's LoRAs in load order, and their adapters on a transformer."""

    def __init__(self):
        self._loras: dict[str, Lora] = {}

    def __iter__(self):
        # A copy taken in one step (one C call under the GIL): a plan reads the set (its
        # footprint) or a reload applies it while another thread may load or unload a LoRA, and
        # the reader sees the set before or after.
        return iter(list(self._loras.values()))

    def __len__(self) -> int:
        return len(self._loras)

    @property
    def nbytes(self) -> int:
        return sum(lora.nbytes for lora in self)

    def load(self, path, scale: float, cfg: TransformerConfig, dtype, name: str | None = None) -> Lora:
        """Read and check a LoRA file (nothing is added if that fails); cast to `dtype`."""
        scale = _check_scale(scale)
        name = name or Path(path).stem
        if name in self._loras:
            raise BonsaiError(f"a LoRA named {name!r} is already loaded; unload it or give another name")
        updates = read_lora(path)
        check_lora(updates, cfg, str(path))
        updates = {k: LoraUpdate(u.a.astype(dtype), u.b.astype(dtype), u.scale) for k, u in updates.items()}
        mx.eval([(u.a, u.b) for u in updates.values()])
        lora = Lora(name, str(path), scale, updates)
        self._loras[name] = lora
        return lora

    def get(self, name: str) -> Lora:
        found = self._loras.get(name)  # one look-up: the set may change meanwhile
        if found is None:
            loaded = ", ".join(lora.name for lora in self) or "none"
            raise BonsaiError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
        return found

    def set_scale(self, name: str, scale: float) -> None:
        self.get(name).scale = _check_scale(scale)

    def remove(self, name: str | None = None) -> None:
        if name is None:
            self._loras.clear()
        else:
            del self._loras[self.get(name).name]

    def apply(self, model) -> None:
        """Make `model`'s adapters exactly this set at its current scales (a LoRA at scale 0
        costs nothing); the base layers are never touched."""
        if model is None:
            return
        detach(model)
        targets: dict[str, list] = {}
        for lora in self:
            for layer, u in lora.updates.items():
                if lora.scale != 0:
                    targets.setdefault(layer, []).append((u.a, u.b, lora.scale * u.scale))
        for layer, updates in targets.items():
            parent, last = _locate(model, layer)
            base = parent[int(last)] if isinstance(parent, list) else getattr(parent, last)
            _swap(model, layer, LoraLinear(base, updates))


def _check_scale(scale) -> float:
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise BonsaiError(f"a LoRA scale must be a number, got {scale!r}") from None
    if not math.isfinite(s):
        raise BonsaiError(f"a LoRA scale must be finite, got {scale!r}")
    return s
