"""Strip decoding: the VAE decoder's up path stage by stage over the whole image, each
stage evaluated in horizontal strips of rows, equal to the whole decode up to float rounding.

A stage (a resnet, an upsampler, the final norm + conv_out) reads a tensor held whole and
writes its output, held whole, strip by strip: a strip's 3x3 convolution reads one row of
its input above and below (the halo), taken from the held input, so nothing at the cut
differs from the whole decode. A resnet holds one more whole tensor, conv1's output: its
GroupNorm (norm2) needs statistics over the whole of it before conv2 can run, and holding
it costs one tensor where recomputing it would cost a third convolution per resnet.
GroupNorm statistics of every held tensor are merged strip by strip as it is written, so
no pass over a whole tensor and no full-size float32 copy is needed.

Held at once, at most: a stage's input, conv1's output and the stage's output (for the
FLUX.2 VAE the first resnet of the last block: 256 + 128 + 128 channels at full
resolution, 1 GB at 1024x1024 in float16; `held_bytes`), plus one or two strips'
temporaries. The mid block (attention over all positions) runs whole: it works at 1/8
resolution. Everything here is channels-last, [B, H, W, C].
"""

from __future__ import annotations

import mlx.core as mx

from .execution import Execution, Pace, TokenBuffer


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
    return x[:, max(a - 1, 0):min(b + 1, x.shape[1])]


def _nearest2x(x):
    B, H, W, C = x.shape
    return mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)


def _produce(fn, shape, dtype, rows: int, norm, pace: Pace):
    """A tensor of `shape` held whole, written strip by strip: fn(a, b) gives rows [a, b).
    With `norm` (the GroupNorm that reads it next), also its whole-image statistics for
    that norm, merged from each strip's own. Each strip is evaluated as it is written."""
    out, acc = TokenBuffer(shape, dtype), []
    for a, b in spans(shape[1], rows):
        part = fn(a, b)
        out.write(a, b, part)
        if norm is not None:
            mean, var = norm.stats(part)
            n = part.shape[1] * part.shape[2] * (part.shape[3] // norm.groups)
            merge_moments(acc, n, mean, var * n)
        pace(out.value, *acc)
    if norm is None:
        return out.value, None
    n, mean, m2 = acc
    return out.value, (mean, m2 / n)


def _resnet(r, x, stats, rows: int, next_norm, pace: Pace):
    """One ResnetBlock: x and its norm1 statistics -> the output and next_norm's statistics."""
    B, H, W, _ = x.shape
    cout = r.conv1.weight.shape[0]
    h, h_stats = _produce(lambda a, b: _conv_rows(r.conv1, r.norm1.apply(_halo(x, a, b), stats, silu=True), a, b, H),
                          (B, H, W, cout), x.dtype, rows, r.norm2, pace)

    def out(a, b):
        skip = r.conv_shortcut(x[:, a:b]) if "conv_shortcut" in r else x[:, a:b]
        return skip + _conv_rows(r.conv2, r.norm2.apply(_halo(h, a, b), h_stats, silu=True), a, b, H)

    return _produce(out, (B, H, W, cout), x.dtype, rows, next_norm, pace)


def _upsample(up, x, rows: int, next_norm, pace: Pace):
    """Nearest 2x then a 3x3 conv; `rows` counts output rows (even, so a strip starts on an
    input row). The input rows a strip reads are upsampled for that strip alone."""
    B, H, W, C = x.shape

    def out(a, b):
        lo, hi = max(a // 2 - 1, 0), min(b // 2 + 1, H)
        t = _nearest2x(x[:, lo:hi])  # output rows [2 lo, 2 hi)
        t = t[:, max(a - 1, 0) - 2 * lo:min(b + 1, 2 * H) - 2 * lo]
        return _conv_rows(up.conv, t, a, b, 2 * H)

    return _produce(out, (B, 2 * H, 2 * W, up.conv.weight.shape[0]), x.dtype, rows, next_norm, pace)


def _stages(decoder) -> list[tuple[str, object]]:
    """The up path in order: ("resnet", block), ("upsample", upsampler), ("out", decoder)."""
    out = []
    for blk in decoder.up_blocks:
        out += [("resnet", r) for r in blk.resnets]
        if "upsamplers" in blk:
            out.append(("upsample", blk.upsamplers[0]))
    return out + [("out", decoder)]


def _input_norm(kind: str, m):
    """The GroupNorm that reads a stage's input first (None: an upsampler reads it raw)."""
    return {"resnet": lambda: m.norm1, "out": lambda: m.conv_norm_out}.get(kind, lambda: None)()


def decode_strips(decoder, z, strip: int, ex: Execution):
    """z [B, h, w, latent] (after post_quant_conv) -> the decoder's output [B, h*f, w*f, C]
    in z's dtype, in strips of `strip` latent rows (at a stage of k times the latent's
    resolution, k * strip rows). conv_in and the mid block run whole."""
    pace = ex.pace()
    return up_strips(decoder, decoder.mid(z, pace), strip, pace)


def up_strips(decoder, x, strip: int, pace: Pace):
    """The up path, conv_norm_out and conv_out over the mid block's output x, in strips."""
    H0 = x.shape[1]
    stages = _stages(decoder)
    stats = _input_norm(*stages[0]).stats(x, pace)  # the first stage is a resnet
    for i, (kind, m) in enumerate(stages[:-1]):
        nxt = _input_norm(*stages[i + 1])
        if kind == "resnet":
            x, stats = _resnet(m, x, stats, strip * x.shape[1] // H0, nxt, pace)
        else:
            x, stats = _upsample(m, x, strip * 2 * x.shape[1] // H0, nxt, pace)
    d, H = decoder, x.shape[1]

    def out(a, b):
        return _conv_rows(d.conv_out, d.conv_norm_out.apply(_halo(x, a, b), stats, silu=True), a, b, H)

    return _produce(out, (*x.shape[:3], d.conv_out.weight.shape[0]), x.dtype, strip * H // H0, None, pace)[0]


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
    worst = max(sum(s) for s in held)
    worst = max([worst] + [prev[0] + s[0] + s[1] for prev, s in zip(held, held[1:])])
    return worst * dtype_bytes
