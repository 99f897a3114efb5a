"""`python -m bonsai_mlx ...`: the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .config import PRESETS, TransformerConfig, preset
from .errors import BonsaiError


def _cmd_forward(args) -> None:
    """One transformer forward pass at the real input shapes on random weights."""
    import mlx.core as mx

    from .benchmark import DTYPES, klein_inputs, random_transformer

    cfg = preset(args.model)
    dt = DTYPES[args.dtype]
    t = time.perf_counter()
    model = random_transformer(cfg, dt, seed=args.seed)
    inputs = klein_inputs(cfg, args.width, args.height, args.text_tokens, dt, seed=args.seed)
    out = model(*inputs)
    mx.eval(out)
    print(f"{args.model} forward on {mx.default_device()}: output {list(out.shape)} {out.dtype}, "
          f"{time.perf_counter() - t:.1f} s, peak memory {mx.get_peak_memory() / 1e9:.2f} GB")


def _cmd_bench_forward(args) -> None:
    from .benchmark import bench_forward

    cfg = preset(args.model)
    result = bench_forward(cfg, args.width, args.height, args.text_tokens, args.dtype, runs=args.runs,
                           warmup=args.warmup)
    result["model"] = args.model
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _size(value: str) -> int:
    v = int(value)
    if v <= 0 or v % 16:
        raise argparse.ArgumentTypeError(f"{v} is not a positive multiple of 16")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bonsai_mlx",
        description="Bonsai Image 4B (FLUX.2 klein with binary/ternary weights) on MLX.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(sp, default="klein-4b"):
        sp.add_argument("--model", default=default, choices=sorted(PRESETS), help="architecture preset")
        sp.add_argument("--width", type=_size, default=512, help="image width in pixels (multiple of 16)")
        sp.add_argument("--height", type=_size, default=512, help="image height in pixels (multiple of 16)")
        sp.add_argument("--text-tokens", type=int, default=512, help="text sequence length")
        sp.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])

    f = sub.add_parser("forward", help="one transformer forward on random weights (smoke test, no download)")
    model_args(f)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=_cmd_forward)

    b = sub.add_parser("benchmark", help="measure speed and memory on random weights at the real shapes")
    bsub = b.add_subparsers(dest="what", required=True, metavar="WHAT")
    bf = bsub.add_parser("forward", help="time full-size transformer forwards")
    model_args(bf)
    bf.add_argument("--runs", type=int, default=1)
    bf.add_argument("--warmup", type=int, default=0)
    bf.add_argument("--json", help="also write the result to this file")
    bf.set_defaults(func=_cmd_bench_forward)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BonsaiError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        sys.exit(130)
