#!/usr/bin/env bash
# One prepared run of the full-size solver benchmark on one GPU (the `run` device tool), at most TOTAL_S = 450 s
# of benchmark wall time (each part is stopped at that deadline; start-up of the machine not included). Parts, in
# order, each a `scripts/benchmark.py` run with its own JSON + Markdown in $OUT:
#   benchmark   the solver-overhead run: pinv, G2D2 on VQ-Diffusion ITHQ, DPS and RED-Diff on both ADM shapes,
#               fp32 and fp16, with and without gradient checkpointing, 3 timed G2D2 steps and 20 timed DPS /
#               RED-Diff steps, host syncs counted, one profiled step per row; batch 1
#   batch_g2d2  G2D2 on ITHQ at batch sizes BATCH_G2D2 (1,4,8,16), BATCH_PRECISIONS (fp16): per-image throughput
#   batch_pixel DPS and RED-Diff on both ADM shapes at batch sizes BATCH_PIXEL (1,4,16), BATCH_PRECISIONS
#   amused      G2D2 on aMUSEd 256 / 512 as in `benchmark` (issue #19's rows), with the time that is left
# A part gets --budget-s = min(its share of TOTAL_S: 40 %, 15 %, 15 %, the rest; time left - 45 s): configurations
# starting after it are recorded as "skipped: budget", and the part is interrupted (SIGINT, then SIGKILL) at the
# deadline. About 5 min on an H200 by the estimates from docs/benchmark_h200.md (not yet run on a GPU).
#   bash scripts/benchmark_gpu.sh                      # results in $OUT (the device tool's folder)
#   TOTAL_S=300 CHECKPOINTING=off bash scripts/benchmark_gpu.sh   # a shorter run
#   PRECISIONS=fp32,fp16,amp_bf16 bash scripts/benchmark_gpu.sh   # add the autocast rows (longer)
#   BATCH_PRECISIONS=fp32,fp16 BATCH_G2D2=1,4,8,16,32 TOTAL_S=540 bash scripts/benchmark_gpu.sh  # more batch rows
#   DEVICE=cpu SCALE=tiny PRECISIONS=fp32 BATCH_PRECISIONS=fp32 TOTAL_S=1200 OUT=/tmp/b \
#     bash scripts/benchmark_gpu.sh   # checks this script on a CPU (fp16 convolutions are slow there), ~6 min
# On a machine without diffusers, carry its wheels in .whl/ (see scripts/train_tiny_priors_gpu.sh). The rows are
# composed by Hydra from conf/ as run.py composes them: where hydra-core is missing, carry it in .whl/ too, e.g.
#   python3 -m pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
# Output: $OUT/<part>.json, $OUT/<part>.md, $OUT/<part>.log, $OUT/profiles.tar (one table per profiled row),
# $OUT/gpu.txt. The JSON and Markdown are rewritten after every row: a part cut short still returns what finished.
set -uo pipefail
OUT=${OUT:-/tmp/bench_out}
TOTAL_S=${TOTAL_S:-450}
CHECKPOINTING=${CHECKPOINTING:-both}
PRECISIONS=${PRECISIONS:-fp32,fp16}
BATCH_PRECISIONS=${BATCH_PRECISIONS:-fp16}
BATCH_G2D2=${BATCH_G2D2:-1,4,8,16}
BATCH_PIXEL=${BATCH_PIXEL:-1,4,16}
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
SECONDS=0
status=0

# part NAME SHARE ARGS...: one benchmark.py run, bounded by SHARE % of TOTAL_S and by the deadline TOTAL_S
part() {
  local name=$1 budget=$(($2 * TOTAL_S / 100)) left=$((TOTAL_S - SECONDS))
  shift 2
  if ((left < 60)); then
    echo "$name: not run, ${left} s left of TOTAL_S=$TOTAL_S" | tee "$OUT/$name.log"
    return
  fi
  ((budget > left - 45)) && budget=$((left - 45))
  echo "$name: budget $budget s, deadline in $left s"
  timeout -s INT -k 20 "$left" python3 scripts/benchmark.py --scale "$SCALE" --device "$DEVICE" --budget-s "$budget" \
    --out "$OUT/$name.json" --markdown "$OUT/$name.md" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  ((rc != 0)) && { echo "$name: exit status $rc (124: stopped at the deadline)"; ((status == 0)) && status=$rc; }
}

part benchmark 40 --discrete-priors vq_diffusion_ithq --measure-steps 3 --measure-steps-pixel 20 \
  --precisions "$PRECISIONS" --checkpointing "$CHECKPOINTING" --profile /tmp/bench_profiles
part batch_g2d2 15 --solvers g2d2 --discrete-priors vq_diffusion_ithq --batch-sizes "$BATCH_G2D2" \
  --precisions "$BATCH_PRECISIONS" --measure-steps 2 --bare-reps 3
part batch_pixel 15 --solvers dps,red_diff --batch-sizes "$BATCH_PIXEL" --precisions "$BATCH_PRECISIONS" \
  --measure-steps-pixel 10
part amused 100 --solvers g2d2 --discrete-priors amused_256,amused_512 --measure-steps 3 \
  --precisions "$PRECISIONS" --checkpointing "$CHECKPOINTING" --profile /tmp/bench_profiles
echo "benchmark time: $SECONDS s of TOTAL_S=$TOTAL_S"

tar -cf "$OUT/profiles.tar" -C /tmp bench_profiles 2>/dev/null || true
for name in benchmark batch_g2d2 batch_pixel amused; do
  tail -n 5 "$OUT/$name.log" 2>/dev/null
  cat "$OUT/$name.md" 2>/dev/null
done
exit $status
