"""FLUX.2 VAE (diffusers `AutoencoderKLFlux2`) in MLX, channels-last (NHWC).

Layout of everything here: images [B, H, W, 3], VAE latents [B, H/8, W/8, C],
patchified latents [B, H/16, W/16, 4C] and tokens [B, (H/16)*(W/16), 4C] (row-major).
Module and parameter names mirror diffusers so checkpoint keys map one to one; the
only conversion is the conv weight layout (see `_to_mlx`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .attention import sdpa
from . import kernels
from .execution import ONE_GRAPH, Execution, Pace

WHOLE = ONE_GRAPH.pace()  # one graph: evaluates nothing by itself
from .errors import BonsaiError, ConfigError, WeightsError
from .safe_files import ModelFolder, files_named, in_file, load_shards, read_json, shard_files
from .validate import brief, is_int, is_real
from .vae_strips import decode_strips, encode_strips

# diffusers hard-codes these inside Encoder/Decoder; they are not config fields.
_NORM_EPS = 1e-6
# Attention scores are materialised per query chunk; cap one chunk at this many scores
# so the mid-block attention stays bounded for large latents (exact, just chunked).
_MAX_SCORES = 1 << 24
# Bounds far above any FLUX.2 VAE (4 blocks of at most 512 channels, 2 layers per block);
# a config beyond them is refused before any layer is built.
MAX_VAE_BLOCKS, MAX_VAE_CHANNELS, MAX_VAE_LAYERS = 8, 8192, 16


@dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' `AutoencoderKLFlux2` config that shape the model."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4

    def __post_init__(self):
        problems = []
        for name in ("block_out_channels", "decoder_block_out_channels"):
            chans = getattr(self, name)
            if chans is None and name == "decoder_block_out_channels":
                continue
            if (not isinstance(chans, (list, tuple)) or not 1 <= len(chans) <= MAX_VAE_BLOCKS
                    or not all(is_int(c) and 0 < c <= MAX_VAE_CHANNELS for c in chans)):
                problems.append(f"{name} must be a list of 1 to {MAX_VAE_BLOCKS} integers in 1..{MAX_VAE_CHANNELS}, "
                                f"got {brief(chans)}")
            else:
                object.__setattr__(self, name, tuple(chans))
        for name in ("in_channels", "out_channels", "latent_channels", "norm_num_groups"):
            v = getattr(self, name)
            if not is_int(v) or not 0 < v <= MAX_VAE_CHANNELS:
                problems.append(f"{name} must be an integer in 1..{MAX_VAE_CHANNELS}, got {brief(v)}")
        if not is_int(self.layers_per_block) or not 0 <= self.layers_per_block <= MAX_VAE_LAYERS:
            problems.append(f"layers_per_block must be an integer in 0..{MAX_VAE_LAYERS}, "
                            f"got {brief(self.layers_per_block)}")
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {brief(getattr(self, name))}")
        if not is_real(self.batch_norm_eps) or not self.batch_norm_eps > 0:
            problems.append(f"batch_norm_eps must be a number > 0, got {brief(self.batch_norm_eps)}")
        if not problems:  # divisibility needs the numbers above to be numbers
            for name, chans in (("block_out_channels", self.block_out_channels),
                                ("decoder_block_out_channels", self.decoder_channels)):
                if any(c % self.norm_num_groups for c in chans):
                    problems.append(f"every entry of {name} {list(chans)} must be divisible by "
                                    f"norm_num_groups={self.norm_num_groups}")
        if problems:
            raise ConfigError("Bad AutoencoderKLFlux2 config: " + "; ".join(problems))

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        # diffusers: `decoder_block_out_channels or block_out_channels`
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def patched_channels(self) -> int:
        return 4 * self.latent_channels

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """Read a diffusers vae config.json dict; refuse what this module cannot represent."""
        def bad(msg):
            raise ConfigError(f"Unsupported AutoencoderKLFlux2 config: {msg}")

        cls_name = d.get("_class_name", "AutoencoderKLFlux2")
        if cls_name != "AutoencoderKLFlux2":
            bad(f"_class_name is {brief(cls_name)}, expected 'AutoencoderKLFlux2'")
        for key in ("block_out_channels", "down_block_types", "up_block_types", "patch_size"):
            if key in d and not isinstance(d[key], list):
                bad(f"{key} must be a list, got {brief(d[key])}")
        dec = d.get("decoder_block_out_channels")
        if dec is not None and not isinstance(dec, list):
            bad(f"decoder_block_out_channels must be a list or null, got {brief(dec)}")
        n_enc = len(d.get("block_out_channels", cls.block_out_channels))
        n_dec = len(dec or d.get("block_out_channels", cls.block_out_channels))
        down = tuple(d.get("down_block_types", ("DownEncoderBlock2D",) * n_enc))
        up = tuple(d.get("up_block_types", ("UpDecoderBlock2D",) * n_dec))
        if any(t != "DownEncoderBlock2D" for t in down):
            bad(f"down_block_types {brief(down)}: only DownEncoderBlock2D is implemented")
        if any(t != "UpDecoderBlock2D" for t in up):
            bad(f"up_block_types {brief(up)}: only UpDecoderBlock2D is implemented")
        # diffusers zips block types with channels; a length mismatch builds a different net.
        if len(down) != n_enc:
            bad(f"{len(down)} down_block_types for {n_enc} block_out_channels")
        if len(up) != n_dec:
            bad(f"{len(up)} up_block_types for {n_dec} decoder block channels")
        if d.get("act_fn", "silu") not in ("silu", "swish"):
            bad(f"act_fn {brief(d['act_fn'])}: only silu is implemented")
        # Flux2 pipelines patchify 2x2 by hand whatever this says; anything else would not match.
        if tuple(d.get("patch_size", (2, 2))) != (2, 2):
            bad(f"patch_size {brief(d['patch_size'])}: the FLUX.2 latent packing is 2x2")
        # sample_size and batch_norm_momentum only matter for diffusers' own tiling and training.
        ignored = {"down_block_types", "up_block_types", "act_fn", "patch_size", "sample_size",
                   "batch_norm_momentum", "force_upcast"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known | ignored)
        if unknown:
            warnings.warn(f"vae config keys ignored (not AutoencoderKLFlux2 fields): {unknown}")
        return cls(**{k: d[k] for k in known if k in d})


# ----------------------------------------------------------------------------- layers

class GroupNorm(nn.Module):
    """GroupNorm over [B, H, W, C] with statistics in float32.

    `tile` (a `_TileNorms`) lets tiled decoding record or override the statistics;
    without it this is plain torch GroupNorm (biased variance, per sample).
    """

    def __init__(self, groups: int, channels: int):
        super().__init__()
        self.groups = groups
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))

    def __call__(self, x, tile=None, silu: bool = False, pace: Pace = WHOLE):
        """GroupNorm of x [B, H, W, C], followed by SiLU when `silu` (fused: one pass)."""
        stats = group_stats(x, self.groups, pace) if tile is None else tile.stats(x, self.groups, pace)
        return self.apply(x, stats, silu)

    def stats(self, x, pace: Pace = WHOLE):
        """This norm's group statistics (mean, biased variance [B, G], float32) over x."""
        return group_stats(x, self.groups, pace)

    def apply(self, x, stats, silu: bool = False):
        """x [B, H, W, C] normalised with given group statistics (mean, var [B, G]): strip
        decoding normalises a strip with the whole image's statistics."""
        B, H, W, C = x.shape
        fn = _normalize_silu if silu else _normalize
        return fn(x.reshape(B, H * W, C), *self.channel_stats(stats), self.weight, self.bias).reshape(B, H, W, C)

    def channel_stats(self, stats):
        """Group statistics (mean, var [B, G]) as the per-channel float32 mean and 1 / std
        [B, 1, C] that normalising reads (strips make them once per stage)."""
        mean, var = stats
        per = self.weight.shape[0] // self.groups
        return mx.repeat(mean, per, axis=-1)[:, None], mx.repeat(mx.rsqrt(var + _NORM_EPS), per, axis=-1)[:, None]

    @staticmethod
    def elementwise(silu: bool):
        """The normalisation as a pure function (x, mean, inv, weight, bias) of per-channel
        statistics, for callers that compile it together with what follows it."""
        return _normalize_silu_fn if silu else _normalize_fn


def moments_in_kernel(dtype) -> bool:
    """Whether group_stats reduces activations of `dtype` as it reads them (the column-moments
    kernel: 16-bit values on a GPU back-end), with no float32 copies of them."""
    return kernels.moments_backend(dtype) is not None


def group_stats(x, groups: int, pace: Pace = WHOLE):
    """x [B, H, W, C] -> float32 mean and biased variance [B, G] over (H, W, C/G).

    Reduces over the pixels first, a column reduction with one output per channel that
    the GPU back-ends split over many threadgroups (a reduction over the pixels and a
    group's channels at once runs one threadgroup per group, hundreds of times slower),
    then over each group's channels. Two passes (mean, then squared deviations): no
    E[x^2] - E[x]^2 cancellation. 16-bit x on a GPU back-end goes through the column_moments
    kernel, which accumulates in float32 as it reads x: the statistics then join the part
    that reads them (they hold [B, C] floats), except over more than the execution's
    `stats_apart` values. Elsewhere each pass reduces a float32 copy:
    running in parts, of row blocks near `reduce_block` elements, evaluated block by block,
    the mean existing before the deviations do.
    """
    B, H, W, C = x.shape
    n = H * W * (C // groups)
    backend = kernels.moments_backend(x.dtype)
    if backend:  # 16-bit x on a GPU: reduced as read, in float32, with no float32 copy to bound
        x3, own_part = x.reshape(B, H * W, C), x.size > pace.execution.stats_apart

        def column_sums(mean_c):
            sums = kernels.column_moments(x3, mean_c, backend)
            if own_part:
                pace(sums)
            return sums
    else:
        rows = H if not pace.active else max(1, min(H, pace.execution.reduce_block // max(1, B * W * C)))
        blocks = [x[:, r:r + rows].reshape(B, -1, C) for r in range(0, H, rows)]

        def column_sums(mean_c):  # the sum over the row blocks [B, C], paced block by block
            total, mean_c = None, None if mean_c is None else mean_c[:, None]
            for b in blocks:
                part = mx.sum(b.astype(mx.float32) if mean_c is None else _square_dev(b, mean_c), axis=1)
                total = part if total is None else total + part
                pace(total)
            return total

    def per_group(sums):  # [B, C] -> [B, G], over n elements a group
        return mx.sum(sums.reshape(B, groups, -1), axis=-1) / n

    mean = per_group(column_sums(None))
    var = per_group(column_sums(mx.repeat(mean, C // groups, axis=-1)))
    return mean, var


# Past the statistics, normalisation is elementwise with per-channel vectors. Compiled, it
# runs as one kernel that reads x in its own dtype and writes the result, with no float32
# copies of x between ops.
def _normalize_fn(x, mean, inv, w, b):
    y = (x.astype(mx.float32) - mean) * inv * w.astype(mx.float32) + b.astype(mx.float32)
    return y.astype(x.dtype)


def _normalize_silu_fn(x, mean, inv, w, b):
    y = (x.astype(mx.float32) - mean) * inv * w.astype(mx.float32) + b.astype(mx.float32)
    return (y * mx.sigmoid(y)).astype(x.dtype)


_normalize = mx.compile(_normalize_fn, shapeless=True)
_normalize_silu = mx.compile(_normalize_silu_fn, shapeless=True)
_square_dev = mx.compile(lambda x, mean: mx.square(x.astype(mx.float32) - mean), shapeless=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def __call__(self, x, tile=None, pace: Pace = WHOLE):
        h = self.conv1(self.norm1(x, tile, silu=True, pace=pace))
        pace(h)
        h = self.conv2(self.norm2(h, tile, silu=True, pace=pace))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, GroupNorm first, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x, pace: Pace = WHOLE):
        B, H, W, C = x.shape
        h = self.group_norm(x, pace=pace).reshape(B, 1, H * W, C)  # one head of dim C
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        # No fused kernel takes a 512-wide head, so each query chunk materialises its scores.
        pace.settle()
        out = sdpa(q, k, v, C ** -0.5, rows=max(1, _MAX_SCORES // (H * W)), sync=pace.active)
        return x + self.to_out[0](out).reshape(B, H, W, C)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x):
        # diffusers pads right/bottom only (padding=0 mode), then a stride-2 valid conv.
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x):
        B, H, W, C = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)
        return self.conv(x)


class DownBlock(nn.Module):
    def __init__(self, cin, cout, n, groups, downsample):
        super().__init__()
        self.resnets = [ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)]
        if downsample:
            self.downsamplers = [Downsample(cout)]

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(self, cin, cout, n, groups, upsample):
        super().__init__()
        self.resnets = [ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)]
        if upsample:
            self.upsamplers = [Upsample(cout)]

    def __call__(self, x, tile=None, pace: Pace = WHOLE):
        for r in self.resnets:
            x = r(x, tile, pace)
            pace(x)  # one resnet's temporaries at a time
        if "upsamplers" in self:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels, groups, attention):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, groups) for _ in range(2)]
        if attention:
            self.attentions = [Attention(channels, groups)]

    def __call__(self, x, pace: Pace = WHOLE):
        x = self.resnets[0](x, pace=pace)
        pace(x)
        if "attentions" in self:
            x = self.attentions[0](x, pace)
            pace(x)
        return self.resnets[1](x, pace=pace)


class Encoder(nn.Module):
    """image [B, H, W, 3] in [-1, 1] -> moments [B, H/f, W/f, 2*latent] (f = 2**(levels-1))."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x):
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        return self.out(x)

    def out(self, x, pace: Pace = WHOLE):
        """The mid block, conv_norm_out and conv_out over the down path's output (whole: they
        work at the latent's resolution; strip encoding runs the rest in strips)."""
        x = self.mid_block(x, pace)
        pace(x)
        return self.conv_out(self.conv_norm_out(x, silu=True, pace=pace))


class Decoder(nn.Module):
    """latent [B, h, w, latent] -> image [B, h*f, w*f, 3] in about [-1, 1].

    Split in two so tiled decoding can run the global part (conv_in + mid block with
    its attention over all positions) once and only the local, memory-hungry up path per
    tile. Running in parts (a `Pace` of an Execution with sync), it evaluates block by
    block, resnet by resnet and each GroupNorm's statistics row block by row block: MLX
    otherwise schedules the whole decoder at once, which holds many blocks' activations
    together.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.decoder_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = [
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.conv_norm_out = GroupNorm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def mid(self, z, pace: Pace = WHOLE):
        h = self.conv_in(z)
        pace(h)
        h = self.mid_block(h, pace)
        pace(h)
        return h

    def up(self, x, tile=None, pace: Pace = WHOLE):
        for b in self.up_blocks:
            x = b(x, tile, pace)
            pace(x)
        pace.settle()  # the output norm and conv are evaluated by the caller, outside the pacer
        return self.conv_out(self.conv_norm_out(x, tile, silu=True, pace=pace))

    def __call__(self, z, execution: Execution = ONE_GRAPH):
        pace = execution.pace()
        return self.up(self.mid(z, pace), pace=pace)


class _BatchNormStats(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))


# ----------------------------------------------------------------------------- latents

def patchify(z):
    """[B, H, W, C] -> [B, H/2, W/2, 4C]; channel index c*4 + pi*2 + pj as in the pipeline."""
    B, H, W, C = z.shape
    z = z.reshape(B, H // 2, 2, W // 2, 2, C).transpose(0, 1, 3, 5, 2, 4)
    return z.reshape(B, H // 2, W // 2, 4 * C)


def unpatchify(p):
    """[B, h, w, 4C] -> [B, 2h, 2w, C]; inverse of `patchify`."""
    B, h, w, C4 = p.shape
    p = p.reshape(B, h, w, C4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return p.reshape(B, 2 * h, 2 * w, C4 // 4)


def pack(p):
    """[B, h, w, C] -> tokens [B, h*w, C], row-major (token index = y*w + x)."""
    B, h, w, C = p.shape
    return p.reshape(B, h * w, C)


def unpack(tokens, h: int, w: int):
    """tokens [B, h*w, C] -> [B, h, w, C]."""
    B, L, C = tokens.shape
    if L != h * w:
        raise BonsaiError(f"{L} tokens cannot be unpacked to a {h}x{w} latent grid ({h * w} tokens)")
    return tokens.reshape(B, h, w, C)


# ----------------------------------------------------------------------------- model

def _encoder_modules(config: VAEConfig) -> dict[str, nn.Module]:
    """The modules that encode (ENCODER_KEYS), by attribute name, the encoder first."""
    modules = {"encoder": Encoder(config)}
    if config.use_quant_conv:
        modules["quant_conv"] = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
    return modules


class AutoencoderKLFlux2(nn.Module):
    """FLUX.2 VAE. `has_encoder=False` builds the decoder-only variant (FLUX.2-small-decoder)."""

    def __init__(self, config: VAEConfig, has_encoder: bool = True):
        super().__init__()
        self.config = config
        # Where `load_vae` left the encoder on disk (lazy_encoder): dtype -> its weights by
        # parameter name, lazy reads of the checkpoint cast to dtype.
        self._encoder_reader = None
        if has_encoder:
            for name, module in _encoder_modules(config).items():
                setattr(self, name, module)
        self.decoder = Decoder(config)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.bn = _BatchNormStats(config.patched_channels)

    @property
    def has_encoder(self) -> bool:
        """Whether it can encode images: its encoder resident, or still on disk."""
        return "encoder" in self or self._encoder_reader is not None

    @property
    def encoder_resident(self) -> bool:
        return "encoder" in self

    def read_encoder(self) -> None:
        """Read the encoder's weights where `load_vae` left them on disk (lazy_encoder), one
        at a time: a file tensor and its cast copy are all that live beside the weights read
        so far. Nothing to do when resident or decoder-only."""
        if "encoder" in self or self._encoder_reader is None:
            return
        # in the decoder's dtype, which may have changed since the load (set_dtype)
        weights = self._encoder_reader(self.dtype)
        try:
            for w in weights.values():
                mx.eval(w)
        except (RuntimeError, OSError) as e:  # a lazy read of a file that changed on disk
            raise WeightsError(f"the VAE's encoder could not be read from its checkpoint ({e}): was it changed or "
                               "removed? Load the VAE again") from None
        tree = tree_unflatten(list(weights.items()))
        modules = _encoder_modules(self.config)
        for name, module in modules.items():
            module.update(tree[name])
        # attached only with its weights in, the encoder itself last: a reader stopped before
        # then finds it still on disk
        for name in reversed(modules):
            setattr(self, name, modules[name])
        self._encoder_reader = None

    @property
    def dtype(self):
        return self.decoder.conv_in.weight.dtype

    @property
    def encoder_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def decoder_factor(self) -> int:
        return 2 ** (len(self.config.decoder_channels) - 1)

    # --- latent normalization (the pipeline's BatchNorm on patchified latents), float32

    def _bn(self):
        mean = self.bn.running_mean.astype(mx.float32)
        std = mx.sqrt(self.bn.running_var.astype(mx.float32) + self.config.batch_norm_eps)
        return mean, std

    def normalize(self, p):
        mean, std = self._bn()
        return (p.astype(mx.float32) - mean) / std

    def denormalize(self, p):
        mean, std = self._bn()
        return p.astype(mx.float32) * std + mean

    # --- encode

    def encode_latents(self, x, strip: int | None = None, execution: Execution = ONE_GRAPH):
        """x [B, H, W, 3] in [-1, 1] -> posterior mode [B, H/f, W/f, latent] (float32).

        strip (image rows, multiple of f) encodes stage by stage in row strips, see
        `vae_strips.encode_strips`, run in parts as `execution` says; without it the encoder
        runs whole, in one graph."""
        if not self.has_encoder:
            raise BonsaiError("this VAE checkpoint has no encoder (decoder-only); it cannot encode images")
        f = self.encoder_factor
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels or x.shape[1] % f or x.shape[2] % f:
            raise BonsaiError(f"encode expects [B, H, W, {self.config.in_channels}] with H, W multiples "
                              f"of {f}; got {tuple(x.shape)}")
        if strip is not None and (not is_int(strip) or strip <= 0 or strip % f):
            raise BonsaiError(f"strip must be a positive multiple of {f} image rows; got strip={strip!r}")
        self.read_encoder()
        x = x.astype(self.dtype)
        h = self.encoder(x) if strip is None else encode_strips(self.encoder, x, strip, execution)
        if "quant_conv" in self:
            h = self.quant_conv(h)
        return h[..., : self.config.latent_channels].astype(mx.float32)  # mean half = mode

    def encode(self, image, strip: int | None = None, execution: Execution = ONE_GRAPH):
        """image [B, H, W, 3] in [0, 1] -> normalized tokens [B, (H/16)*(W/16), 4*latent] float32.

        H and W must be multiples of 2*f (16 for FLUX.2). Same as Flux2KleinPipeline's
        preprocess (2x - 1) + `_encode_vae_image` + `_pack_latents`. strip, execution: see
        `encode_latents`.
        """
        f = 2 * self.encoder_factor
        if image.ndim != 4 or image.shape[1] % f or image.shape[2] % f:
            raise BonsaiError(f"encode expects [B, H, W, 3] with H, W multiples of {f}; got {tuple(image.shape)}")
        z = self.encode_latents(2.0 * image - 1.0, strip, execution)
        return pack(self.normalize(patchify(z)))

    # --- decode

    def decode(self, z, tile_size: int | None = None, overlap: int = 128, tile_stats: str = "exact",
               execution: Execution = ONE_GRAPH, strip: int | None = None):
        """z [B, h, w, latent] (before post_quant_conv) -> image [B, h*f, w*f, 3] in ~[-1, 1], float32.

        tile_size (image pixels, multiple of f) turns on tiled decoding, see `_decode_tiled`;
        strip (image rows, multiple of f) decodes stage by stage in row strips, see
        `vae_strips`; `execution` says whether to run block by block (see `Decoder`).
        """
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise BonsaiError(f"decode expects latents [B, h, w, {self.config.latent_channels}]; got {tuple(z.shape)}")
        f = self.decoder_factor
        if strip is not None and (tile_size is not None or not is_int(strip) or strip <= 0 or strip % f):
            raise BonsaiError(f"strip must be a positive multiple of {f} image rows, without tile_size; "
                              f"got strip={strip!r}, tile_size={tile_size!r}")
        z = z.astype(self.dtype)
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        if strip is not None:
            return decode_strips(self.decoder, z, strip, execution).astype(mx.float32)
        if tile_size is None or (z.shape[1] * f <= tile_size and z.shape[2] * f <= tile_size):
            return self.decoder(z, execution).astype(mx.float32)
        return _decode_tiled(self.decoder, z, f, tile_size, overlap, tile_stats, execution)

    def decode_tokens(self, tokens, height: int, width: int, tile_size: int | None = None,
                      overlap: int = 128, tile_stats: str = "exact", execution: Execution = ONE_GRAPH,
                      strip: int | None = None):
        """tokens [B, (H/16)*(W/16), 4*latent] -> image [B, H, W, 3] in [0, 1], float32.

        Flux2KleinPipeline: unpack -> x * sqrt(var + eps) + mean -> unpatchify -> vae.decode
        -> postprocess (x / 2 + 0.5).clamp(0, 1).
        """
        f = 2 * self.decoder_factor
        if height % f or width % f:
            raise BonsaiError(f"height and width must be multiples of {f}; got {height}x{width}")
        if tokens.ndim != 3 or tokens.shape[-1] != self.config.patched_channels:
            raise BonsaiError(f"decode_tokens expects tokens [B, L, {self.config.patched_channels}]; "
                              f"got {tuple(tokens.shape)}")
        z = unpatchify(self.denormalize(unpack(tokens, height // f, width // f)))
        x = self.decode(z, tile_size=tile_size, overlap=overlap, tile_stats=tile_stats, execution=execution,
                        strip=strip)
        return mx.clip(x / 2 + 0.5, 0.0, 1.0)


# ----------------------------------------------------------------------------- tiling

class _Stop(Exception):
    """Raised once the norm being measured has been recorded: the rest of the tile is not needed."""


def merge_moments(acc: list, n, mean, m2) -> None:
    """Fold (count, mean, sum of squared deviations) of one part into `acc` (Chan et al.'s
    pairwise merge): no E[x^2] - E[x]^2 cancellation in float32."""
    if not acc:
        acc[:] = [n, mean, m2]
        return
    na, ma, m2a = acc
    tot = na + n
    d = mean - ma
    acc[:] = [tot, ma + d * (n / tot), m2a + m2 + d * d * (na * n / tot)]


class _TileNorms:
    """GroupNorm statistics for one tile of the decoder's up path.

    The i-th GroupNorm call of a tile is norm i. Norms i < len(fixed) normalize with the
    given whole-image statistics (the same for every tile, so no seams). With `record`,
    the next norm accumulates its statistics over the part of the image this tile owns
    (`core`, latent pixels of the window) and stops the tile; the owned parts of all
    tiles add up to the whole image exactly once. Without either, a norm uses the
    tile's own statistics.
    """

    def __init__(self, fixed, record=None, core=None, tile_h=None):
        self.fixed, self.record, self.core, self.tile_h = fixed or [], record, core, tile_h
        self.i = 0

    def stats(self, x, groups: int, pace: Pace = WHOLE):
        i, self.i = self.i, self.i + 1
        if i < len(self.fixed):
            return self.fixed[i]
        if self.record is None:
            return group_stats(x, groups, pace)
        s = x.shape[1] // self.tile_h  # this layer's upsampling relative to the latent window
        y0, y1, x0, x1 = (c * s for c in self.core)
        part = x[:, y0:y1, x0:x1]
        n = part.shape[1] * part.shape[2] * (part.shape[3] // groups)
        if n:
            mean, var = group_stats(part, groups, pace)
            merge_moments(self.record, n, mean, var * n)
        raise _Stop


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _owned(starts, tile, size):
    # Tile k owns [b_k, b_{k+1}), b_k = middle of its overlap with tile k-1.
    b = [0] + [(starts[k] + starts[k - 1] + tile) // 2 for k in range(1, len(starts))] + [size]
    return [(b[k] - starts[k], b[k + 1] - starts[k]) for k in range(len(starts))]


def _ramp(n_px: int, ramp_px: int, left: bool, right: bool):
    # Weight along one axis of a tile's output: rises linearly over `ramp_px` at every
    # edge that has a neighbour, so neighbours cross-fade; strictly > 0 everywhere.
    i = mx.arange(n_px, dtype=mx.float32)
    w = mx.ones((n_px,), dtype=mx.float32)
    if left:
        w = mx.minimum(w, (i + 0.5) / ramp_px)
    if right:
        w = mx.minimum(w, (n_px - i - 0.5) / ramp_px)
    return w


def _receptive_radius(decoder: "Decoder") -> int:
    """How far (in latent pixels) a value can travel through the up path's convolutions.

    Each 3x3 conv reaches 1 pixel at its own resolution; block i runs at 2**i times the
    latent resolution. With this much context around a tile and shared GroupNorm
    statistics, the tile's inside is exactly what the untiled decoder computes.
    """
    r = 0.0
    for i, b in enumerate(decoder.up_blocks):
        r += 2 * len(b.resnets) / 2 ** i
        if "upsamplers" in b:
            r += 1 / 2 ** (i + 1)
    r += 1 / 2 ** (len(decoder.up_blocks) - 1)  # conv_out
    return math.ceil(r)


def _decode_tiled(decoder: Decoder, z, f: int, tile_size: int, overlap: int, tile_stats: str,
                  ex: Execution = ONE_GRAPH):
    """Decode latents in overlapping tiles with bounded memory.

    conv_in + mid block (attention spans every position, so it cannot be tiled) run once
    on the whole latent: they work at 1/f resolution and the attention is query-chunked.
    The up path (all the full-resolution activations) runs per tile: a `tile_size` square
    of image pixels plus a context margin as wide as the up path's receptive field
    (`_receptive_radius`, 13 latent = 104 image pixels for FLUX.2), which is computed and
    thrown away so that zero padding at the cut never reaches kept pixels. Neighbouring
    tiles share `overlap` pixels and are cross-faded there with linear ramps.

    GroupNorm is the one non-local op left. tile_stats="tile" normalizes each tile with
    its own statistics, like diffusers' tiled decode: cheap, but every tile gets its own
    brightness/contrast (seams; on random test VAEs up to tens of 8-bit levels).
    tile_stats="exact" gives every tile the whole-image statistics, measured one norm at
    a time: pass k runs each tile only up to norm k (earlier norms already exact) and
    merges that norm's statistics over the region each tile owns. With the context
    margin this equals the untiled decoder up to float rounding, at the price of about
    (number of norms)/2 extra up-path evaluations (25 norms for FLUX.2: ~12x).
    Memory either way: O(tile) activations, the [B, H, W, 3] output and the
    1/f-resolution mid-block output.
    """
    if tile_size % f or overlap % f or not 0 <= overlap < tile_size:
        raise BonsaiError(f"tile_size and overlap must be multiples of {f} with 0 <= overlap < tile_size; "
                          f"got tile_size={tile_size}, overlap={overlap}")
    if tile_stats not in ("exact", "tile"):
        raise BonsaiError(f"tile_stats must be 'exact' or 'tile', got {tile_stats!r}")
    pace = ex.pace()
    h = decoder.mid(z, pace)
    mx.eval(h)
    B, H, W, _ = h.shape
    T, O, R = tile_size // f, overlap // f, _receptive_radius(decoder)
    ys, xs = _tile_starts(H, T, T - O), _tile_starts(W, T, T - O)
    th, tw = min(T, H), min(T, W)
    own_y, own_x = _owned(ys, th, H), _owned(xs, tw, W)

    def run(a, b, norms):
        # latent window = tile plus context, clipped to the image; returns the tile's pixels
        a0, a1, b0, b1 = max(a - R, 0), min(a + th + R, H), max(b - R, 0), min(b + tw + R, W)
        norms.tile_h = a1 - a0
        if norms.core is not None:
            y0, y1, x0, x1 = norms.core
            norms.core = (y0 + a - a0, y1 + a - a0, x0 + b - b0, x1 + b - b0)
        y = decoder.up(h[:, a0:a1, b0:b1], norms, pace)
        return y[:, (a - a0) * f:(a - a0 + th) * f, (b - b0) * f:(b - b0 + tw) * f]

    stats = []
    if tile_stats == "exact":
        n_norms = sum(2 * len(blk.resnets) for blk in decoder.up_blocks) + 1
        for _ in range(n_norms):
            acc = []
            for a, (oy0, oy1) in zip(ys, own_y):
                for b, (ox0, ox1) in zip(xs, own_x):
                    try:
                        run(a, b, _TileNorms(stats, acc, (oy0, oy1, ox0, ox1)))
                    except _Stop:
                        pass
                    pace.settle()
                    mx.eval(acc)
            n, mean, m2 = acc
            stats.append((mean, m2 / n))

    out = mx.zeros((B, H * f, W * f, decoder.conv_out.weight.shape[0]), dtype=mx.float32)
    wsum = mx.zeros((H * f, W * f, 1), dtype=mx.float32)
    for iy, a in enumerate(ys):
        wy = _ramp(th * f, overlap, iy > 0, iy < len(ys) - 1)
        for ix, b in enumerate(xs):
            wx = _ramp(tw * f, overlap, ix > 0, ix < len(xs) - 1)
            w = (wy[:, None] * wx[None, :])[..., None]
            y = run(a, b, _TileNorms(stats)).astype(mx.float32)
            sy, sx = slice(a * f, (a + th) * f), slice(b * f, (b + tw) * f)
            out[:, sy, sx] = out[:, sy, sx] + y * w
            wsum[sy, sx] = wsum[sy, sx] + w
            pace.settle()
            mx.eval(out, wsum)
    return out / wsum


# ----------------------------------------------------------------------------- loading

def _to_mlx(name: str, w: mx.array) -> mx.array:
    """The one place where diffusers tensors become MLX parameters."""
    if w.ndim == 4:
        if ".attentions." in name:
            # legacy 1x1-conv attention projections; any other kernel is left for the shape check
            return w.reshape(w.shape[0], w.shape[1]) if w.shape[2:] == (1, 1) else w
        return w.transpose(0, 2, 3, 1)  # conv [out, in, kh, kw] -> [out, kh, kw, in]
    return w


# Buffers diffusers saves that inference does not use.
_IGNORED_KEYS = ("bn.num_batches_tracked",)


def _list(names, limit=20):
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _weight_files(folder: ModelFolder) -> list[Path]:
    return shard_files(folder, preferred=("diffusion_pytorch_model.safetensors",), what="VAE weights")


def _read_weights(files: list[Path]) -> tuple[dict, str]:
    return load_shards(files), files_named(files)


def load_vae(path, dtype=mx.float16, layout: str = "diffusers", lazy_encoder: bool = False) -> AutoencoderKLFlux2:
    """Load a diffusers AutoencoderKLFlux2 directory (config.json + safetensors).

    A checkpoint without any `encoder.*` key loads as decoder-only. The BatchNorm
    statistics stay float32; everything else is cast to `dtype`. layout="mlx" reads
    weights already in this module's layout (channels-last convolutions, as bundles
    store them) instead of diffusers'. `lazy_encoder`: the encoder's weights (and its
    quant_conv's), checked here, stay on disk until the first encode reads them
    (`AutoencoderKLFlux2.read_encoder`): only editing encodes images, and for FLUX.2's VAE
    they are 69 MB in float16 that a text-to-image run never needs.
    """
    if layout not in ("diffusers", "mlx"):
        raise BonsaiError(f"VAE layout must be 'diffusers' or 'mlx', got {layout!r}")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise WeightsError(f"VAE directory {path} does not exist")
    folder = ModelFolder(path)
    if not folder.exists("config.json"):
        raise WeightsError(f"{path / 'config.json'} is missing; expected a diffusers VAE directory")
    cfg_file = folder.file("config.json", "VAE config")
    with in_file(cfg_file):
        config = VAEConfig.from_dict(read_json(cfg_file, "VAE config"))

    files = _weight_files(folder)
    raw, source = _read_weights(files)
    raw = {k: v for k, v in raw.items() if k not in _IGNORED_KEYS}
    has_encoder = any(k.startswith("encoder.") for k in raw)
    model = AutoencoderKLFlux2(config, has_encoder=has_encoder)
    expected = dict(tree_flatten(model.parameters()))

    missing = expected.keys() - raw.keys()
    unexpected = raw.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
    not_float = sorted(k for k, w in raw.items() if not mx.issubdtype(w.dtype, mx.floating))
    if not_float:
        problems.append(f"weights that are not floating point: {_list(not_float)}")
    weights, bad_shapes = _converted(raw, {k: v.shape for k, v in expected.items()}, layout, dtype)
    if bad_shapes:
        problems.append(f"shape mismatches ({len(bad_shapes)}): " + "; ".join(sorted(bad_shapes)[:20]))
    if problems:
        raise WeightsError(f"VAE weights in {source} do not fit its config.json: " + " | ".join(problems))
    if lazy_encoder and has_encoder:
        on_disk = {k for k in weights if k.startswith(ENCODER_KEYS)}
        for name in _encoder_modules(config):
            if name in model:
                del model[name]
        weights = {k: w for k, w in weights.items() if k not in on_disk}
        shapes, stamps = {k: expected[k].shape for k in on_disk}, _file_stamps(files)
        model._encoder_reader = lambda to: _read_again(folder, stamps, shapes, layout, to)
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    return model


ENCODER_KEYS = ("encoder.", "quant_conv.")


def _converted(raw: dict, shapes: dict, layout: str, dtype) -> tuple[dict, list[str]]:
    """The checkpoint's weights that `shapes` names, lazy, in this module's layout and
    dtype, and the shape mismatches found."""
    weights, bad_shapes = {}, []
    for k in shapes.keys() & raw.keys():
        w = _to_mlx(k, raw[k]) if layout == "diffusers" else raw[k]
        if w.shape != tuple(shapes[k]):
            bad_shapes.append(f"{k}: expected {tuple(shapes[k])} (MLX layout), "
                              f"got {tuple(w.shape)} (from {tuple(raw[k].shape)})")
        weights[k] = w.astype(mx.float32 if k.startswith("bn.") else dtype)
    return weights, bad_shapes


def _file_stamps(files: list[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime in ns) of each weight file: what a later read checks first."""
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _read_again(folder: ModelFolder, stamps: list, shapes: dict, layout: str, dtype) -> dict:
    """The weights `shapes` names, lazy reads of the checkpoint as `load_vae` found it."""
    try:
        files = _weight_files(folder)
        now = _file_stamps(files)
        raw, source = _read_weights(files)
    except (BonsaiError, OSError) as e:
        raise WeightsError(f"the VAE's encoder could not be read again: {e}. Load the VAE again") from None
    weights, bad_shapes = _converted(raw, shapes, layout, dtype)
    if now != stamps or bad_shapes or len(weights) != len(shapes):
        raise WeightsError(f"{source} no longer holds the VAE encoder's weights as loaded: was it changed on disk? "
                           "Load the VAE again")
    return weights
