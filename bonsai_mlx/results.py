"""What a generation hands back: per-step events and the final result."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, PngImagePlugin


@dataclass
class StepEvent:
    step: int  # 1-based
    steps: int
    sigma: float  # noise level the step started from
    sigma_next: float
    elapsed: float  # seconds since generation started
    preview: Image.Image | None = None


@dataclass
class GenerationResult:
    image: Image.Image
    prompt: str
    negative_prompt: str | None
    seed: int | None
    steps: int
    guidance: float
    width: int
    height: int
    model: str
    timings: dict = field(default_factory=dict)
    array: np.ndarray | None = None  # float32 [H, W, 3] in [0, 1], before 8-bit rounding
    memory: dict = field(default_factory=dict)  # MemoryReport.as_dict(): peak / mean-active per stage
    plan: object = None  # the MemoryPlan it ran under
    edit: dict = field(default_factory=dict)  # reference count, init image, strength, mask (when editing)
    loras: list = field(default_factory=list)  # (name, file, scale) of the LoRAs applied

    def metadata(self) -> dict:
        meta = {
            "prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
            "steps": self.steps, "guidance": self.guidance, "width": self.width, "height": self.height,
            "model": self.model, "timings": self.timings, "memory": self.memory, "software": "bonsai-mlx",
        }
        if self.edit:
            meta["edit"] = self.edit
        if self.loras:
            meta["loras"] = [{"name": n, "file": f, "scale": s} for n, f, s in self.loras]
        return meta

    def save(self, path: str | Path) -> Path:
        """Write a PNG with the settings in its text chunks, atomically: the image appears
        complete or not at all, never half-written."""
        path = Path(path)
        info = PngImagePlugin.PngInfo()
        for k, v in self.metadata().items():
            info.add_text(k, v if isinstance(v, str) else json.dumps(v))
        info.add_text("parameters", json.dumps(self.metadata()))
        return write_png(self.image, path, info)


def write_png(image: Image.Image, path: str | Path, info: PngImagePlugin.PngInfo | None = None) -> Path:
    """Write `image` as a PNG atomically: it appears complete under `path` or not at all."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def to_pil(images: mx.array) -> list[Image.Image]:
    """[B, H, W, 3] floats in [0, 1] -> 8-bit images, rounded as diffusers does."""
    a = np.array(images.astype(mx.float32))
    return [Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8)) for x in a]
