"""MLX CPU matmul rates by dtype, next to numpy: why the CPU benchmarks run float32, and
why they dequantize the 4-bit text encoder before each matmul (Qwen3TextEncoder.dequantize_matmuls).

    python examples/bench_cpu_matmul.py
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python examples/bench_cpu_matmul.py
"""

import time

import mlx.core as mx
import numpy as np

M, N, K = 1536, 3072, 3072  # one 512x512 klein step's token count through a D x D linear


def rate(f, reps=2) -> float:
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return 2 * M * N * K * reps / (time.perf_counter() - t) / 1e9


a32 = np.random.randn(M, K).astype(np.float32)
b32 = np.random.randn(N, K).astype(np.float32)
print(f"numpy float32: {rate(lambda: a32 @ b32.T):.1f} GFLOP/s")
for dt in (mx.float32, mx.float16, mx.bfloat16):
    a, b = mx.array(a32).astype(dt), mx.array(b32).astype(dt)
    mx.eval(a, b)
    print(f"mlx {dt}: {rate(lambda: mx.eval(a @ b.T)):.1f} GFLOP/s")

# The 4-bit text encoder's widest linear (Qwen3-4B MLP, group 64) on a 512-token prompt.
Mq, Nq, Kq = 512, 9728, 2560
wq, sq, bq = mx.quantize(mx.random.normal((Nq, Kq)), group_size=64, bits=4)
for dt in (mx.float32, mx.bfloat16):
    x, s_, b_ = (v.astype(dt) for v in (mx.random.normal((Mq, Kq)), sq, bq))
    mx.eval(x, s_, b_)
    flop = 2 * Mq * Nq * Kq
    for name, f in (("quantized_matmul", lambda: mx.quantized_matmul(x, wq, s_, b_, group_size=64, bits=4)),
                    ("dequantize + matmul", lambda: x @ mx.dequantize(wq, s_, b_, group_size=64, bits=4).T)):
        t = time.perf_counter()
        mx.eval(f())
        print(f"mlx {dt} 4-bit {name} [{Mq}x{Kq}] @ [{Nq}x{Kq}]^T: {flop / (time.perf_counter() - t) / 1e9:.2f} GFLOP/s")
