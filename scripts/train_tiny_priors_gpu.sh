#!/usr/bin/env bash
# One-shot training of the embedded tiny priors on one GPU (about 5 minutes of wall time):
#   1. preflight: every stage with --tiny models on CUDA, export included (~30 s), so a CUDA-only
#      bug stops the run before the real budget is spent;
#   2. two processes on the same GPU: vq -> transformer, and ddpm (independent);
#   3. unconditional samples of both priors (PNG grids);
#   4. results packed for the trip back (the device returns at most 8 files of 16 MB each):
#      $OUT/tiny_vq_vqvae.tar (vqvae + scheduler), $OUT/tiny_vq_transformer.tar, $OUT/tiny_ddpm.tar,
#      $OUT/train_vq.log, $OUT/train_ddpm.log, $OUT/samples_tiny_vq.png, $OUT/samples_tiny_ddpm.png.
# Unpack here with: for f in <files_at>/*.tar; do tar -xf "$f" -C g2d2/priors/weights; done
# Budgets (minutes of training per stage) can be overridden: MIN_VQ=2 MIN_TR=1.5 MIN_DDPM=3.7 bash ...
# (DEVICE=cpu EXTRA=--tiny with small MIN_* runs the same steps on a CPU, to check this script.)
#
# PLAN=continue instead continues the shipped tiny_vq transformer on the shipped (unchanged) tokens, the step
# issue #14 needs (the VQ-VAE is not the cap; the CPU-trained transformer is): a copy of
# g2d2/priors/weights/tiny_vq in $W, `--stage transformer --transformer-continue` for MIN_TR minutes at batch
# BATCH_TR and lr LR_TR, then $OUT/tiny_vq_transformer.tar, $OUT/train_transformer.log and the samples. Back here:
# unpack, then re-measure with the tiny table and scripts/eval_tiny_vq.py (docs/priors.md) before shipping.
#   PLAN=continue MIN_TR=9 bash scripts/train_tiny_priors_gpu.sh
#   PLAN=continue DEVICE=cpu MIN_TR=0.3 BATCH_TR=8 OUT=/tmp/c bash scripts/train_tiny_priors_gpu.sh  # CPU check
set -uo pipefail
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
OUT=${OUT:-/tmp/tiny_out}
MIN_VQ=${MIN_VQ:-1.8}
MIN_TR=${MIN_TR:-1.5}
MIN_DDPM=${MIN_DDPM:-3.6}
W=${W:-/tmp/tiny_weights}
WD=${WD:-/tmp/tiny_work}
PLAN=${PLAN:-scratch}
BATCH_TR=${BATCH_TR:-64}
LR_TR=${LR_TR:-4e-4}
mkdir -p "$OUT"
# diffusers from the carried wheels when missing; the repository on PYTHONPATH
source scripts/gpu_env.sh
python3 -c "import torch, diffusers, skimage, sklearn; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'skimage', skimage.__version__, 'cuda', torch.cuda.is_available())" || exit 1

if [ "$PLAN" = continue ]; then
  echo "== continue the tiny_vq transformer $(date +%T): ${MIN_TR} min, batch ${BATCH_TR}, lr ${LR_TR}"
  rm -rf "$W/tiny_vq" && mkdir -p "$W" && cp -r g2d2/priors/weights/tiny_vq "$W/tiny_vq" || exit 1
  python3 scripts/train_tiny_priors.py --stage transformer --transformer-continue --device "$DEVICE" \
    --minutes-transformer "$MIN_TR" --batch-transformer "$BATCH_TR" --lr-transformer "$LR_TR" --out "$W" \
    --work-dir "$WD" --seed 0 --num-eval 32 --eval-every-s 60 --save-every-s 60 $EXTRA > "$OUT/train_transformer.log" 2>&1
  rc=$?
  grep -E "\] (setup|done)|eval|Error|error" "$OUT/train_transformer.log" | tail -n 20 | cut -c1-400
  [ $rc -ne 0 ] && tail -n 40 "$OUT/train_transformer.log"
  tar -cf "$OUT/tiny_vq_transformer.tar" -C "$W" tiny_vq/transformer  # before the samples: the weights come back first
  python3 scripts/sample_priors.py --weights "$W" --which vq --device "$DEVICE" --num 16 --seed 0 --out-dir "$OUT" \
    2>&1 | grep -v Warn
  ls -la "$OUT"
  echo "rc transformer=$rc $(date +%T)"
  exit $rc
fi

echo "== 1. preflight $(date +%T)"
python3 scripts/train_tiny_priors.py --stage all --tiny --device "$DEVICE" --minutes-vq 0.05 --minutes-transformer 0.05 \
  --minutes-ddpm 0.05 --out /tmp/preflight --work-dir /tmp/preflight_work > /tmp/preflight.log 2>&1
rc=$?
grep -E "\] (setup|done)" /tmp/preflight.log | cut -c1-220
if [ $rc -ne 0 ]; then tail -n 60 /tmp/preflight.log; echo "PREFLIGHT FAILED (rc $rc)"; exit 1; fi

echo "== 2. training $(date +%T): vq ${MIN_VQ} + transformer ${MIN_TR} min | ddpm ${MIN_DDPM} min"
python3 scripts/train_tiny_priors.py --stage vq,transformer --device "$DEVICE" --minutes-vq "$MIN_VQ" \
  --minutes-transformer "$MIN_TR" --out "$W" --work-dir "$WD" --seed 0 $EXTRA > "$OUT/train_vq.log" 2>&1 &
pid_vq=$!
python3 scripts/train_tiny_priors.py --stage ddpm --device "$DEVICE" --minutes-ddpm "$MIN_DDPM" --out "$W" \
  --work-dir "$WD" --seed 0 $EXTRA > "$OUT/train_ddpm.log" 2>&1 &
pid_ddpm=$!
wait $pid_vq; rc_vq=$?
wait $pid_ddpm; rc_ddpm=$?
grep -E "\] (setup|done)|Error|error" "$OUT/train_vq.log" "$OUT/train_ddpm.log" | cut -c1-400
[ $rc_vq -ne 0 ] && tail -n 40 "$OUT/train_vq.log"
[ $rc_ddpm -ne 0 ] && tail -n 40 "$OUT/train_ddpm.log"

echo "== 3. samples $(date +%T)"
python3 scripts/sample_priors.py --weights "$W" --device "$DEVICE" --num 16 --seed 0 --out-dir "$OUT" 2>&1 | grep -v Warn

echo "== 4. pack $(date +%T)"
[ -d "$W/tiny_vq/vqvae" ] && tar -cf "$OUT/tiny_vq_vqvae.tar" -C "$W" tiny_vq/vqvae tiny_vq/scheduler
[ -d "$W/tiny_vq/transformer" ] && tar -cf "$OUT/tiny_vq_transformer.tar" -C "$W" tiny_vq/transformer
[ -d "$W/tiny_ddpm/unet" ] && tar -cf "$OUT/tiny_ddpm.tar" -C "$W" tiny_ddpm
ls -la "$OUT"
echo "rc vq,transformer=$rc_vq ddpm=$rc_ddpm $(date +%T)"
exit $(( rc_vq || rc_ddpm ))
