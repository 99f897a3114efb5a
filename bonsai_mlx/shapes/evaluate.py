"""`python -m bonsai_mlx eval-shapes`: generate the held-out prompts and score them.

Prompt i of `scenes.evaluation_specs(count)` is generated once with seed `seed + i` through
the ordinary pipeline; its 8-bit image is scored by `score`. The output folder gets
images/NNN.png (with the generation settings in their text chunks), report.json (scores
per category and overall, and every image's prompt, seed, verdict and detections) and
grid.png (all images in prompt order, framed green when correct, red when not).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from ..errors import BonsaiError
from . import score
from .scenes import HELD_OUT_FRACTION, SPLIT_SALT, Spec, evaluation_specs

GRID_COLUMNS = 8
FRAME = 3
_GOOD, _BAD = (40, 170, 60), (210, 40, 40)


def prepare_out(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BonsaiError(f"--out {out} is a file; give a folder (it is created if missing)")
    (out / "images").mkdir(parents=True, exist_ok=True)
    return out


def evaluate(pipe, specs: list[Spec], out: str | os.PathLike, seed: int = 0, size: int = 128,
             steps: Optional[int] = None, guidance: Optional[float] = None, model: str = "",
             log: Callable[[str], None] = lambda _: None) -> dict:
    """Generate and score `specs` with `pipe` (anything with BonsaiPipeline.generate's
    signature); writes the images, report.json and grid.png into `out`; returns the report."""
    out = prepare_out(out)
    items, tiles = [], []
    t0 = time.perf_counter()
    for i, spec in enumerate(specs):
        result = pipe.generate(spec.prompt, width=size, height=size, steps=steps, seed=seed + i, guidance=guidance)
        found = score.detect(result.image)
        ok = score.check(spec, found)
        result.save(out / "images" / f"{i:03d}.png")
        tiles.append((np.asarray(result.image.convert("RGB")), ok))
        items.append({"index": i, "prompt": spec.prompt, "category": spec.category, "seed": seed + i,
                      "correct": ok, "steps": result.steps, "guidance": result.guidance,
                      "detections": [{"shape": d.shape, "color": d.color, "box": list(d.box), "area": d.area}
                                     for d in found]})
        log(f"[{i + 1}/{len(specs)}] {'ok  ' if ok else 'miss'} {spec.prompt}")
    report = score.summarize((s, it["correct"]) for s, it in zip(specs, items))
    report.update({
        "model": model, "seed": seed, "size": size, "prompts": len(specs), "seconds": time.perf_counter() - t0,
        "split": {"rule": "per category, prompts ranked by sha256(salt + prompt); the first "
                          f"{HELD_OUT_FRACTION:.0%} (at least one) are held out", "salt": SPLIT_SALT},
        "items": items,
    })
    tmp = out / ".report.json.partial"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")
    grid(tiles).save(out / "grid.png")
    return report


def grid(tiles: list[tuple[np.ndarray, bool]], columns: int = GRID_COLUMNS) -> Image.Image:
    """Images in rows of `columns`, each in a green (correct) or red (wrong) frame."""
    if not tiles:
        raise BonsaiError("no images to put in a grid")
    h, w = tiles[0][0].shape[:2]
    th, tw = h + 2 * FRAME, w + 2 * FRAME
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    canvas = np.full((rows * th, cols * tw, 3), 255, np.uint8)
    for i, (img, ok) in enumerate(tiles):
        y, x = (i // cols) * th, (i % cols) * tw
        canvas[y:y + th, x:x + tw] = _GOOD if ok else _BAD
        canvas[y + FRAME:y + FRAME + h, x + FRAME:x + FRAME + w] = img
    return Image.fromarray(canvas)


def eval_shapes(model: str, out: str | os.PathLike, count: Optional[int] = None, seed: int = 0, size: int = 128,
                steps: Optional[int] = None, guidance: Optional[float] = None, dtype=None,
                quantize: Optional[str] = None, log: Callable[[str], None] = lambda _: None, vae=None) -> dict:
    """Load `model` with BonsaiPipeline.from_pretrained (and `vae`, when given) and evaluate
    the first `count` held-out prompts (all when None)."""
    import mlx.core as mx

    from ..pipeline import BonsaiPipeline, check_size

    check_size(size, size)
    specs = evaluation_specs(count)
    prepare_out(out)  # before loading anything
    pipe = BonsaiPipeline.from_pretrained(model, dtype=dtype or mx.bfloat16, quantize=quantize, vae=vae)
    return evaluate(pipe, specs, out, seed=seed, size=size, steps=steps, guidance=guidance, model=str(model), log=log)
