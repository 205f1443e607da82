#!/usr/bin/env bash
# YOLOX on Synthetic-LT, 700 iterations: YOLOX as released with sigmoid cross-entropy and the
# EFL paper's enhanced YOLOX with focal loss, EFL, QFL and EQFL (the loss rows of its Tab. 8,
# configs/Synthetic-LT/yolox_tiny_*.yaml), on the data of the one-stage 700-iteration table in
# docs/MODEL_ZOO.md (RFS t = 0.001) with YOLOX's own schedule (warm-up, cosine to 0.05 x lr),
# run by benchmarks/synthetic_lt_one_stage.sh, which skips finished runs and resumes cut-off
# ones (--resume from the checkpoint written every 100 iterations). Then the AP table and the
# iteration times of YOLOX focal, EFL and sigmoid and ATSS focal measured side by side
# (benchmarks/iteration_speed.py, on the same batches).
#
#   benchmarks/yolox_synthetic_lt.sh [train_net overrides ...]
#
# Environment: as synthetic_lt_one_stage.sh (PYTHON, SEED, OMP_NUM_THREADS, default 1), OUT
# (default output/bench700/yolox), SPEED (1: also measure iteration times; 0: skip).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-output/bench700/yolox}
RUNS="yolox_tiny_focal yolox_tiny_efl yolox_tiny_sigmoid yolox_tiny_qfl yolox_tiny_eqfl" \
  SPEED=0 OUT="$OUT" PYTHON="$PYTHON" \
  benchmarks/synthetic_lt_one_stage.sh SOLVER.MAX_ITER 700 DATALOADER.REPEAT_THRESHOLD 0.001 "$@"
if [ "${SPEED:-1}" = 1 ]; then
  "$PYTHON" benchmarks/iteration_speed.py configs/Synthetic-LT/yolox_tiny_focal.yaml \
    configs/Synthetic-LT/yolox_tiny_efl.yaml configs/Synthetic-LT/yolox_tiny_sigmoid.yaml \
    configs/Synthetic-LT/atss_R18_FPN_focal.yaml "$@"
fi
