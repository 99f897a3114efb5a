"""What a 3x3 convolution holds beyond its input, weights and output, and how long it takes,
at the shapes a strip decode runs (rows of a 1024 px wide image) and whole, written several
equal ways: the strip step's valid convolution of a padded strip, the same with the padding
in the convolution, its input channels in two halves, its kernel as three one-row
convolutions, and in other dtypes. Each variant's output is compared with the first's.

    python examples/conv_scratch.py [--json PATH] [--rows 32 64 128] [--width 1024]

JSON lines on stdout; the list in --json (default $OUT/conv.json).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import mlx.core as mx
from profile_speed import JSON, record  # this folder: the script's own is first on the path



def plain(t, w):  # the strip step's way: rows [a - 1, b + 1) in, valid along rows
    return mx.conv2d(t, w, padding=(0, 1))


def halves(t, w):  # input channels in two halves, summed
    c = t.shape[-1] // 2
    return mx.conv2d(t[..., :c], w[..., :c], padding=(0, 1)) + mx.conv2d(t[..., c:], w[..., c:], padding=(0, 1))


def row_taps(t, w):  # three one-row convolutions over shifted rows, summed
    r = t.shape[1] - 2
    y = None
    for dy in range(3):
        p = mx.conv2d(t[:, dy:dy + r], w[:, dy:dy + 1], padding=(0, 1))
        y = p if y is None else y + p
    return y


def padded_in_conv(t, w):  # the conv pads the rows too: not equal at the cut, for its scratch only
    return mx.conv2d(t[:, 1:-1], w, padding=1)


VARIANTS = {"plain": plain, "halves": halves, "row_taps": row_taps, "padded_in_conv": padded_in_conv}


def measure(name, fn, t, w, ref=None, runs=7):
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    y = fn(t, w)
    mx.eval(y)
    mx.synchronize()
    del y
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    y = fn(t, w)
    mx.eval(y)
    mx.synchronize()
    peak = mx.get_peak_memory() - base
    out_bytes = y.nbytes
    err = None
    if ref is not None and name != "padded_in_conv":
        err = float(mx.max(mx.abs(y.astype(mx.float32) - ref.astype(mx.float32))))
    ts = []
    for _ in range(runs):
        s = time.perf_counter()
        mx.eval(fn(t, w))
        mx.synchronize()
        ts.append(time.perf_counter() - s)
    return y, dict(ms=round(1e3 * statistics.median(ts), 4), scratch_mb=round((peak - out_bytes) / 1e6, 2),
                   input_mb=round(t.nbytes / 1e6, 2), out_mb=round(out_bytes / 1e6, 2),
                   scratch_per_input=round((peak - out_bytes) / t.nbytes, 2), max_abs_diff=err)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--rows", nargs="+", type=int, default=[32, 64, 128])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    a = ap.parse_args()
    JSON[0] = a.json or os.path.join(os.environ.get("OUT", "/tmp"), "conv.json")
    record("device", device=str(mx.default_device()), mlx=mx.__version__)
    W = a.width
    shapes = [(256, 256), (256, 128), (128, 128)]  # (in, out) channels of the full-resolution convolutions
    for dname in a.dtypes:
        dt = getattr(mx, dname)
        for cin, cout in shapes:
            w = (mx.random.normal((cout, 3, 3, cin)) * 0.02).astype(dt)
            for rows in [*a.rows, W]:
                t = mx.random.normal((1, rows + 2, W, cin)).astype(dt)
                mx.eval(t, w)
                ref = None
                for vname, fn in VARIANTS.items():
                    if dname != "float16" and vname != "plain":
                        continue
                    if rows == W and vname in ("halves", "row_taps"):
                        continue
                    try:
                        y, r = measure(vname, fn, t, w, ref)
                        if ref is None:
                            ref = y
                        record("conv", dtype=dname, cin=cin, cout=cout, rows=rows, width=W, variant=vname, **r)
                    except Exception as e:  # one variant failing leaves the others
                        record("conv", dtype=dname, cin=cin, cout=cout, rows=rows, variant=vname, error=str(e)[:300])
                del t, ref
                gc.collect()


if __name__ == "__main__":
    main()
