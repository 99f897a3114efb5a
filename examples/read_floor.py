"""How fast this machine can bring a weights file into device memory (page cache warm): the
floor under a streamed text encoder's read for every new prompt. Host reads with 1-16
threads into one buffer, mx.load evaluated, and (where torch sees a GPU) a pinned host
buffer read then copied to the GPU.

    python examples/read_floor.py FILE [FILE ...] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
from profile_speed import JSON, record  # this folder: the script's own is first on the path
import numpy as np



def pread_into(path, buf, threads, chunk=64 << 20):
    n = len(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        mv = memoryview(buf)

        def one(off):
            end = min(off + chunk, n)
            while off < end:
                got = os.preadv(fd, [mv[off:end]], off)
                if got <= 0:
                    raise OSError("short read")
                off += got

        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(one, range(0, n, chunk)))
    finally:
        os.close(fd)


def best(fn, runs=3):
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--json")
    a = ap.parse_args()
    JSON[0] = a.json or os.path.join(os.environ.get("OUT", "/tmp"), "read.json")
    record("device", device=str(mx.default_device()), mlx=mx.__version__, cpus=os.cpu_count())
    for path in a.files:
        size = os.path.getsize(path)
        buf = np.empty(size, dtype=np.uint8)
        pread_into(path, buf, 8)  # the page cache warm, the buffer's pages touched
        for threads in (1, 4, 8, 16):
            s = best(lambda: pread_into(path, buf, threads))
            record("host pread", file=os.path.basename(path), gb=size / 1e9, threads=threads, s=round(s, 4),
                   gb_s=round(size / 1e9 / s, 2))

        def mlx_load():
            w = mx.load(path)
            mx.eval(w)
            mx.synchronize()
            del w
            mx.clear_cache()

        s = best(mlx_load)
        record("mx.load evaluated", file=os.path.basename(path), gb=size / 1e9, s=round(s, 4), gb_s=round(size / 1e9 / s, 2))
        try:
            import torch
            if torch.cuda.is_available():
                pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
                dev = torch.empty(size, dtype=torch.uint8, device="cuda")
                view = pinned.numpy()
                pread_into(path, view, 8)

                def pinned_copy():
                    pread_into(path, view, 8)
                    dev.copy_(pinned, non_blocking=True)
                    torch.cuda.synchronize()

                def copy_only():
                    dev.copy_(pinned, non_blocking=True)
                    torch.cuda.synchronize()

                for name, fn in (("pinned read + H2D, 8 threads", pinned_copy), ("H2D from pinned alone", copy_only)):
                    s = best(fn)
                    record(name, file=os.path.basename(path), gb=size / 1e9, s=round(s, 4),
                           gb_s=round(size / 1e9 / s, 2))
                del pinned, dev
        except ImportError:
            pass


if __name__ == "__main__":
    main()
