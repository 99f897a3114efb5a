"""The packed-matmul kernels (and the VAE's column moments) as data, for apps that launch
them without Python.

`metal_kernels(fmts)` returns the exact `source` and `header` strings that `kernels.py`
passes to `mx.fast.metal_kernel` (mlx-swift: `MLXFast.metalKernel`), and a JSON-ready
description of every launch: input and output names, template parameters, output shapes,
and grid and threadgroup as formulas of M, N, K (and, for the slab decode, the slab's
rows). `evaluate` reads the formulas; tests check them against `kernels.plan` for many
shapes, so the description cannot drift from what the Python launcher does.

Formulas are Python expression syntax over integers: + - * //, comparisons,
`a if c else b`, and the functions ceil_div(a, b), min, max, pow2ceil(n) (the smallest power
of two >= n). `let` lists name: formula pairs evaluated in order before the others.
"""

from __future__ import annotations

import ast
import operator

from .errors import BonsaiError
from .kernels import (DEFAULT_CONFIG, FORMATS, GEMM_MIN_M, MOMENTS, MOMENTS_GROUP, MOMENTS_THREADS, WHOLE_SLAB_MIN_M,
                      KernelConfig, io_names, metal_source)

HEADER_FILE = "common.metal"


def _kernel_entry(kernel: str, template: list, output_shape: list, grid: list, threadgroup: list,
                  header: str, let: list | None = None) -> dict:
    inputs, outputs = io_names(kernel)
    return {"name": f"bonsai_{kernel}", "source": f"{kernel}.metal", "header": HEADER_FILE if header else None,
            "inputs": list(inputs), "outputs": list(outputs), "template": template,
            "output_shapes": [output_shape], "output_dtypes": ["T"], "let": let or [],
            "grid": grid, "threadgroup": threadgroup}


def metal_kernels(fmts=FORMATS, config: KernelConfig = DEFAULT_CONFIG) -> tuple[dict[str, str], dict]:
    """(files: name -> text, spec) for the Metal kernels of `fmts` under `config`."""
    files, kernels = {}, {}
    g, v, f, d = config.gemm("metal"), config.gemv("metal", 32), config.gemv_fp32, config.decode
    if config.gemv_metal_small is not None or v.NSG == 0:
        raise BonsaiError("the exported spec describes a fixed Metal GEMV tile; this config varies it with M or K")
    nt = 32 * g.SGM * g.SGN
    for fmt in fmts:
        entries = {
            "gemm": _kernel_entry(
                f"{fmt}_gemm", [["T", "dtype"], ["BM", g.BM], ["BN", g.BN], ["BK", g.BK], ["SGM", g.SGM],
                                ["SGN", g.SGN]], ["M", "N"],
                [f"ceil_div(N, {g.BN}) * {nt}", f"ceil_div(M, {g.BM})", "1"], [nt, 1, 1], True),
            "gemv": _kernel_entry(
                f"{fmt}_gemv", [["T", "dtype"], ["NJ", v.NJ], ["KL", v.KL], ["NSG", v.NSG]], ["M", "N"],
                [f"ceil_div(N, {8 * v.NJ}) * {32 * v.NSG}", "ceil_div(M, 16)", "1"], [32 * v.NSG, 1, 1], True),
            "gemv_fp32": _kernel_entry(
                f"{fmt}_gemv_fp32", [["T", "dtype"], ["MT", "MT"], ["R", f.R], ["NSG", f.NSG]], ["M", "N"],
                [f"ceil_div(N, {f.R * f.NSG}) * {32 * f.NSG}", "ceil_div(M, MT)", "1"], [32 * f.NSG, 1, 1], True,
                let=[["MT", f"pow2ceil(min(M, {f.MT_MAX}))"]]),
            "decode": _kernel_entry(
                f"{fmt}_decode", [["T", "dtype"], ["CPT", d.CPT], ["NSG", d.NSG]], ["rows", "K"],
                [f"ceil_div(rows * ceil_div(K // 8, {32 * d.CPT}), {d.NSG}) * {32 * d.NSG}", "1", "1"],
                [32 * d.NSG, 1, 1], False),
        }
        for path, e in entries.items():
            kernel = e["source"][:-len(".metal")]
            header, body = metal_source(kernel, config)
            files[e["source"]] = body
            if header:
                files[HEADER_FILE] = header
            kernels[f"{fmt}_{path}"] = e
    files[f"{MOMENTS}.metal"] = metal_source(MOMENTS, config)[1]
    kernels[MOMENTS] = {
        **_kernel_entry(MOMENTS, [["T", "dtype"], ["SQ", "SQ"]], ["B", "blocks", "C"], ["width", "blocks", "B"],
                        ["group", 1, 1], False,
                        let=[["group", f"min({MOMENTS_GROUP}, 32 * ceil_div(C, 32))"],
                             ["width", "group * ceil_div(C, group)"],
                             ["blocks", f"max(1, min(R, {MOMENTS_THREADS} // (width * B)))"]]),
        "output_dtypes": ["float32"],
        "computes": "GroupNorm statistics of 16-bit x [B, R, C] (pixels x channels) without a float32 copy: "
                    "out[b, j, c] = the float32 sum over row block j of x[b, r, c] (SQ = 0) or of "
                    "(x[b, r, c] - mean[b, c])^2 (SQ = 1, mean [B, C] float32; with SQ = 0 any [B, C] float32); "
                    "sum out over axis 1, then over each group's channels: the mean pass, then the variance pass",
    }
    spec = {
        "api": "mx.fast.metal_kernel(name, input_names, output_names, source, header) / "
               "MLXFast.metalKernel(name:inputNames:outputNames:source:header:); call with the template, grid, "
               "threadgroup, output shapes and dtypes below (T = x's dtype)",
        "formulas": "Python expression syntax over integers: + - * //, comparisons, 'a if c else b', "
                    "ceil_div(a, b), min, max, pow2ceil(n)",
        "kernels": kernels,
        "dispatch": {
            "computes": "y[M, N] = x[M, K] @ W.T, x = the input flattened to [M, K] (M = product of leading dims)",
            "path": [
                {"when": "dtype in (float16, bfloat16) and M >= slab_min_m", "path": "slab"},
                {"when": f"M >= {GEMM_MIN_M}", "path": "gemm"},
                {"when": "dtype == float32", "path": "gemv_fp32"},
                {"when": "otherwise", "path": "gemv"},
            ],
            "slab_min_m": {fmt: config.slab_min_m[fmt] for fmt in fmts},
            "slab": {
                "let": [["cap0", f"min({config.slab_max_elements} // K, N)"],
                        ["mult", f"{config.slab_row_multiple} if cap0 >= {config.slab_row_multiple} else 1"],
                        ["cap", "max(1, cap0 - cap0 % mult)"],
                        ["rows", "N if cap0 == N else ceil_div(ceil_div(N, ceil_div(N, cap)), mult) * mult"]],
                "steps": "for n0 in 0, rows, 2*rows, ... < N: slab = decode(w[n0:n1], scales[n0:n1]) with "
                         "rows = n1 - n0 (n1 = min(n0 + rows, N)), written as [rows, K] in x's dtype; "
                         "part = x @ slab.T ([M, rows], the framework's own matmul); each decode waits for the "
                         "previous part (one slab alive at a time); y = concatenate(parts, axis 1)",
            },
            "whole_slabs": {
                "slab_min_m": {fmt: WHOLE_SLAB_MIN_M[fmt] for fmt in fmts},
                "steps": "under a memory plan with decode_each_matrix_whole: the slab path from these M, "
                         "with rows = N (one slab, y = its part)",
            },
        },
    }
    return files, spec


# ---------------------------------------------------------------------------- formulas

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod}
_CMP = {ast.GtE: operator.ge, ast.Gt: operator.gt, ast.LtE: operator.le, ast.Lt: operator.lt, ast.Eq: operator.eq}
_FUNCS = {"ceil_div": lambda a, b: -(-a // b), "min": min, "max": max,
          "pow2ceil": lambda n: 1 << max(0, (int(n) - 1).bit_length())}


def evaluate(formula, names: dict) -> int:
    """The integer value of a spec formula (or a plain int) for `names` (M, N, K, rows, lets)."""
    if isinstance(formula, int):
        return formula

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMP:
            return _CMP[type(node.ops[0])](ev(node.left), ev(node.comparators[0]))
        if isinstance(node, ast.IfExp):
            return ev(node.body) if ev(node.test) else ev(node.orelse)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
            return _FUNCS[node.func.id](*(ev(a) for a in node.args))
        raise BonsaiError(f"formula {formula!r}: {ast.dump(node)[:80]} is outside the formula language")

    try:
        tree = ast.parse(str(formula), mode="eval")
    except SyntaxError as e:
        raise BonsaiError(f"formula {formula!r} does not parse: {e}") from None
    return int(ev(tree))


def evaluate_lets(lets: list, names: dict) -> dict:
    names = dict(names)
    for name, formula in lets:
        names[name] = evaluate(formula, names)
    return names


def write_kernels(directory, fmts=FORMATS, config: KernelConfig = DEFAULT_CONFIG) -> list[str]:
    """Write the kernels' sources and `kernels.json` into `directory`; the names written."""
    import json
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files, spec = metal_kernels(fmts, config)
    for name, text in files.items():
        (directory / name).write_text(text)
    (directory / "kernels.json").write_text(json.dumps(spec, indent=1))
    return sorted(files) + ["kernels.json"]
