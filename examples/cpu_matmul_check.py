"""MLX's CPU matrix product against numpy's, in one process: the figures behind the demo's CPU
time in docs/benchmarks.md.

    python examples/cpu_matmul_check.py
"""

from __future__ import annotations

import json
import time

import mlx.core as mx
import numpy as np


def best_ms(fn, runs: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def main() -> None:
    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(0)
    out = {"mlx": mx.__version__, "numpy": np.__version__}
    for name, (m, k, n) in {"2048^3": (2048, 2048, 2048), "demo linear 192x256x768": (192, 256, 768)}.items():
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        am, bm = mx.array(a), mx.array(b)
        t_mlx = best_ms(lambda: mx.eval(am @ bm))
        t_np = best_ms(lambda: a @ b)
        gflop = 2 * m * k * n / 1e9
        out[name] = {"mlx_ms": round(t_mlx, 3), "numpy_ms": round(t_np, 3),
                     "mlx_gflops": round(gflop / t_mlx * 1000, 1), "numpy_gflops": round(gflop / t_np * 1000, 1)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
