"""Training batches of the shapes task, each a pure function of (seed, stage, step).

Nothing carries state from one step to the next, so a resumed run draws exactly the
batches an uninterrupted run would, and data loader workers may build steps in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BonsaiError
from .render import example
from .scenes import sample_train_spec

STAGES = ("vae", "vae-stats", "dit", "qat-binary", "qat-ternary")


def step_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    if stage not in STAGES:
        raise BonsaiError(f"stage must be one of {STAGES}, got {stage!r}")
    return np.random.default_rng([int(seed), STAGES.index(stage), int(step)])


def batch(seed: int, stage: str, step: int, size: int, prompt_dropout: float = 0.0):
    """(images uint8 [size, 128, 128, 3], prompts, torch_seed). Each prompt is a training
    prompt, or "" with probability prompt_dropout (the unconditional branch of classifier-
    free guidance); torch_seed seeds the step's noise and noise levels."""
    if size < 1:
        raise BonsaiError(f"batch size must be positive, got {size}")
    rng = step_rng(seed, stage, step)
    images, prompts = [], []
    for _ in range(size):
        spec = sample_train_spec(rng)
        image, _ = example(spec, int(rng.integers(2**63)))
        images.append(image)
        prompts.append("" if rng.random() < prompt_dropout else spec.prompt)
    return np.stack(images), prompts, int(rng.integers(2**63))


@dataclass(frozen=True)
class StepBatch:
    """batch(seed, stage, k, size, prompt_dropout) as a picklable callable of k, for data
    loader workers however they are started (fork, spawn or forkserver)."""

    seed: int
    stage: str
    size: int
    prompt_dropout: float = 0.0

    def __call__(self, step: int):
        return batch(self.seed, self.stage, step, self.size, self.prompt_dropout)
