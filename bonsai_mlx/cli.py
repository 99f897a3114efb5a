"""`python -m bonsai_mlx ...`: the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import PRESETS, preset
from .errors import BonsaiError
from .shapes.scenes import evaluation_specs


def _cmd_forward(args) -> None:
    """One transformer forward pass at the real input shapes on random weights."""
    from .benchmark import bench_forward

    r = bench_forward(preset(args.model), args.width, args.height, args.text_tokens, args.dtype, seed=args.seed,
                      log=lambda *_: None)
    print(f"{args.model} forward on {r['device']}: {r['image_tokens']} image + {r['text_tokens']} text tokens, "
          f"{r['median_s']:.1f} s, peak memory {r['peak_memory_bytes'] / 1e9:.2f} GB")


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


class ProgressBar:
    """One line on stderr, redrawn in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, label: str, stream=sys.stderr, width: int = 24):
        self.total, self.label, self.stream, self.width = total, label, stream, width
        self.tty = stream.isatty()

    def update(self, step: int, extra: str = "") -> None:
        done = int(self.width * step / self.total)
        line = f"{self.label} [{'#' * done}{'.' * (self.width - done)}] {step}/{self.total} {extra}"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and step == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _output_paths(output: str, count: int) -> list[Path]:
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise BonsaiError(f"output {output!r} must end in .png (images are written as PNG with their settings)")
    if not out.parent.exists():
        raise BonsaiError(f"the folder {out.parent} does not exist; create it first")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(count)]


def _cmd_generate(args) -> None:
    import mlx.core as mx

    from .benchmark import DTYPES
    from .memory import describe
    from .pipeline import BonsaiPipeline, GenerationResult, check_size

    check_size(args.width, args.height)  # before loading anything
    paths = _output_paths(args.output, args.count)
    if args.preview_dir:
        Path(args.preview_dir).mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    pipe = BonsaiPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype], vae=args.vae,
                                          quantize=args.quantize, backend=args.backend,
                                          memory_budget=args.memory_budget)
    plan = pipe.plan(args.width, args.height)  # refuses now, before any image work, if the budget is too small
    if args.verbose:
        est = ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in plan.stage_estimates.items())
        print(f"memory plan: {describe(plan)}" + (f" (estimated peaks: {est})" if est else ""), file=sys.stderr)
        print(f"loaded {args.model} in {time.perf_counter() - t:.1f} s on {mx.default_device()}", file=sys.stderr)
    seed = args.seed
    for n, path in enumerate(paths):
        run_seed = None if seed is None else seed + n
        stream = pipe.stream(args.prompt, width=args.width, height=args.height, steps=args.steps, seed=run_seed,
                             guidance=args.guidance, negative_prompt=args.negative_prompt,
                             preview=bool(args.preview_dir))
        bar = None
        for event in stream:
            if isinstance(event, GenerationResult):
                event.save(path)
                print(f"wrote {path} (seed {event.seed}, {event.timings['total_s']:.1f} s)")
                if args.verbose:
                    print(f"timings: {json.dumps(event.timings)}", file=sys.stderr)
                    mem = event.memory
                    print(f"memory: peak {mem['peak_gb']:.3f} GB, mean-active {mem['mean_active_gb']:.3f} GB", file=sys.stderr)
                    for name, st in mem["stages"].items():
                        print(f"  {name}: {st['seconds']:.2f} s, peak {st['peak_gb']:.3f} GB, "
                              f"mean-active {st['mean_active_gb']:.3f} GB", file=sys.stderr)
                continue
            bar = bar or ProgressBar(event.steps, f"image {n + 1}/{len(paths)}")
            bar.update(event.step, f"sigma {event.sigma_next:.3f} {event.elapsed:.1f}s")
            if event.preview is not None:
                event.preview.save(Path(args.preview_dir) / f"{path.stem}-step{event.step:03d}.png")


def _cmd_bench_generate(args) -> None:
    import tempfile

    from .benchmark import bench_generate

    root = args.dir or tempfile.mkdtemp(prefix="bonsai-bench-")
    result = bench_generate(root, fmts=args.formats, sizes=args.sizes, steps=args.steps, dtype=args.dtype,
                            budgets=args.budgets, generations=args.generations,
                            checkpoint=(lambda r: Path(args.json).write_text(json.dumps(r, indent=2, default=str)))
                            if args.json else None)
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)


def _cmd_convert(args) -> None:
    from .benchmark import DTYPES
    from .packed_checkpoint import convert_pipeline

    out = convert_pipeline(args.source, args.output, args.format, overwrite=args.overwrite, dtype=DTYPES[args.dtype])
    print(f"wrote {out}")


def _cmd_export(args) -> None:
    from .benchmark import DTYPES
    from .export import export_bundle

    out = export_bundle(args.source, args.output, args.format, text_bits=args.text_encoder_bits, vae=args.vae,
                        dtype=DTYPES[args.dtype], test_vectors=args.test_vectors, overwrite=args.overwrite,
                        text_layers=tuple(args.text_layers))
    print(f"wrote {out}")


def _cmd_verify(args) -> None:
    from .bundle import verify

    m = verify(args.bundle)
    print(f"{args.bundle}: {len(m['files'])} files, sizes, sha256 and tensors match the manifest")


def _cmd_eval_shapes(args) -> None:
    from .benchmark import DTYPES
    from .shapes.evaluate import eval_shapes

    report = eval_shapes(args.model, args.out, count=args.count, seed=args.seed, size=args.size, steps=args.steps,
                         guidance=args.guidance, dtype=DTYPES[args.dtype], quantize=args.quantize,
                         log=lambda line: print(line, file=sys.stderr))
    cats = ", ".join(f"{c} {v['score']:.3f}" for c, v in report["categories"].items())
    print(f"overall {report['overall']:.3f} over {report['images']} images ({cats}); wrote {args.out}/report.json "
          f"and {args.out}/grid.png")


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

    g = sub.add_parser(
        "generate", help="text to image",
        description="Generate an image from a text prompt. The model is a local directory (a Bonsai pack or a "
                    "diffusers FLUX.2 klein folder), a Hugging Face repo id, or one of: "
                    "bonsai-binary, bonsai-ternary. Downloads go to the Hugging Face cache; set HF_HUB_OFFLINE=1 "
                    "to use only what is cached.",
        epilog='example: python -m bonsai_mlx generate "a bonsai tree at dawn" -o bonsai.png --seed 7',
    )
    g.add_argument("prompt", help="what to draw")
    g.add_argument("-o", "--output", default="bonsai.png", help="PNG to write (with --count N: NAME-1.png ...)")
    g.add_argument("--model", default="bonsai-binary", help="model directory, repo id or name (default: bonsai-binary)")
    g.add_argument("--width", type=_size, default=512, help="pixels, a multiple of 16 in 64..2048 (default 512)")
    g.add_argument("--height", type=_size, default=512, help="pixels, a multiple of 16 in 64..2048 (default 512)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: 4 distilled, 50 base)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: random; printed)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance for base models (default 4.0); distilled models ignore it")
    g.add_argument("--negative-prompt", default=None, help="what to steer away from (base models with guidance)")
    g.add_argument("--count", type=int, default=1, help="number of images, seeds counting up from --seed")
    g.add_argument("--preview-dir", default=None, help="save a small preview after every step into this folder")
    g.add_argument("--vae", default=None, help="VAE directory, for packs that ship none")
    g.add_argument("--quantize", choices=["binary", "ternary", "ternary2"], default=None,
                   help="pack a dense transformer's block linears on load")
    g.add_argument("--backend", default="auto", choices=["auto", "reference", "metal", "cuda"],
                   help="packed matmul kernels (default: by device)")
    g.add_argument("--memory-budget", default="auto",
                   help="'auto' (default: frugal at no cost in time, capped by this device's memory), a size such "
                        "as 1.5GB (stream the text encoder, release models between stages, chunk and tile as "
                        "needed; refused up front if impossible), or 'none' (everything resident: fastest, "
                        "uses the most memory)")
    g.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"],
                   help="transformer and text encoder precision (default bfloat16; the VAE runs in float16)")
    g.add_argument("-v", "--verbose", action="store_true", help="print the memory plan, timings and memory per stage")
    g.set_defaults(func=_cmd_generate)

    c = sub.add_parser(
        "convert", help="pack a model's transformer into our binary/ternary format",
        description="Convert a FLUX.2 klein pipeline (diffusers directory, or a PrismML MLX pack) into a pack in "
                    "our native format: the 100 block linears packed with no bias (binary 1.125 bits/weight, ternary "
                    "5 trits per byte), the rest copied. A dense transformer is quantized (rules in docs/formats.md); "
                    "an official pack converts losslessly.")
    c.add_argument("source", help="pipeline or pack directory")
    c.add_argument("output", help="new directory to write")
    c.add_argument("--format", default="binary", choices=["binary", "ternary", "ternary2"])
    c.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    c.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"],
                   help="precision of the weights that stay unpacked (default bfloat16)")
    c.set_defaults(func=_cmd_convert)

    e = sub.add_parser(
        "export", help="write a bundle for Swift/iOS apps (stock mlx-swift)",
        description="Export a model (official pack, our pack, or a diffusers directory) as a bundle an app loads "
                    "with no Python: per-component safetensors in MLX layouts, the Metal kernels and their launch "
                    "description, the tokenizer, and manifest.json with every file's size and sha256. The format is "
                    "docs/export-format.md.")
    e.add_argument("source", help="model directory, known name or repo id")
    e.add_argument("output", help="bundle directory to write (written whole or not at all)")
    e.add_argument("--format", default="binary", choices=["binary", "ternary"],
                   help="packing of the transformer's block linears (dense sources are quantized)")
    e.add_argument("--text-encoder-bits", type=int, default=4, choices=[4, 8, 16],
                   help="MLX affine bits of the text encoder (16: unquantized)")
    e.add_argument("--vae", default="full", choices=["full", "small"], help="small: the decoder only")
    e.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"],
                   help="precision of the weights that stay 16-bit")
    e.add_argument("--text-layers", type=int, nargs="+", default=[9, 18, 27], help=argparse.SUPPRESS)
    e.add_argument("--test-vectors", action="store_true", help="add small inputs and expected outputs for a port")
    e.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    e.set_defaults(func=_cmd_export)

    v = sub.add_parser("verify", help="check a bundle against its manifest (sizes, hashes, tensors, paths)")
    v.add_argument("bundle")
    v.set_defaults(func=_cmd_verify)

    es = sub.add_parser(
        "eval-shapes", help="score a model on the held-out prompts of the coloured-shapes task",
        description="Generate one image per held-out prompt of the shapes task (GenEval-like categories: single "
                    "object, two objects, counting, colours, position, colour attribution) with seeds SEED, "
                    "SEED+1, ..., score each by image analysis, and write report.json, grid.png and the images "
                    "into OUT. Rules and split: docs/quality.md.")
    es.add_argument("--model", default="bonsai-binary", help="model directory, repo id or name (default: bonsai-binary)")
    held_out = len(evaluation_specs())
    es.add_argument("--count", type=int, default=held_out,
                    help=f"evaluate the first N prompts, categories interleaved (default: all {held_out})")
    es.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    es.add_argument("--out", default="eval-shapes", help="output folder (default: eval-shapes)")
    es.add_argument("--size", type=_size, default=128, help="image side in pixels (default 128, the task's size)")
    es.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    es.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    es.add_argument("--quantize", choices=["binary", "ternary", "ternary2"], default=None,
                    help="pack a dense transformer's block linears on load")
    es.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    es.set_defaults(func=_cmd_eval_shapes)

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
    bg = bsub.add_parser("generate", help="full generations on random weights at the real shapes (no download)",
                         description="Writes random Bonsai packs (4B DiT packed binary/ternary, Qwen3-4B 4-bit, "
                                     "FLUX.2 VAE) to disk, loads them like real weights and generates, reporting "
                                     "per-stage time, peak and mean-active memory.")
    bg.add_argument("--formats", nargs="+", default=["binary", "ternary"], choices=["binary", "ternary"])
    bg.add_argument("--sizes", nargs="+", type=_size, default=[512, 1024])
    bg.add_argument("--steps", type=int, default=4)
    bg.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    bg.add_argument("--budgets", nargs="+", default=["auto", "target", "none"],
                    help="memory budgets to run, each with a fresh pipeline: 'auto' (the default plan), 'target' "
                         "(the peak target per format and size: binary 1.5 / 1.9 GB, ternary 1.8 / 2.2 GB at "
                         "512 / 1024), 'none', or sizes like 1.5GB")
    bg.add_argument("--generations", type=int, default=2,
                    help="generations per budget (new prompt each); the first includes the cold start")
    bg.add_argument("--dir", help="where to write the random packs (reused if present; default: a temp dir)")
    bg.add_argument("--json", help="also write the result to this file")
    bg.set_defaults(func=_cmd_bench_generate)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "count", 1) < 1:
        build_parser().error("--count must be at least 1")
    try:
        args.func(args)
    except BonsaiError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        sys.exit(130)
