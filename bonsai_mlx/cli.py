"""`python -m bonsai_mlx ...`: the command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

from .config import PRESETS, preset
from .errors import BonsaiError
from .shapes.scenes import evaluation_specs
from .validate import MAX_SEED, MAX_STEPS

MAX_COUNT = 10_000  # images per generate command


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

    def __init__(self, total: int, label: str, stream=None, width: int = 24):
        # the stderr of the moment, not of the import (a caller may have replaced it since)
        self.total, self.label, self.stream, self.width = total, label, stream or sys.stderr, width
        self.tty = self.stream.isatty()

    def update(self, step: int, extra: str = "") -> None:
        done = int(self.width * step / self.total)
        line = f"{self.label} [{'#' * done}{'.' * (self.width - done)}] {step}/{self.total} {extra}"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and step == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _output_paths(output: str, count: int, seed: int | None) -> list[Path]:
    out = Path(output).expanduser()
    if out.is_dir():
        raise BonsaiError(f"{output} is a folder; -o names the PNG file to write, such as {out / 'bonsai.png'}")
    if out.suffix.lower() != ".png":
        raise BonsaiError(f"output {output!r} must end in .png (images are written as PNG with their settings)")
    if not out.parent.is_dir():
        raise BonsaiError(f"the folder {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise BonsaiError(f"the folder {out.parent} is not writable")
    if seed is not None and seed + count - 1 > MAX_SEED:
        raise BonsaiError(f"--seed {seed} with --count {count} runs past the largest seed {MAX_SEED}")
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(count)]
    for p in paths:
        if p.is_dir():
            raise BonsaiError(f"{p} is a folder; -o names the PNG file to write")
    return paths


def _preview_dir(name: str | None) -> Path | None:
    if not name:
        return None
    d = Path(name).expanduser()
    if os.path.lexists(d) and not d.is_dir():
        raise BonsaiError(f"--preview-dir {name} exists and is not a folder")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BonsaiError(f"cannot create the preview folder {name}: {e.strerror}") from None
    return d


def lora_arg(value: str) -> tuple[str, float]:
    """PATH or PATH:SCALE (the scale after the last colon, when it is a number)."""
    path, sep, scale = value.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return value, 1.0


# What a JSON line of a prompt file may set, and the type each value must have.
JOB_KEYS = {"prompt": str, "seed": int, "width": int, "height": int, "steps": int, "guidance": (int, float),
            "negative_prompt": str, "image": (str, list), "init_image": str, "mask": str,
            "strength": (int, float), "output": str}


def read_prompt_file(path: str) -> list[dict]:
    """One job per line: plain text is a prompt; a line starting with '{' is a JSON object
    with the keys of JOB_KEYS. Blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise BonsaiError(f"cannot read the prompt file {path} ({e.strerror})") from None
    jobs = []
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if not text.startswith("{"):
            jobs.append({"prompt": text, "line": n})
            continue
        try:
            job = json.loads(text)
        except json.JSONDecodeError as e:
            raise BonsaiError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(job, dict) or not isinstance(job.get("prompt"), str):
            raise BonsaiError(f"{path}:{n}: a JSON line must be an object with a \"prompt\" string")
        for key, value in job.items():
            if key not in JOB_KEYS:
                raise BonsaiError(f"{path}:{n}: unknown key {key!r}; known: {', '.join(JOB_KEYS)}")
            if not isinstance(value, JOB_KEYS[key]) or isinstance(value, bool):
                raise BonsaiError(f"{path}:{n}: {key} has the wrong type ({type(value).__name__})")
        jobs.append({**job, "line": n})
    if not jobs:
        raise BonsaiError(f"the prompt file {path} has no prompts")
    return jobs


def _jobs(args) -> list[dict]:
    """Every generation of this command, checked before the model loads: [(settings, path)]."""
    from .images import prepare_edit
    from .pipeline import check_size

    base = {"seed": args.seed, "width": args.width, "height": args.height, "steps": args.steps,
            "guidance": args.guidance, "negative_prompt": args.negative_prompt, "image": args.image,
            "init_image": args.init_image, "mask": args.mask, "strength": args.strength}
    if args.prompt_file:
        if args.prompt is not None:
            raise BonsaiError("give a prompt or --prompt-file, not both")
        entries = read_prompt_file(args.prompt_file)
    elif args.prompt is None:
        raise BonsaiError("no prompt: give one, or --prompt-file FILE")
    else:
        entries = [{"prompt": args.prompt}]
    out = Path(args.output)
    jobs = []
    for i, entry in enumerate(entries):
        job = {**base, **{k: v for k, v in entry.items() if k != "line"}}
        where = f"{args.prompt_file}:{entry['line']}: " if args.prompt_file else ""
        if "seed" not in entry and args.seed is not None:
            job["seed"] = args.seed + i * args.count  # each image of the run its own seed
        try:  # the images are read and checked now, before the model loads
            edit = prepare_edit(job["image"], job["init_image"], job["mask"], job["strength"], job["width"],
                                job["height"])
            check_size(edit.width or 512, edit.height or 512)
        except BonsaiError as e:
            raise BonsaiError(f"{where}{e}") from None
        name = entry.get("output") or (str(out) if len(entries) == 1 else
                                       str(out.with_name(f"{out.stem}-{i + 1:03d}{out.suffix}")))
        paths = _output_paths(name, args.count, job["seed"])
        for k, path in enumerate(paths):
            jobs.append(({**job, "seed": None if job["seed"] is None else job["seed"] + k}, path))
    return jobs


EDIT_KEYS = ("image", "init_image", "mask")


def _cmd_generate(args) -> None:
    import mlx.core as mx

    from .benchmark import DTYPES
    from .memory import describe, parse_budget
    from .pipeline import BonsaiPipeline, GenerationResult
    from .results import write_png

    parse_budget(args.memory_budget)
    jobs = _jobs(args)  # every prompt, size and image checked before loading anything
    previews = _preview_dir(args.preview_dir)
    t = time.perf_counter()
    pipe = BonsaiPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype], vae=args.vae,
                                          quantize=args.quantize, backend=args.backend,
                                          memory_budget=args.memory_budget, lora=args.lora)
    if args.verbose:
        print(f"loaded {args.model} in {time.perf_counter() - t:.1f} s on {mx.default_device()}", file=sys.stderr)
    for n, (job, path) in enumerate(jobs):
        if len(jobs) > 1 and not any(job[k] for k in EDIT_KEYS):
            # the next prompts of generations like this one in one encode: a streamed text
            # encoder is read once for all of them (nothing where this prompt is kept already)
            same = [j["prompt"] for j, _ in jobs[n:] if all(j[k] == job[k] for k in ("width", "height", "guidance"))
                    and not any(j[k] for k in EDIT_KEYS)]
            pipe.encode_prompts(same, job["width"], job["height"], job["guidance"])
        settings = {k: job[k] for k in ("width", "height", "steps", "seed", "guidance", "negative_prompt")}
        edit = {k: job[k] for k in ("image", "init_image", "mask", "strength")}
        stream = pipe.stream(job["prompt"], **settings, preview=previews is not None, **edit)
        bar = None
        for event in stream:
            if isinstance(event, GenerationResult):
                event.save(path)
                print(f"wrote {path} (seed {event.seed}, {event.timings['total_s']:.1f} s)")
                if args.verbose:
                    _report(event, describe)
                continue
            bar = bar or ProgressBar(event.steps, f"image {n + 1}/{len(jobs)}")
            bar.update(event.step, f"sigma {event.sigma_next:.3f} {event.elapsed:.1f}s")
            if event.preview is not None:
                write_png(event.preview, previews / f"{path.stem}-step{event.step:03d}.png")


def _report(result, describe) -> None:
    est = ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in result.plan.stage_estimates.items())
    print(f"memory plan: {describe(result.plan)}" + (f" (estimated peaks: {est})" if est else ""), file=sys.stderr)
    print(f"timings: {json.dumps(result.timings)}", file=sys.stderr)
    mem = result.memory
    print(f"memory: peak {mem['peak_gb']:.3f} GB, mean-active {mem['mean_active_gb']:.3f} GB, "
          f"active+cached (sampled) {mem['sampled_footprint_gb']:.3f} GB", file=sys.stderr)
    for name, st in mem["stages"].items():
        print(f"  {name}: {st['seconds']:.2f} s, peak {st['peak_gb']:.3f} GB, "
              f"mean-active {st['mean_active_gb']:.3f} GB", file=sys.stderr)


def _json_writer(path):
    """Writes a result to `path` (None: nothing), after every run and at the end."""
    return (lambda r: Path(path).write_text(json.dumps(r, indent=2, default=str))) if path else None


def _cmd_bench_generate(args) -> None:
    import tempfile

    from .benchmark import bench_generate

    root = args.dir or tempfile.mkdtemp(prefix="bonsai-bench-")
    save = _json_writer(args.json)
    result = bench_generate(root, fmts=args.formats, sizes=args.sizes, steps=args.steps, dtype=args.dtype,
                            budgets=args.budgets, generations=args.generations, checkpoint=save)
    print(json.dumps(result, indent=2, default=str))
    if save:
        save(result)


def _cmd_bench_edit(args) -> None:
    import tempfile

    from .benchmark import EDIT_CASES, bench_edit, edit_table
    from .safe_files import read_json

    if args.table:  # render a result written earlier; run nothing
        print(edit_table(read_json(Path(args.table), "benchmark result")))
        return
    save = _json_writer(args.json)
    root = args.dir or tempfile.mkdtemp(prefix="bonsai-bench-")
    result = bench_edit(root, fmt=args.format, sizes=args.sizes, steps=args.steps, dtype=args.dtype,
                        budgets=args.budgets, cases=args.cases or tuple(EDIT_CASES), strength=args.strength,
                        generations=args.generations, checkpoint=save, log=lambda line: print(line, file=sys.stderr))
    if save:
        save(result)
    print(edit_table(result))


def _cmd_convert(args) -> None:
    from .benchmark import DTYPES
    from .convert import convert_pipeline

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
    v = _int_in(value, 1, 1 << 20, "a size")
    if v % 16:
        raise argparse.ArgumentTypeError(f"{v} is not a positive multiple of 16")
    return v


def _int_in(value: str, lo: int, hi: int, what: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if not lo <= v <= hi:
        raise argparse.ArgumentTypeError(f"{what} must be in {lo}..{hi}, got {v}")
    return v


def _count(value: str) -> int:
    return _int_in(value, 1, MAX_COUNT, "--count")


def _seed(value: str) -> int:
    return _int_in(value, 0, MAX_SEED, "--seed")


def _steps(value: str) -> int:
    return _int_in(value, 1, MAX_STEPS, "--steps")


def _positive(value: str) -> int:
    return _int_in(value, 1, 1 << 20, "the value")


def _non_negative(value: str) -> int:
    return _int_in(value, 0, 1 << 20, "the value")


def _guidance(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"guidance must be a finite number >= 0, got {value}")
    return v


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit code 2, like every other user error."""

    def error(self, message: str):
        _fail(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m bonsai_mlx",
        description="Bonsai Image 4B (FLUX.2 klein with binary/ternary weights) on MLX.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def model_args(sp, default="klein-4b"):
        sp.add_argument("--model", default=default, choices=sorted(PRESETS), help="architecture preset")
        sp.add_argument("--width", type=_size, default=512, help="image width in pixels (multiple of 16)")
        sp.add_argument("--height", type=_size, default=512, help="image height in pixels (multiple of 16)")
        sp.add_argument("--text-tokens", type=_positive, default=512, help="text sequence length")
        sp.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])

    g = sub.add_parser(
        "generate", help="text to image",
        description="Generate an image from a text prompt. The model is a local directory (a Bonsai pack or a "
                    "diffusers FLUX.2 klein folder), a Hugging Face repo id, or one of: "
                    "bonsai-binary, bonsai-ternary, demo, demo-ternary (small coloured-shapes models inside the package: "
                    "no download). "
                    "Downloads go to the Hugging Face cache; set HF_HUB_OFFLINE=1 to use only what is cached.",
        epilog='example: python -m bonsai_mlx generate "an image of a red circle left of a blue square" --model demo\n'
               '  python -m bonsai_mlx generate "a bonsai tree at dawn" -o bonsai.png --seed 7\n'
               '  python -m bonsai_mlx generate "make it autumn" --image tree.png --vae VAE_DIR -o autumn.png\n'
               '  python -m bonsai_mlx generate "a koi pond" --init-image garden.png --mask pond.png --strength 0.9\n'
               '  python -m bonsai_mlx generate --prompt-file prompts.jsonl --lora style.safetensors:0.8 -o out.png',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("prompt", nargs="?", default=None, help="what to draw (or use --prompt-file)")
    g.add_argument("-o", "--output", default="bonsai.png",
                   help="PNG to write (with --count N: NAME-1.png ...; with --prompt-file: NAME-001.png ...)")
    g.add_argument("--prompt-file", default=None,
                   help="run many prompts with one load of the model: one prompt per line, or JSON lines with "
                        '"prompt" and any of seed, width, height, steps, guidance, negative_prompt, image, '
                        "init_image, mask, strength, output; blank and '#' lines are skipped")
    g.add_argument("--model", default="bonsai-binary", help="model directory, repo id or name (default: bonsai-binary)")
    g.add_argument("--width", type=_size, default=None,
                   help="pixels, a multiple of 16 in 64..2048 (default: the first reference image's width, else "
                        "the model's: 512 for klein, 128 for demo)")
    g.add_argument("--height", type=_size, default=None,
                   help="pixels, a multiple of 16 in 64..2048 (default: the first reference image's height, else "
                        "the model's: 512 for klein, 128 for demo)")
    g.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="reference image to edit from or combine (repeatable); at least 64 px a side")
    g.add_argument("--init-image", default=None, metavar="PATH",
                   help="image to start from (image to image; with --mask, inpainting); sets the output size")
    g.add_argument("--mask", default=None, metavar="PATH",
                   help="inpainting mask, the init image's size: white is repainted, black kept")
    g.add_argument("--strength", type=float, default=None,
                   help="how much of the init image is repainted, 0..1 (default 0.8; 1 starts from pure noise)")
    g.add_argument("--lora", action="append", default=None, type=lora_arg, metavar="PATH[:SCALE]",
                   help="LoRA file (diffusers, PEFT, BFL/ai-toolkit or kohya keys) and its scale (default 1); "
                        "repeatable, the LoRAs add up")
    g.add_argument("--steps", type=_steps, default=None,
                   help=f"denoising steps, 1..{MAX_STEPS} (default: 4 distilled, 50 base)")
    g.add_argument("--seed", type=_seed, default=None, help="random seed, 0..2**64-1 (default: random; printed)")
    g.add_argument("--guidance", type=_guidance, default=None,
                   help="classifier-free guidance for base models (default 4.0); distilled models ignore it")
    g.add_argument("--negative-prompt", default=None, help="what to steer away from (base models with guidance)")
    g.add_argument("--count", type=_count, default=1,
                   help=f"number of images, 1..{MAX_COUNT}, seeds counting up from --seed")
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
    f.add_argument("--seed", type=_seed, default=0)
    f.set_defaults(func=_cmd_forward)

    b = sub.add_parser("benchmark", help="measure speed and memory on random weights at the real shapes")
    bsub = b.add_subparsers(dest="what", required=True, metavar="WHAT")
    bf = bsub.add_parser("forward", help="time full-size transformer forwards")
    model_args(bf)
    bf.add_argument("--runs", type=_positive, default=1)
    bf.add_argument("--warmup", type=_non_negative, default=0)
    bf.add_argument("--json", help="also write the result to this file")
    bf.set_defaults(func=_cmd_bench_forward)
    bg = bsub.add_parser("generate", help="full generations on random weights at the real shapes (no download)",
                         description="Writes random Bonsai packs (4B DiT packed binary/ternary, Qwen3-4B 4-bit, "
                                     "FLUX.2 VAE) to disk, loads them like real weights and generates, reporting "
                                     "per-stage time, peak and mean-active memory.")
    bg.add_argument("--formats", nargs="+", default=["binary", "ternary"], choices=["binary", "ternary"])
    bg.add_argument("--sizes", nargs="+", type=_size, default=[512, 1024])
    bg.add_argument("--steps", type=_steps, default=4)
    bg.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    bg.add_argument("--budgets", nargs="+", default=["auto", "target", "none"],
                    help="memory budgets to run, each with a fresh pipeline: 'auto' (the default plan), 'target' "
                         "(the peak target per format and size: binary 1.5 / 1.9 GB, ternary 1.8 / 2.2 GB at "
                         "512 / 1024), 'none', or sizes like 1.5GB")
    bg.add_argument("--generations", type=_positive, default=2,
                    help="generations per budget (new prompt each); the first includes the cold start")
    bg.add_argument("--dir", help="where to write the random packs (reused if present; default: a temp dir)")
    bg.add_argument("--json", help="also write the result to this file")
    bg.set_defaults(func=_cmd_bench_generate)
    be = bsub.add_parser(
        "edit", help="editing and LoRA next to plain generation on random weights at the real shapes (no download)",
        description="On the random pack `benchmark generate` writes into --dir (written if absent): per size and "
                    "budget, one pipeline runs plain generation (the baseline), reference-image editing with 1 "
                    "and 2 references the output's size, inpainting (mask on the central quarter) and image to "
                    "image at --strength, and random LoRAs in diffusers' keys on every block linear (rank 16, "
                    "rank 64, both stacked), each --generations times with new prompts; the first is the warm-up, "
                    "the last is reported with its ratios to plain. Prints a markdown table.")
    be.add_argument("--format", default="binary", choices=["binary", "ternary"])
    be.add_argument("--sizes", nargs="+", type=_size, default=[512, 1024])
    be.add_argument("--steps", type=_steps, default=4)
    be.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    be.add_argument("--budgets", nargs="+", default=["auto", "none"],
                    help="memory budgets, each with a fresh pipeline: 'auto', 'none', 'target' (as in benchmark "
                         "generate) or sizes like 1.5GB; a budget the planner refuses runs the most frugal plan")
    be.add_argument("--cases", nargs="+", default=None,
                    help="what to run, of plain, reference-1, reference-2, inpaint, image-to-image, lora-r16, "
                         "lora-r64, lora-r16+r64 (default: all; plain, the baseline, always runs)")
    be.add_argument("--strength", type=float, default=0.6, help="of inpainting and image to image (default 0.6)")
    be.add_argument("--generations", type=_positive, default=2,
                    help="generations per case (new prompt each); the first is the warm-up, the last is reported")
    be.add_argument("--dir", help="where the random packs and LoRAs are (reused if present; default: a temp dir)")
    be.add_argument("--json", help="also write the result to this file (after every case)")
    be.add_argument("--table", metavar="JSON", help="only print the markdown table of a result written earlier")
    be.set_defaults(func=_cmd_bench_edit)
    return p


def _one_line(message: str) -> str:
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding, "replace")


def _fail(message: str, code: int = 2):
    print(f"error: {_one_line(message)}", file=sys.stderr)
    sys.exit(code)


_warned: set[str] = set()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    text = _one_line(message)
    if text not in _warned:  # a warning raised once per layer is shown once
        _warned.add(text)
        print(f"warning: {text}", file=sys.stderr)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _show_warning  # one line each, like the errors
    try:
        args.func(args)
    except BonsaiError as e:
        _fail(str(e))
    except OSError as e:  # the disk: a full or read-only folder, a vanished file
        _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
    except MemoryError:
        _fail("out of memory; try a smaller image or a --memory-budget")
    except KeyboardInterrupt:
        from .loading import ABANDONED_DOWNLOADS

        if ABANDONED_DOWNLOADS:
            # A Hugging Face download interrupted mid-file leaves its pool's workers retrying,
            # and the interpreter would wait for them at exit. Every file this command writes
            # is complete or absent already (atomic renames), and the Hub's own are
            # `.incomplete`, so the process may end at once. Written straight to the
            # descriptor: such a thread may hold stderr's lock.
            os.write(2, b"cancelled\n")
            os._exit(130)
        print("cancelled", file=sys.stderr)
        sys.exit(130)
    finally:
        warnings.showwarning = shown
