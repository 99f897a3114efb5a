"""Host and device time per call of our custom-kernel launches against built-in ops, on MLX's
CUDA back-end: what building a call's graph costs the host (no evaluation), what evaluating
200 built calls costs per call, and each call evaluated at once (strict) or started ahead
(async_eval). JSON rows to $OUT/calls.json (docs/benchmarks.md, c94 and c95).

    python examples/launch_costs.py
"""
import json, os, sys, time
import mlx.core as mx
from bonsai_mlx import kernels
from bonsai_mlx.vae_strips import _copied_moments
from bonsai_mlx.packing import pack_binary

if not mx.cuda.is_available():
    sys.exit("launch_costs.py times CUDA launches: run it where MLX's CUDA back-end is available")

mx.random.seed(0)
x = mx.random.normal((1, 32 * 1024, 128)).astype(mx.float16)
part = x.reshape(1, 32, 1024, 128)
xs = mx.random.normal((1536, 3072)).astype(mx.bfloat16)
wd = mx.random.normal((3072, 3072)).astype(mx.bfloat16)
signs = mx.where(mx.random.normal((3072, 3072)) > 0, 1.0, -1.0)
pw = pack_binary(signs, mx.ones((3072, 3072 // 128), dtype=mx.float16))
small = mx.ones((32,), dtype=mx.float32)
copy_k = mx.fast.cuda_kernel(name="copy1", input_names=["a"], output_names=["b"],
                             source="unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < a_shape[0]) b[i] = a[i];")
mx.eval(x, xs, wd, pw.data, pw.scales, small)

cases = {
    "block_moments": lambda: kernels.block_moments(x)[1:],
    "copied_moments": lambda: _copied_moments(part)[1:],
    "column_moments": lambda: kernels.column_moments(x),
    "builtin sum": lambda: mx.sum(x, axis=1),
    "packed binary 1536x3072x3072": lambda: kernels.packed_matmul(xs, pw),
    "dense 1536x3072x3072": lambda: xs @ wd.T,
    "trivial cuda_kernel": lambda: copy_k(inputs=[small], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                                          output_shapes=[(32,)], output_dtypes=[mx.float32]),
    "builtin add small": lambda: small + 1,
}
rows = []
for name, fn in cases.items():
    for _ in range(30):
        mx.eval(fn())
    mx.synchronize()
    n = 200
    outs = []
    t = time.perf_counter()
    for _ in range(n):
        outs.append(fn())
    host = (time.perf_counter() - t) / n
    t = time.perf_counter()
    mx.eval(outs)
    mx.synchronize()
    drain = (time.perf_counter() - t) / n
    del outs
    t = time.perf_counter()
    for _ in range(n):
        mx.eval(fn())
    strict = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        mx.async_eval(fn())
    mx.synchronize()
    ahead = (time.perf_counter() - t) / n
    r = {"name": name, "host_build_us": host * 1e6, "drain_us": drain * 1e6, "strict_us": strict * 1e6,
         "async_us": ahead * 1e6}
    rows.append(r)
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}))
json.dump(rows, open(os.environ.get("OUT", "/tmp") + "/calls.json", "w"), indent=1)
