"""FLUX.2 [klein] sampling schedule: rectified flow, Euler steps on the velocity.

Reproduces what Flux2KleinPipeline gets from diffusers' FlowMatchEulerDiscreteScheduler
(use_dynamic_shifting=True, time_shift_type="exponential"): sigmas linspace(1, 1/N, N),
shifted by an exponential time shift whose mu comes from an empirical fit to the image
token count, then a final 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx

from .errors import BonsaiError


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """BFL's fitted shift for `image_seq_len` = (H/16)*(W/16) tokens and `num_steps`.

    Up to 4300 tokens mu interpolates linearly in the step count between fits made at
    10 and 200 steps; beyond that only the 200-step fit is used.
    """
    a1, b1 = 8.73809524e-05, 1.89833333  # fit at 10 steps
    a2, b2 = 0.00016927, 0.45666666  # fit at 200 steps
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m200 = a2 * image_seq_len + b2
    m10 = a1 * image_seq_len + b1
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return float(a * num_steps + b)


def time_shift(mu: float, t: float) -> float:
    """Exponential shift e^mu / (e^mu + (1/t - 1)); maps 1 -> 1 and pushes t toward 1."""
    e = math.exp(mu)
    return e / (e + (1.0 / t - 1.0))


def flux2_sigmas(num_steps: int, image_seq_len: int) -> list[float]:
    """num_steps + 1 noise levels, from 1.0 down to the appended final 0.0."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise BonsaiError(f"num_steps must be a positive integer, got {num_steps!r}")
    if image_seq_len < 1:
        raise BonsaiError(f"image_seq_len must be positive, got {image_seq_len!r}")
    mu = compute_empirical_mu(image_seq_len, num_steps)
    n = num_steps
    # linspace(1, 1/n, n); n == 1 gives just [1.0]
    base = [1.0 + (1.0 / n - 1.0) * i / (n - 1) for i in range(n)] if n > 1 else [1.0]
    return [time_shift(mu, s) for s in base] + [0.0]


def image_seq_len(height: int, width: int) -> int:
    """Number of image tokens: one per 16x16 pixels (8x VAE, then 2x2 patches)."""
    if height % 16 or width % 16:
        raise BonsaiError(f"height and width must be multiples of 16, got {height}x{width}")
    return (height // 16) * (width // 16)


def euler_step(x: mx.array, v: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """x_next = x + (sigma_next - sigma) * v, accumulated in float32, returned in v's dtype.

    Same as FlowMatchEulerDiscreteScheduler.step, which upcasts the sample so the small
    late steps are not lost to 16-bit rounding.
    """
    x32 = x.astype(mx.float32) + (sigma_next - sigma) * v.astype(mx.float32)
    return x32.astype(v.dtype)


@dataclass
class DenoiseStep:
    index: int  # 0-based
    sigma: float  # noise level the step started from
    sigma_next: float
    x: mx.array  # the sample after the step, float32, evaluated
    velocity: mx.array  # the model's velocity at sigma, float32

    @property
    def x0(self) -> mx.array:
        """The current estimate of the clean sample (the sample once no noise is left)."""
        return self.x - self.sigma_next * self.velocity if self.sigma_next > 0 else self.x


def denoise(velocity: Callable[[mx.array, float], mx.array], x: mx.array,
            sigmas: list[float], after_step: Callable[[mx.array, float], mx.array] | None = None
            ) -> Iterator[DenoiseStep]:
    """Euler steps of the rectified flow from `x` down `sigmas`, one per yield.

    `velocity(x, sigma)` is the model; the sample stays float32 between steps (see
    `euler_step`). `after_step(x, sigma_next)` replaces each step's sample (inpainting puts
    the kept region back). Stop iterating to stop sampling: nothing more is computed.
    """
    x = x.astype(mx.float32)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
        v = velocity(x, sigma).astype(mx.float32)
        x = euler_step(x, v, sigma, sigma_next)
        if after_step is not None:
            x = after_step(x, sigma_next)
        mx.eval(x)
        yield DenoiseStep(i, sigma, sigma_next, x, v)


def noised(x0: mx.array, noise: mx.array, sigma: float) -> mx.array:
    """The flow's sample at noise level sigma: sigma * noise + (1 - sigma) * x0 (diffusers'
    FlowMatchEulerDiscreteScheduler.scale_noise), float32."""
    return sigma * noise.astype(mx.float32) + (1.0 - sigma) * x0.astype(mx.float32)


def first_step(num_steps: int, strength: float) -> int:
    """How many of `num_steps` an image-to-image run skips at `strength` in [0, 1]: diffusers'
    get_timesteps (the run starts from the image noised to that step's sigma)."""
    return int(max(num_steps - min(num_steps * strength, num_steps), 0))
