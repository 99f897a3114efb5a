"""Transformer configs: klein presets and diffusers `config.json` files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class TransformerConfig:
    """The fields of diffusers' `Flux2Transformer2DModel` config that shape the model."""

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 5  # double-stream blocks
    num_single_layers: int = 20
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 7680  # text feature dim (3 Qwen3 layers concatenated)
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    eps: float = 1e-6
    guidance_embeds: bool = False

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        self.validate()

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        # diffusers truncates with int(); keep the same rounding.
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

    def validate(self) -> None:
        problems = []
        for name in ("in_channels", "num_attention_heads", "attention_head_dim",
                     "joint_attention_dim", "timestep_guidance_channels", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_layers", "num_single_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                problems.append(f"{name} must be a non-negative integer, got {value!r}")
        if self.out_channels is not None and (not isinstance(self.out_channels, int) or self.out_channels <= 0):
            problems.append(f"out_channels must be a positive integer or null, got {self.out_channels!r}")
        if not self.mlp_ratio > 0:
            problems.append(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if isinstance(self.attention_head_dim, int) and self.attention_head_dim % 2:
            problems.append(f"attention_head_dim must be even for RoPE, got {self.attention_head_dim}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            problems.append(
                f"axes_dims_rope {list(self.axes_dims_rope)} must add up to attention_head_dim "
                f"({self.attention_head_dim}); they add up to {sum(self.axes_dims_rope)}"
            )
        if any(a <= 0 or a % 2 for a in self.axes_dims_rope):
            problems.append(f"every entry of axes_dims_rope must be a positive even number, got {list(self.axes_dims_rope)}")
        if self.timestep_guidance_channels % 2:
            problems.append(f"timestep_guidance_channels must be even, got {self.timestep_guidance_channels}")
        if self.patch_size != 1:
            problems.append(
                f"patch_size {self.patch_size} is not supported: FLUX.2 patchifies in the pipeline and "
                "its transformer uses patch_size 1"
            )
        if problems:
            raise ConfigError("Unsupported transformer config:\n  - " + "\n  - ".join(problems))

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        # diffusers' bookkeeping keys (_class_name, _diffusers_version, ...) start with "_".
        unknown = sorted(k for k in d if k not in known and not k.startswith("_"))
        if unknown:
            raise ConfigError(
                f"config has keys bonsai_mlx does not understand: {unknown}. "
                "It is probably not a Flux2Transformer2DModel config."
            )
        cls_name = d.get("_class_name")
        if cls_name is not None and cls_name != "Flux2Transformer2DModel":
            raise ConfigError(f"config is for {cls_name!r}, expected 'Flux2Transformer2DModel'")
        try:
            return cls(**kwargs)
        except TypeError as e:  # e.g. a list where a number belongs
            raise ConfigError(f"config values have the wrong types: {e}") from e

    @classmethod
    def from_json(cls, path: str | Path) -> "TransformerConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: a diffusers transformer directory needs a config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-download or fix the file") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        d["_class_name"] = "Flux2Transformer2DModel"
        return d


KLEIN_4B = TransformerConfig()
KLEIN_9B = TransformerConfig(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288)

PRESETS = {"klein-4b": KLEIN_4B, "klein-9b": KLEIN_9B}


def preset(name: str) -> TransformerConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
