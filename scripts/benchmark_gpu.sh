#!/usr/bin/env bash
# One prepared run of the full-size solver benchmark on one GPU (the `run` device tool), about 6-8
# minutes of wall time: every solver at fp32 and fp16, with and without gradient checkpointing,
# 3 timed G2D2 steps and 20 timed DPS / RED-Diff steps, host syncs counted, and one profiled step
# per row (where the time of a step goes, for the overhead column).
#   bash scripts/benchmark_gpu.sh                      # results in $OUT (the device tool's folder)
#   BUDGET_S=300 CHECKPOINTING=off bash scripts/benchmark_gpu.sh   # a shorter run
#   PRECISIONS=fp32,fp16,amp_bf16 bash scripts/benchmark_gpu.sh       # add the autocast rows (longer)
#   DEVICE=cpu SCALE=tiny OUT=/tmp/b bash scripts/benchmark_gpu.sh   # checks this script on a CPU
# On a machine without diffusers, carry its wheels in .whl/ (see scripts/train_tiny_priors_gpu.sh). The rows are
# composed by Hydra from conf/ as run.py composes them: where hydra-core is missing, carry it in .whl/ too, e.g.
#   python3 -m pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
# Output: $OUT/benchmark.json, $OUT/benchmark.md, $OUT/profiles.tar (one table per row), $OUT/gpu.txt.
# The JSON and Markdown are rewritten after every row: a run cut short still returns what finished.
set -uo pipefail
OUT=${OUT:-/tmp/bench_out}
BUDGET_S=${BUDGET_S:-420}
CHECKPOINTING=${CHECKPOINTING:-both}
PRECISIONS=${PRECISIONS:-fp32,fp16}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-full}
mkdir -p "$OUT"
# diffusers from the carried wheels when missing; the repository on PYTHONPATH
source scripts/gpu_env.sh
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "hydra-core / omegaconf missing and not in .whl/" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
# detach CUPTI after each profiled step: without it, every row timed after the first profile runs
# 10-20 % slower (pytorch#144455)
export TEARDOWN_CUPTI=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
python3 scripts/benchmark.py --scale "$SCALE" --device "$DEVICE" --measure-steps 3 --measure-steps-pixel 20 \
  --precisions "$PRECISIONS" --checkpointing "$CHECKPOINTING" --profile /tmp/bench_profiles --budget-s "$BUDGET_S" \
  --out "$OUT/benchmark.json" --markdown "$OUT/benchmark.md" > "$OUT/benchmark.log" 2>&1
status=$?
tar -cf "$OUT/profiles.tar" -C /tmp bench_profiles 2>/dev/null || true
tail -n 40 "$OUT/benchmark.log"
cat "$OUT/benchmark.md" 2>/dev/null
exit $status
