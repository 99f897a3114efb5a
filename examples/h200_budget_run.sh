#!/usr/bin/env bash
# One device call on a two-GPU H200 machine: every figure of docs/benchmarks.md's
# "budgets at full speed" section. GPU 0 runs the whole-generation benchmark, GPU 1 the
# part-by-part profile (strip decode, strip encode, DiT executions) and diffusers'
# reference, on the same random packs. Usage, from the repository root on the device:
#   OUT=... bash examples/h200_budget_run.sh [tag]
set -u
tag=${1:-run}
mkdir -p /tmp/site && tar xJf .devmlx/mlx-cuda-sm90.tar.xz -C /tmp/site
python3 -m pip install -q --no-index --no-deps --target /tmp/dsite .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# The packs first, on the host, so both jobs read complete ones.
for f in binary ternary; do
  python3 -c "from bonsai_mlx.benchmark import random_pack; random_pack('/tmp/bench', '$f')" &
done
wait
(CUDA_VISIBLE_DEVICES=0 timeout ${GEN_S:-500} python3 -m bonsai_mlx benchmark generate --formats binary ternary \
   --sizes 512 1024 --steps 4 --dtype bfloat16 --budgets ${BUDGETS:-auto target none} --generations 2 \
   --dir /tmp/bench --json $OUT/generate-$tag.json > $OUT/generate-$tag.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1
 for s in ${SECTIONS:-strips encode dit}; do
   timeout ${SECTION_S:-200} python3 examples/profile_speed.py --quick --sections $s --root /tmp/bench \
     --json $OUT/profile-$s-$tag.json > /dev/null 2>> $OUT/profile-$tag.err
 done
 [ -n "${REF:-1}" ] && PYTHONPATH=/tmp/dsite:$PYTHONPATH timeout 150 python3 examples/compare_diffusers.py \
   --json $OUT/ref-$tag.json > /dev/null 2>> $OUT/profile-$tag.err) &
wait
tail -5 $OUT/generate-$tag.log; tail -3 $OUT/profile-$tag.err
