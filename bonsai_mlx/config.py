"""Transformer configs: klein presets and diffusers `config.json` files."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import ConfigError
from .safe_files import read_json
from .validate import brief, is_int, is_real

# Bounds no FLUX.2 transformer comes near (klein 9B: 4096 wide, 8 + 24 blocks); a config
# beyond them is refused before any layer is built.
MAX_WIDTH = 1 << 16
MAX_BLOCKS = 1024
MAX_MLP_RATIO = 64


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
        axes = self.axes_dims_rope
        if not isinstance(axes, (list, tuple)) or not 1 <= len(axes) <= 8 or not all(is_int(a) for a in axes):
            raise ConfigError(f"Unsupported transformer config: axes_dims_rope must be a list of 1 to 8 integers, "
                              f"got {brief(axes)}")
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in axes))
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
            if not is_int(value) or not 0 < value <= MAX_WIDTH:
                problems.append(f"{name} must be a positive integer up to {MAX_WIDTH}, got {brief(value)}")
        for name in ("num_layers", "num_single_layers"):
            value = getattr(self, name)
            if not is_int(value) or not 0 <= value <= MAX_BLOCKS:
                problems.append(f"{name} must be an integer in 0..{MAX_BLOCKS}, got {brief(value)}")
        if self.out_channels is not None and (not is_int(self.out_channels)
                                              or not 0 < self.out_channels <= MAX_WIDTH):
            problems.append(f"out_channels must be a positive integer up to {MAX_WIDTH} or null, "
                            f"got {brief(self.out_channels)}")
        if not is_real(self.mlp_ratio) or not 0 < self.mlp_ratio <= MAX_MLP_RATIO:
            problems.append(f"mlp_ratio must be a number in (0, {MAX_MLP_RATIO}], got {brief(self.mlp_ratio)}")
        if not is_real(self.rope_theta) or not self.rope_theta > 0:
            problems.append(f"rope_theta must be a positive number, got {brief(self.rope_theta)}")
        if not is_real(self.eps) or not 0 < self.eps < 1:
            problems.append(f"eps must be a number in (0, 1), got {brief(self.eps)}")
        if not isinstance(self.guidance_embeds, bool):
            problems.append(f"guidance_embeds must be true or false, got {brief(self.guidance_embeds)}")
        if problems:  # the checks below need the numbers above to be numbers
            raise ConfigError("Unsupported transformer config:\n  - " + "\n  - ".join(problems))
        if self.inner_dim > MAX_WIDTH or self.mlp_hidden_dim > 4 * MAX_WIDTH:
            problems.append(f"num_attention_heads x attention_head_dim = {self.inner_dim} (MLP {self.mlp_hidden_dim}) "
                            f"is wider than any FLUX.2 model (at most {MAX_WIDTH})")
        if self.mlp_hidden_dim < 1:
            problems.append(f"mlp_ratio {self.mlp_ratio} leaves an MLP of {self.mlp_hidden_dim} features")
        if self.attention_head_dim % 2:
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
            raise ConfigError(f"config values have the wrong types: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "TransformerConfig":
        """The config in `path`, read through safe_files (bounded, a JSON object); errors
        name the file."""
        path = Path(path)
        if not os.path.lexists(path):
            raise ConfigError(f"{path} does not exist: a diffusers transformer directory needs a config.json")
        d = read_json(path, "transformer config")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

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
