"""FLUX.2 sigma schedule and Euler step vs diffusers' FlowMatchEulerDiscreteScheduler.

The reference is set up exactly as Flux2KleinPipeline drives it: sigmas =
np.linspace(1, 1/N, N), mu = the pipeline's compute_empirical_mu(image_seq_len, N),
scheduler.set_timesteps(sigmas=..., mu=...). Of the klein scheduler_config.json only
use_dynamic_shifting=True and time_shift_type="exponential" change that result
(shift, base/max_shift and seq-len bounds are unused once mu is passed; karras /
exponential / beta sigmas, shift_terminal, invert_sigmas are off).

Bound: |ours - diffusers| <= 1e-6 per sigma (diffusers works in float32, ~6e-8 rounding).
"""

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.scheduler import compute_empirical_mu, euler_step, flux2_sigmas, image_seq_len

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu as ref_mu  # noqa: E402

SIZES = [(256, 256), (512, 512), (1024, 768), (1536, 1536)]  # 1536^2 = 9216 tokens > 4300
STEPS = [1, 4, 28, 50]


def ref_scheduler():
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )


def ref_sigmas(n, seq_len):
    s = ref_scheduler()
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=ref_mu(seq_len, n))
    return s.sigmas.numpy()


def test_both_mu_branches_are_covered():
    lens = [image_seq_len(h, w) for h, w in SIZES]
    assert min(lens) <= 4300 < max(lens)


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("steps", STEPS)
def test_sigmas_match_diffusers(height, width, steps):
    L = image_seq_len(height, width)
    assert compute_empirical_mu(L, steps) == pytest.approx(ref_mu(L, steps), abs=1e-12)
    ours = np.array(flux2_sigmas(steps, L))
    want = ref_sigmas(steps, L)
    assert ours.shape == want.shape == (steps + 1,)
    assert ours[-1] == 0.0 and ours[0] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size,mu,sigmas", [
    (512, 2.03069, [1.0, 0.958085, 0.883982, 0.717497, 0.0]),
    (1024, 2.29118, [1.0, 0.967384, 0.908144, 0.767200, 0.0]),
])
def test_worked_values_from_doc(size, mu, sigmas):
    # The doc prints 5-6 decimals: allow half a unit in the last place.
    L = image_seq_len(size, size)
    assert compute_empirical_mu(L, 4) == pytest.approx(mu, abs=5e-6)
    np.testing.assert_allclose(flux2_sigmas(4, L), sigmas, rtol=0, atol=5e-7)


def test_euler_step_matches_diffusers():
    s = ref_scheduler()
    s.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=ref_mu(1024, 4))
    torch.manual_seed(0)
    x, v = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    for i, t in enumerate(s.timesteps):
        want = s.step(v, t, x, return_dict=False)[0]
        got = euler_step(mx.array(x.numpy()), mx.array(v.numpy()), float(s.sigmas[i]), float(s.sigmas[i + 1]))
        np.testing.assert_allclose(np.array(got), want.numpy(), rtol=0, atol=1e-6)
        x = want


def test_euler_step_dtype_follows_velocity():
    # diffusers returns the model output's dtype; the sum itself is done in float32.
    x = mx.full((4,), 1.0, dtype=mx.float16)
    got = euler_step(x, mx.full((4,), 1.0, dtype=mx.float32), 0.01, 0.0)
    assert got.dtype == mx.float32 and float(got[0]) == pytest.approx(0.99, abs=1e-6)
    got = euler_step(x.astype(mx.float32), mx.full((4,), 1.0, dtype=mx.bfloat16), 0.5, 0.25)
    assert got.dtype == mx.bfloat16 and float(got[0]) == 0.75


def test_bad_inputs():
    with pytest.raises(BonsaiError):
        flux2_sigmas(0, 1024)
    with pytest.raises(BonsaiError):
        image_seq_len(1000, 1024)
