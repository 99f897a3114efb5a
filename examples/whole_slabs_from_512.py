"""Runs a module (`python -m` style) or a script with ternary whole slabs from 512 rows instead of
`kernels.WHOLE_SLAB_MIN_M`'s 1024: an experiment that the planner does not offer (see
docs/benchmarks.md, c61). The override holds for this process only.

    python examples/whole_slabs_from_512.py bonsai_mlx benchmark generate --formats ternary ...
    cd examples && python whole_slabs_from_512.py profile_speed.py --sections dit --quick ...
"""
import os
import runpy
import sys

import bonsai_mlx.kernels as kernels

kernels.WHOLE_SLAB_MIN_M = kernels.ByFormat(binary=kernels.WHOLE_SLAB_MIN_M.binary, ternary=512)
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.endswith(".py"):
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
