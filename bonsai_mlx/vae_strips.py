"""Strip decoding and encoding: the VAE decoder's up path (the encoder's conv_in and down
path) stage by stage over the whole image, each stage evaluated in horizontal strips of
rows, equal to the whole decode (encode) up to float rounding.

A stage (a resnet, an upsampler, the final norm + conv_out) reads a tensor held for the
whole image and writes its output strip by strip: a strip's 3x3 convolution reads one row
of its input above and below (the halo), taken from the held input, so nothing at the cut
differs from the whole decode. A resnet holds one more whole tensor, conv1's output: its
GroupNorm (norm2) needs statistics over the whole of it before conv2 can run, and holding
it costs one tensor where recomputing it would cost a third convolution per resnet.
GroupNorm statistics of every held tensor are measured strip by strip as it is written
and merged once, so no pass over a whole tensor and no full-size float32 copy is needed.

A held tensor is kept as its strips (`Rows`), never assembled: writing strips into one
whole buffer needs MLX to reuse the buffer in place at every write, which a GPU back-end
cannot do while the previous write is still in flight (it copies the whole buffer
instead), and a strip's reader takes its rows, halo included, from the one or two strips
that hold them. The last reader of a tensor releases its strips as it goes, so a stage's
output takes the place of its input instead of adding to it.

The decoder's last upsampler, whose output is the largest tensor (the full resolution at
the upsampler's channels), is never held: the resnet after it computes the rows it reads
from the upsampler's input (`Upsampled`), at the cost of that convolution twice more.

Strip heights differ by stage (`stage_rows`): `strip` rows for the stage that makes the
most per row, and as many elements for every other one, so the low resolutions run in
few tall strips or whole.

Held at once, at most (`held_bytes`): a resnet's input and conv1's output (for the FLUX.2
VAE a full-resolution resnet: 128 + 128 channels, 0.54 GB at 1024x1024 in float16), plus
one or two strips' temporaries. The mid block (attention over all positions) runs whole:
it works at 1/8 resolution. Everything here is channels-last, [B, H, W, C].

The encoder runs the same way in the other direction (`encode_strips`): conv_in, then
each down block's resnets and its downsampler (diffusers' Downsample2D: one zero row and
column padded at the bottom and right, then a 3x3 stride-2 valid convolution, so output
rows [a, b) read input rows [2a, 2b + 1)), each in strips; its mid block and conv_out
run whole at the latent's resolution. It holds at most a full-resolution resnet's input
and conv1's output (128 + 128 channels for FLUX.2: 0.54 GB at 1024x1024 in float16;
`encode_held_bytes`).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np

from . import kernels
from .execution import Execution, Pace


class Rows:
    """A [B, H, W, C] tensor held as the strips that produced it: `parts` are (a, b, rows
    [a, b)) in order, covering [0, H) until its last reader releases them."""

    def __init__(self, parts: list, shape: tuple, dtype):
        self.parts, self.shape, self.dtype = parts, tuple(shape), dtype

    def rows(self, a: int, b: int) -> mx.array:
        """Rows [a, b): a view of one strip, or the few strips' rows concatenated."""
        pieces = [t[:, max(a, p0) - p0:min(b, p1) - p0] for p0, p1, t in self.parts if p0 < b and p1 > a]
        if sum(p.shape[1] for p in pieces) != b - a:  # a reader asking for rows already released
            raise RuntimeError(f"rows [{a}, {b}) of a strip-held tensor are no longer held")
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=1)

    def release(self, row: int) -> None:
        """Drop the strips wholly above `row`: the last reader needs no row before it again."""
        self.parts = [p for p in self.parts if p[1] > row]

    def whole(self) -> mx.array:
        return self.rows(0, self.shape[1])


class Upsampled:
    """The nearest-2x upsampling and 3x3 conv of an `Upsample` over a held tensor u, never
    held whole: the rows a reader asks for are computed from u's rows then. The decoder's
    last upsampler writes its largest tensor (4 times u's pixels at the full resolution);
    reading it this way costs that convolution twice more (the next resnet's norm1
    statistics, conv1 and its shortcut each read it) and holds u instead."""

    def __init__(self, up, u):
        B, H, W, _ = u.shape
        self.up, self.u = up, u
        self.shape, self.dtype = (B, 2 * H, 2 * W, up.conv.weight.shape[0]), u.dtype

    def rows(self, a: int, b: int) -> mx.array:
        H = self.u.shape[1]
        lo, hi = max((a - 1) // 2, 0), min(b // 2 + 1, H)  # the input rows output rows [a - 1, b + 1) repeat
        t = _nearest2x(_rows(self.u, lo, hi))  # output rows [2 lo, 2 hi)
        t = t[:, max(a - 1, 0) - 2 * lo:min(b + 1, 2 * H) - 2 * lo]
        return _conv_rows(self.up.conv, t, a, b, 2 * H)

    def release(self, row: int) -> None:
        _release(self.u, (row - 1) // 2)


def _rows(x, a: int, b: int) -> mx.array:
    """Rows [a, b) of x (an array, Rows or Upsampled)."""
    return x[:, a:b] if isinstance(x, mx.array) else x.rows(a, b)


def _release(x, row: int) -> None:
    """Tell a strip-held x that no reader needs its rows before `row` again (an array is the
    caller's, held whole)."""
    if not isinstance(x, mx.array):
        x.release(row)


def spans(size: int, rows: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) covering `size` rows `rows` at a time (the last one may be shorter)."""
    return [(a, min(a + rows, size)) for a in range(0, size, rows)]


def _conv_rows(conv, t, a: int, b: int, size: int, norm: tuple | None = None, skip=None):
    """Rows [a, b) of a 3x3, padding-1 `conv` over a `size`-row input, from `t`: that input's
    rows [a - 1, b + 1) clipped to the image, normalised first with `norm` (`_norm_args`)
    when given, `skip` added when given. Zero rows stand in for the padding where the strip
    touches the image's top or bottom, exactly as the whole convolution pads."""
    top, bottom, bias = int(a == 0), int(b == size), "bias" in conv
    args = [t, conv.weight, *(norm[1:] if norm else ()), *([conv.bias] if bias else []),
            *([] if skip is None else [skip])]
    return _step(top, bottom, norm[0] if norm else None, bias, skip is not None)(*args)


_STEPS: dict = {}


def _step(top: int, bottom: int, normalize, bias: bool, skip: bool):
    """One compiled function per kind of strip step: a strip's normalisation, padding,
    convolution, bias and skip are one call, not several ops built one by one (with a GPU
    busy, building a strip's graph is what a small strip's time goes to)."""
    key = (top, bottom, normalize, bias, skip)
    if key not in _STEPS:
        def step(t, w, *rest):
            rest = list(rest)
            if normalize is not None:
                t = normalize(t, *rest[:4])
                rest = rest[4:]
            if top or bottom:
                t = mx.pad(t, [(0, 0), (top, bottom), (0, 0), (0, 0)])
            y = mx.conv2d(t, w, padding=(0, 1))
            if bias:
                y = y + rest.pop(0)
            return rest.pop(0) + y if skip else y

        _STEPS[key] = mx.compile(step)
    return _STEPS[key]


def _norm_args(norm, stats) -> tuple:
    """What `_conv_rows` normalises with (GroupNorm then SiLU), made once per stage: the
    function and its per-channel statistics, weight and bias."""
    mean, inv = norm.channel_stats(stats)
    return norm.elementwise(True), mean[:, None], inv[:, None], norm.weight, norm.bias


def _channel_moments_fn(x, inv_count):
    xf = x.astype(mx.float32)
    total = mx.sum(xf, axis=(1, 2), keepdims=True)
    return total, mx.sum(mx.square(xf - total * inv_count), axis=(1, 2), keepdims=True)


_channel_moments = mx.compile(_channel_moments_fn)


def _moments(part):
    """(counts, sums, squared deviations) of `part` [B, H, W, C] for the parallel-variance
    merge (`_merged`): per channel over row blocks of its pixels, `counts` the pixels of each
    block, the deviations around each block's own mean, all float32. 16-bit parts on a GPU
    back-end go through the block-moments kernel: one launch, reading the part in its own
    dtype (kernels.block_moments). Elsewhere one block of all the pixels, two column
    reductions (the second around the first's mean) compiled, kept 4-D so that no squeeze
    or expansion joins the graph; the count enters as an array: a Python number would be a
    constant of the compiled kernels, and every strip height a new kernel to build. Per
    channel, not per group: the groups' channels merge with the strips once per stage."""
    B, H, W, C = part.shape
    backend = kernels.moments_backend(part.dtype)
    if backend:
        return kernels.block_moments(part.reshape(B, H * W, C), backend)
    return _copied_moments(part)


def _copied_moments(part):
    """`_moments` of `part` as one block, from float32 copies of it (compiled)."""
    n = part.shape[1] * part.shape[2]
    return ((n,), *_channel_moments(part, mx.array(1.0 / n, dtype=mx.float32)))


@lru_cache(maxsize=1024)
def _counted(counts: tuple) -> tuple[mx.array, int]:
    """A part's block counts as [K, 1, 1] float32 and their total, made once per tuple: a
    stage merges thousands of blocks, and an array built from them value by value costs more
    host time than the merge's launches. The array is made from host data, not by an op: a
    cached op waits on the stream of the thread that built it, which another thread's
    decode cannot evaluate."""
    return mx.array(np.asarray(counts, dtype=np.float32).reshape(-1, 1, 1)), sum(counts)


def _merged(parts: list, groups: int):
    """Whole-tensor (mean, biased variance) [B, groups] from the (counts, sums, squared
    deviations) of its parts (`_moments`): the parallel-variance formula over every block of
    every part and every channel of a group, no E[x^2] - E[x]^2 cancellation."""
    B, C = parts[0][1].shape[0], parts[0][1].shape[-1]
    counted = [_counted(ns) for ns, _, _ in parts]
    counts = mx.concatenate([c for c, _ in counted])  # [K, 1, 1]
    sums = mx.concatenate([s.reshape(B, -1, C) for _, s, _ in parts], axis=1)  # [B, K, C]
    m2s = mx.concatenate([q.reshape(B, -1, C) for _, _, q in parts], axis=1)
    K, g = sums.shape[1], C // groups
    sums, m2s = sums.reshape(B, K, groups, g), m2s.reshape(B, K, groups, g)
    total = sum(n for _, n in counted) * g
    mean = mx.sum(sums, axis=(1, 3)) / total
    means = sums / mx.maximum(counts, 1.0)  # a block of no rows: zero sum, zero count, no weight
    dev = mx.square(means - mean[:, None, :, None])
    return mean, mx.sum(m2s + counts * dev, axis=(1, 3)) / total


def _halo(x, a: int, b: int):
    """Rows [a - 1, b + 1) of x clipped to the image: what a 3x3 conv of rows [a, b) reads."""
    return _rows(x, max(a - 1, 0), min(b + 1, x.shape[1]))


def _nearest2x(x):
    B, H, W, C = x.shape
    return mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)


def _produce(fn, shape, dtype, rows: int, norm, pace: Pace, release=None):
    """A tensor of `shape` held as its strips (`Rows`): fn(a, b) gives rows [a, b). With
    `norm` (the GroupNorm that reads it next), also its whole-image statistics for that
    norm, from each strip's moments. Each strip is evaluated as it is made; after it,
    `release(b)` lets the inputs drop what the strips from row b on do not read."""
    parts, moments = [], []
    for a, b in spans(shape[1], rows):
        part = fn(a, b)
        parts.append((a, b, part))
        if norm is not None:
            moments.append(_moments(part))
        pace(part, *(moments[-1][1:] if moments else ()))
        if release is not None:
            release(b)
    return Rows(parts, shape, dtype), (_merged(moments, norm.groups) if moments else None)


def _stats(x, norm, rows: int, pace: Pace):
    """`norm`'s whole-image statistics of x, read strip by strip (x is an `Upsampled`:
    each strip computed, measured and dropped)."""
    moments = []
    for a, b in spans(x.shape[1], rows):
        moments.append(_moments(x.rows(a, b)))
        pace(*moments[-1][1:])
    return _merged(moments, norm.groups)


def _conv3(conv, norm, x, stats, rows: int, next_norm, pace: Pace, last: bool = True):
    """A 3x3, padding-1 `conv` over x, after `norm` (with x's `stats`) and SiLU when a norm
    is given: a resnet's conv1 (`last` False: its shortcut reads x again), the decoder's
    conv_norm_out + conv_out, the encoder's conv_in."""
    H = x.shape[1]
    pre = None if norm is None else _norm_args(norm, stats)
    return _produce(lambda a, b: _conv_rows(conv, _halo(x, a, b), a, b, H, pre),
                    (*x.shape[:3], conv.weight.shape[0]), x.dtype, rows, next_norm, pace,
                    (lambda b: _release(x, b - 1)) if last else None)


def _resnet(r, x, stats, rows: int, next_norm, pace: Pace):
    """One ResnetBlock: x and its norm1 statistics -> the output and next_norm's statistics.
    As its output is written, x and conv1's output drop the strips no later strip reads, so
    the stage holds about x and conv1's output, never those and its output whole."""
    H = x.shape[1]
    h, h_stats = _conv3(r.conv1, r.norm1, x, stats, rows, r.norm2, pace, last=False)
    pre = _norm_args(r.norm2, h_stats)

    def out(a, b):
        skip = r.conv_shortcut(_rows(x, a, b)) if "conv_shortcut" in r else _rows(x, a, b)
        return _conv_rows(r.conv2, _halo(h, a, b), a, b, H, pre, skip)

    def release(b):
        _release(x, b)
        _release(h, b - 1)

    return _produce(out, h.shape, x.dtype, rows, next_norm, pace, release)


def _upsample(up, x, stats, rows: int, next_norm, pace: Pace):
    """Nearest 2x then a 3x3 conv; `rows` counts output rows. The input rows a strip reads
    are upsampled for that strip alone."""
    u = Upsampled(up, x)
    return _produce(u.rows, u.shape, x.dtype, rows, next_norm, pace, u.release)


def _downsample(down, x, stats, rows: int, next_norm, pace: Pace):
    """A `vae.Downsample` (pads a zero row at the bottom, a stride-2 valid 3x3 conv): output
    rows [a, b) read input rows [2a, 2b + 1), the last of them the padding when b is the
    bottom, so the module itself runs on each strip's rows."""
    B, H, W, _ = x.shape
    return _produce(lambda a, b: down(_rows(x, 2 * a, min(2 * b + 1, H))),
                    (B, H // 2, W // 2, down.conv.weight.shape[0]), x.dtype, rows, next_norm, pace,
                    lambda b: _release(x, 2 * b))


def _lazy_upsample(up, x, stats, rows: int, next_norm, pace: Pace):
    """The upsampler read lazily (`Upsampled`): only next_norm's statistics are computed here."""
    u = Upsampled(up, x)
    return u, _stats(u, next_norm, rows, pace)


def _channels(conv):
    """(input, output) channels of a convolution."""
    return conv.weight.shape[-1], conv.weight.shape[0]


def _load(c_in: int, c_out: int) -> int:
    """Elements per output pixel a 3x3 conv of a strip makes: its input window, normalized,
    unfolded into 3x3 patches where a back-end does so, and its output."""
    return 11 * c_in + c_out


def _resnet_load(r) -> int:
    c_in, c_out = _channels(r.conv1)
    return max(_load(c_in, c_out), _load(c_out, c_out) + c_in)  # conv1's strips; conv2's and the shortcut's


# Each kind of stage: how it runs in strips, its output's height per input row, and the
# elements a strip makes per output pixel (what its scratch scales with).
_KINDS = {"resnet": (_resnet, 1, _resnet_load), "upsample": (_upsample, 2, lambda m: _load(*_channels(m.conv))),
          "lazy_upsample": (_lazy_upsample, 2, lambda m: _load(*_channels(m.conv))),
          "downsample": (_downsample, 0.5, lambda m: 4 * _channels(m.conv)[0] + _load(*_channels(m.conv))),
          "in": (lambda m, *a: _conv3(m.conv_in, None, *a), 1, lambda m: _load(*_channels(m.conv_in))),
          "out": (lambda m, *a: _conv3(m.conv_out, m.conv_norm_out, *a), 1, lambda m: _load(*_channels(m.conv_out)))}


def _stages(decoder) -> list[tuple[str, object]]:
    """The up path in order: ("resnet", block), ("upsample", upsampler), ("out", decoder);
    the last upsampler, into the full resolution, is read lazily ("lazy_upsample")."""
    out = []
    for blk in decoder.up_blocks:
        out += [("resnet", r) for r in blk.resnets]
        if "upsamplers" in blk:
            out.append(("upsample", blk.upsamplers[0]))
    last = max((i for i, (kind, _) in enumerate(out) if kind == "upsample"), default=None)
    if last is not None:
        out[last] = ("lazy_upsample", out[last][1])
    return out + [("out", decoder)]


def _down_stages(encoder) -> list[tuple[str, object]]:
    """conv_in and the down path in order: ("in", encoder), ("resnet", block), ("downsample", d)."""
    out = [("in", encoder)]
    for blk in encoder.down_blocks:
        out += [("resnet", r) for r in blk.resnets]
        if "downsamplers" in blk:
            out.append(("downsample", blk.downsamplers[0]))
    return out


def _input_norm(kind: str, m):
    """The GroupNorm that reads a stage's input first (None: the stage reads it raw)."""
    return {"resnet": lambda: m.norm1, "out": lambda: m.conv_norm_out}.get(kind, lambda: None)()


def stage_rows(stages, height: int, width: int, strip: int) -> list[int]:
    """Rows per strip of each stage over a `height` x `width` input: `strip` for the stage
    that reads and writes the most per row, and for every other one as many rows as make
    about as many elements (capped at its height). A low-resolution stage then runs in few
    tall strips, or whole, instead of as many strips as the full resolution needs: its
    convolutions stay large, and there are fewer evaluations. A lazily read upsampler's
    work counts in the stage that reads it. Rows are evened out over a stage's strips, so
    the last one is not a sliver."""
    sizes, h, w, carry = [], height, width, 0
    for kind, m in stages:
        scale, load = _KINDS[kind][1:]
        h, w = int(h * scale), int(w * scale)
        sizes.append((h, w * (load(m) + carry)))
        carry = load(m) if kind == "lazy_upsample" else 0
    per_row = max(r for _, r in sizes)
    out = []
    for h, r in sizes:
        n = -(-h // max(1, min(h, strip * per_row // r)))  # strips at most that tall, then evened out
        out.append(-(-h // n))
    return out


def _run(stages, x, stats, strip: int, pace: Pace, last_norm=None):
    """x through `stages` in order, each in strips (`stage_rows`), with the statistics of x
    that the first stage's input norm needs. Returns the last output, whole, and
    `last_norm`'s statistics."""
    for i, ((kind, m), rows) in enumerate(zip(stages, stage_rows(stages, x.shape[1], x.shape[2], strip))):
        nxt = _input_norm(*stages[i + 1]) if i + 1 < len(stages) else last_norm
        x, stats = _KINDS[kind][0](m, x, stats, rows, nxt, pace)
    pace.settle()  # the caller evaluates the assembled output outside the pacer
    return x.whole(), stats


def decode_strips(decoder, z, strip: int, ex: Execution):
    """z [B, h, w, latent] (after post_quant_conv) -> the decoder's output [B, h*f, w*f, C]
    in z's dtype, the up path in strips of `strip` rows at its heaviest stage (`stage_rows`).
    conv_in and the mid block run whole."""
    pace = ex.pace()
    return up_strips(decoder, decoder.mid(z, pace), strip, pace)


def up_strips(decoder, x, strip: int, pace: Pace):
    """The up path, conv_norm_out and conv_out over the mid block's output x, in strips."""
    stages = _stages(decoder)
    stats = _input_norm(*stages[0]).stats(x, pace)  # the first stage is a resnet
    return _run(stages, x, stats, strip, pace)[0]


def encode_strips(encoder, x, strip: int, ex: Execution):
    """x [B, H, W, C] (the image in the encoder's dtype) -> the encoder's moments
    [B, H/f, W/f, 2 * latent], conv_in and the down path in strips of `strip` rows at its
    heaviest stage (`stage_rows`); the mid block, conv_norm_out and conv_out run whole on
    the latent-resolution result."""
    pace = ex.pace()
    h, _ = _run(_down_stages(encoder), x, None, strip, pace)
    pace(h)
    return encoder.out(h, pace)


def held_bytes(config, height: int, width: int, dtype_bytes: int) -> int:
    """Bytes of the whole tensors `decode_strips` holds at once at its peak, for one
    `height` x `width` image: a resnet its input and conv1's output (its output takes their
    place strip by strip), an upsampler its input and output, the lazily read last
    upsampler its input (under the resnet that reads it: that input and conv1's output),
    conv_out its input and output."""
    ch = tuple(reversed(config.decoder_channels))
    n = len(ch)
    px = lambda level: (height >> (n - 1 - level)) * (width >> (n - 1 - level))  # noqa: E731
    held = []
    for i, c in enumerate(ch):
        for j in range(config.layers_per_block + 1):
            c_in = ch[max(i - 1, 0)] if j == 0 else c
            lazy_in = i == n - 1 and n > 1 and j == 0  # reads the lazily upsampled tensor
            held.append((px(i - 1) if lazy_in else px(i)) * c_in + px(i) * c)
        if i < n - 2:
            held.append(px(i) * c + px(i + 1) * c)
    held.append(px(n - 1) * (ch[-1] + config.out_channels))
    return max(held) * dtype_bytes


def encode_held_bytes(config, height: int, width: int, dtype_bytes: int) -> int:
    """Bytes of the whole tensors `encode_strips` holds at once at its peak, for one
    `height` x `width` image, as `held_bytes` counts them: conv_in the image and its
    output, a resnet its input and conv1's output, a downsampler its input and output (at a
    quarter of the pixels)."""
    ch, n = config.block_out_channels, len(config.block_out_channels)
    px = lambda level: (height >> level) * (width >> level)  # noqa: E731
    held = [px(0) * (config.in_channels + ch[0])]
    for i, c in enumerate(ch):
        for j in range(config.layers_per_block):
            held.append(px(i) * ((ch[max(i - 1, 0)] if j == 0 else c) + c))
        if i < n - 1:
            held.append(px(i) * c + px(i + 1) * c)
    return max(held) * dtype_bytes
