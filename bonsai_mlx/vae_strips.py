"""Strip decoding and encoding: the VAE decoder's up path (the encoder's conv_in and down
path) stage by stage over the whole image, each stage evaluated in horizontal strips of
rows, equal to the whole decode (encode) up to float rounding.

A stage (a resnet, an upsampler, the final norm + conv_out) reads a tensor held for the
whole image and writes its output, held for the whole image, strip by strip: a strip's 3x3
convolution reads one row of its input above and below (the halo), taken from the held
input, so nothing at the cut
differs from the whole decode. A resnet holds one more whole tensor, conv1's output: its
GroupNorm (norm2) needs statistics over the whole of it before conv2 can run, and holding
it costs one tensor where recomputing it would cost a third convolution per resnet.
GroupNorm statistics of every held tensor are merged strip by strip as it is written, so
no pass over a whole tensor and no full-size float32 copy is needed.

A held tensor is kept as its strips (`Rows`), never assembled: writing strips into one
whole buffer needs MLX to reuse the buffer in place at every write, which a GPU back-end
cannot do while the previous write is still in flight (it copies the whole buffer
instead), and a strip's reader takes its rows, halo included, from the one or two strips
that hold them.

Held at once, at most: a stage's input, conv1's output and the stage's output (for the
FLUX.2 VAE the first resnet of the last block: 256 + 128 + 128 channels at full
resolution, 1 GB at 1024x1024 in float16; `held_bytes`), plus one or two strips'
temporaries. The mid block (attention over all positions) runs whole: it works at 1/8
resolution. Everything here is channels-last, [B, H, W, C].

The encoder runs the same way in the other direction (`encode_strips`): conv_in, then
each down block's resnets and its downsampler (diffusers' Downsample2D: one zero row and
column padded at the bottom and right, then a 3x3 stride-2 valid convolution, so output
rows [a, b) read input rows [2a, 2b + 1)), each in strips; its mid block and conv_out
run whole at the latent's resolution. It holds at most a resnet's input, conv1's output
and its output at full resolution (128 + 128 + 128 channels for FLUX.2: 0.8 GB at
1024x1024 in float16; `encode_held_bytes`).
"""

from __future__ import annotations

import mlx.core as mx

from .execution import Execution, Pace


class Rows:
    """A [B, H, W, C] tensor held as the strips that produced it: `parts` are (a, b, rows
    [a, b)) in order, covering [0, H)."""

    def __init__(self, parts: list, shape: tuple, dtype):
        self.parts, self.shape, self.dtype = parts, tuple(shape), dtype

    def rows(self, a: int, b: int) -> mx.array:
        """Rows [a, b): a view of one strip, or the few strips' rows concatenated."""
        pieces = [t[:, max(a, p0) - p0:min(b, p1) - p0] for p0, p1, t in self.parts if p0 < b and p1 > a]
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=1)

    def whole(self) -> mx.array:
        return self.rows(0, self.shape[1])


def _rows(x, a: int, b: int) -> mx.array:
    """Rows [a, b) of x (an array or Rows)."""
    return x.rows(a, b) if isinstance(x, Rows) else x[:, a:b]


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


def spans(size: int, rows: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) covering `size` rows `rows` at a time (the last one may be shorter)."""
    return [(a, min(a + rows, size)) for a in range(0, size, rows)]


def _conv_rows(conv, t, a: int, b: int, size: int):
    """Rows [a, b) of a 3x3, padding-1 `conv` over a `size`-row input, from `t`: that input's
    rows [a - 1, b + 1) clipped to the image. Zero rows stand in for the padding where the
    strip touches the image's top or bottom, exactly as the whole convolution pads."""
    top, bottom = int(a == 0), int(b == size)
    if top or bottom:
        t = mx.pad(t, [(0, 0), (top, bottom), (0, 0), (0, 0)])
    y = mx.conv2d(t, conv.weight, padding=(0, 1))
    return y + conv.bias if "bias" in conv else y


def _halo(x, a: int, b: int):
    """Rows [a - 1, b + 1) of x clipped to the image: what a 3x3 conv of rows [a, b) reads."""
    return _rows(x, max(a - 1, 0), min(b + 1, x.shape[1]))


def _nearest2x(x):
    B, H, W, C = x.shape
    return mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)


def _produce(fn, shape, dtype, rows: int, norm, pace: Pace):
    """A tensor of `shape` held as its strips (`Rows`): fn(a, b) gives rows [a, b). With
    `norm` (the GroupNorm that reads it next), also its whole-image statistics for that
    norm, merged from each strip's own. Each strip is evaluated as it is made."""
    parts, acc = [], []
    for a, b in spans(shape[1], rows):
        part = fn(a, b)
        parts.append((a, b, part))
        if norm is not None:
            mean, var = norm.stats(part)
            n = part.shape[1] * part.shape[2] * (part.shape[3] // norm.groups)
            merge_moments(acc, n, mean, var * n)
        pace(part, *acc)
    out = Rows(parts, shape, dtype)
    if norm is None:
        return out, None
    n, mean, m2 = acc
    return out, (mean, m2 / n)


def _conv3(conv, norm, x, stats, rows: int, next_norm, pace: Pace):
    """A 3x3, padding-1 `conv` over x, after `norm` (with x's `stats`) and SiLU when a norm
    is given: a resnet's conv1, the decoder's conv_norm_out + conv_out, the encoder's conv_in."""
    H = x.shape[1]
    pre = (lambda t: t) if norm is None else (lambda t: norm.apply(t, stats, silu=True))
    return _produce(lambda a, b: _conv_rows(conv, pre(_halo(x, a, b)), a, b, H),
                    (*x.shape[:3], conv.weight.shape[0]), x.dtype, rows, next_norm, pace)


def _resnet(r, x, stats, rows: int, next_norm, pace: Pace):
    """One ResnetBlock: x and its norm1 statistics -> the output and next_norm's statistics."""
    H = x.shape[1]
    h, h_stats = _conv3(r.conv1, r.norm1, x, stats, rows, r.norm2, pace)

    def out(a, b):
        skip = r.conv_shortcut(_rows(x, a, b)) if "conv_shortcut" in r else _rows(x, a, b)
        return skip + _conv_rows(r.conv2, r.norm2.apply(_halo(h, a, b), h_stats, silu=True), a, b, H)

    return _produce(out, h.shape, x.dtype, rows, next_norm, pace)


def _upsample(up, x, stats, rows: int, next_norm, pace: Pace):
    """Nearest 2x then a 3x3 conv; `rows` counts output rows (even, so a strip starts on an
    input row). The input rows a strip reads are upsampled for that strip alone."""
    B, H, W, C = x.shape

    def out(a, b):
        lo, hi = max(a // 2 - 1, 0), min(b // 2 + 1, H)
        t = _nearest2x(_rows(x, lo, hi))  # output rows [2 lo, 2 hi)
        t = t[:, max(a - 1, 0) - 2 * lo:min(b + 1, 2 * H) - 2 * lo]
        return _conv_rows(up.conv, t, a, b, 2 * H)

    return _produce(out, (B, 2 * H, 2 * W, up.conv.weight.shape[0]), x.dtype, rows, next_norm, pace)


def _downsample(down, x, stats, rows: int, next_norm, pace: Pace):
    """A `vae.Downsample` (pads a zero row at the bottom, a stride-2 valid 3x3 conv): output
    rows [a, b) read input rows [2a, 2b + 1), the last of them the padding when b is the
    bottom, so the module itself runs on each strip's rows."""
    B, H, W, _ = x.shape
    return _produce(lambda a, b: down(_rows(x, 2 * a, min(2 * b + 1, H))),
                    (B, H // 2, W // 2, down.conv.weight.shape[0]), x.dtype, rows, next_norm, pace)


# Each kind of stage: how it runs in strips and its output's height per input row.
_KINDS = {"resnet": (_resnet, 1), "upsample": (_upsample, 2), "downsample": (_downsample, 0.5),
          "in": (lambda m, *a: _conv3(m.conv_in, None, *a), 1),
          "out": (lambda m, *a: _conv3(m.conv_out, m.conv_norm_out, *a), 1)}


def _stages(decoder) -> list[tuple[str, object]]:
    """The up path in order: ("resnet", block), ("upsample", upsampler), ("out", decoder)."""
    out = []
    for blk in decoder.up_blocks:
        out += [("resnet", r) for r in blk.resnets]
        if "upsamplers" in blk:
            out.append(("upsample", blk.upsamplers[0]))
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


def _run(stages, x, stats, strip: int, latent_rows: int, pace: Pace, last_norm=None):
    """x through `stages` in order, each in strips of `strip` rows at the latent's resolution
    (`latent_rows` high; k * strip rows at k times that), with the statistics of x that the
    first stage's input norm needs. Returns the last output, whole, and `last_norm`'s
    statistics."""
    for i, (kind, m) in enumerate(stages):
        fn, scale = _KINDS[kind]
        nxt = _input_norm(*stages[i + 1]) if i + 1 < len(stages) else last_norm
        x, stats = fn(m, x, stats, strip * int(x.shape[1] * scale) // latent_rows, nxt, pace)
    return x.whole(), stats


def decode_strips(decoder, z, strip: int, ex: Execution):
    """z [B, h, w, latent] (after post_quant_conv) -> the decoder's output [B, h*f, w*f, C]
    in z's dtype, in strips of `strip` latent rows (at a stage of k times the latent's
    resolution, k * strip rows). conv_in and the mid block run whole."""
    pace = ex.pace()
    return up_strips(decoder, decoder.mid(z, pace), strip, pace)


def up_strips(decoder, x, strip: int, pace: Pace):
    """The up path, conv_norm_out and conv_out over the mid block's output x, in strips."""
    stages = _stages(decoder)
    stats = _input_norm(*stages[0]).stats(x, pace)  # the first stage is a resnet
    return _run(stages, x, stats, strip, x.shape[1], pace)[0]


def encode_strips(encoder, x, strip: int, ex: Execution):
    """x [B, H, W, C] (the image in the encoder's dtype) -> the encoder's moments
    [B, H/f, W/f, 2 * latent], conv_in and the down path in strips of `strip` latent rows
    (k * strip rows at k times the latent's resolution); the mid block, conv_norm_out and
    conv_out run whole on the latent-resolution result."""
    pace = ex.pace()
    h, _ = _run(_down_stages(encoder), x, None, strip, x.shape[1] >> (len(encoder.down_blocks) - 1), pace)
    pace(h)
    return encoder.out(h, pace)


def _peak_held(held) -> int:
    """Elements held at once at the worst point of a run of stages, each given as (input,
    first tensor written, other tensors): a stage holds all three; two parts in flight, the
    stage before may still hold its input while a stage allocates its first tensor."""
    worst = max(sum(s) for s in held)
    return max([worst] + [prev[0] + s[0] + s[1] for prev, s in zip(held, held[1:])])


def held_bytes(config, height: int, width: int, dtype_bytes: int) -> int:
    """Bytes of the whole tensors `decode_strips` holds at once at its peak, for one
    `height` x `width` image. A resnet holds its input, conv1's output and its output; an
    upsampler its input and output. Two parts in flight, the stage before may still hold
    its input while a stage allocates its first tensor."""
    ch = tuple(reversed(config.decoder_channels))
    n = len(ch)
    px = lambda level: (height >> (n - 1 - level)) * (width >> (n - 1 - level))  # noqa: E731
    held = []  # (input, first tensor written, other tensors) of each stage, in elements
    for i, c in enumerate(ch):
        for j in range(config.layers_per_block + 1):
            held.append((px(i) * (ch[max(i - 1, 0)] if j == 0 else c), px(i) * c, px(i) * c))
        if i < n - 1:
            held.append((px(i) * c, px(i + 1) * c, 0))
    held.append((px(n - 1) * ch[-1], px(n - 1) * config.out_channels, 0))
    return _peak_held(held) * dtype_bytes


def encode_held_bytes(config, height: int, width: int, dtype_bytes: int) -> int:
    """Bytes of the whole tensors `encode_strips` holds at once at its peak, for one
    `height` x `width` image, as `held_bytes` counts them: conv_in holds the image and its
    output, a resnet its input, conv1's output and its output, a downsampler its input and
    output (at a quarter of the pixels)."""
    ch, n = config.block_out_channels, len(config.block_out_channels)
    px = lambda level: (height >> level) * (width >> level)  # noqa: E731
    held = [(px(0) * config.in_channels, px(0) * ch[0], 0)]
    for i, c in enumerate(ch):
        for j in range(config.layers_per_block):
            held.append((px(i) * (ch[max(i - 1, 0)] if j == 0 else c), px(i) * c, px(i) * c))
        if i < n - 1:
            held.append((px(i) * c, px(i + 1) * c, 0))
    return _peak_held(held) * dtype_bytes
