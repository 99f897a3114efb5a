"""The graph nodes a strip decode hands MLX, by primitive: every part the pacer evaluates is
written with `mx.export_to_dot` and its nodes counted, then evaluated (so a later part's
graph starts at the evaluated arrays). The full FLUX.2 decoder's up path on random weights,
float16, over a mid-block output of `--size` / 8 latent rows; strips count as in a plan
(`vae_strips.stage_rows`). Runs on any MLX back-end; on this project's CPU a 256 px decode in
8-row strips takes about a minute:

    python examples/strip_graph_nodes.py --size 256 --strip 8
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import tempfile

import mlx.core as mx

from bonsai_mlx import vae_strips
from bonsai_mlx.execution import Execution, Pace
from bonsai_mlx.random_weights import FLUX2_VAE
from bonsai_mlx.vae import Decoder, VAEConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--strip", type=int, default=8)
    args = ap.parse_args()
    cfg = VAEConfig(**{k: v for k, v in FLUX2_VAE.items() if k in VAEConfig.__dataclass_fields__})
    dec = Decoder(cfg)
    dec.set_dtype(mx.float16)
    mx.eval(dec.parameters())
    nodes, parts = collections.Counter(), [0]

    def count(self, *arrays, wait=()):
        parts[0] += 1
        fd, path = tempfile.mkstemp(suffix=".dot")
        os.close(fd)
        mx.export_to_dot(path, *arrays)
        with open(path) as f:
            nodes.update(m.group(1) for m in re.finditer(r'label\s*=\s*"([A-Za-z_]+)', f.read()))
        os.remove(path)
        mx.eval(*arrays)

    Pace.__call__ = count
    x = mx.random.normal((1, args.size // 8, args.size // 8, cfg.decoder_channels[-1])).astype(mx.float16)
    mx.eval(x)
    mx.eval(vae_strips.up_strips(dec, x, args.strip, Execution(sync=True, overlap=True).pace()))
    print(f"{parts[0]} parts, {sum(nodes.values())} nodes")
    for name, n in nodes.most_common():
        print(f"{n:6d}  {name}")


if __name__ == "__main__":
    main()
