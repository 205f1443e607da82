#!/usr/bin/env bash
# PAA on Synthetic-LT with focal loss and EFL, 700 iterations: the schedule of the one-stage
# 700-iteration table in docs/MODEL_ZOO.md (lr x0.1 at 540 and 650, RFS t = 0.001), run by
# benchmarks/synthetic_lt_one_stage.sh, which skips finished runs and resumes cut-off ones
# (--resume from the checkpoint written every 100 iterations). Then the AP table and the
# iteration times of PAA focal, PAA EFL and ATSS focal measured side by side
# (benchmarks/iteration_speed.py, on the same batches).
#
#   benchmarks/paa_synthetic_lt.sh [train_net overrides ...]
#
# Environment: as synthetic_lt_one_stage.sh (PYTHON, SEED, OMP_NUM_THREADS, default 1), OUT
# (default output/bench700/paa), SPEED (1: also measure iteration times; 0: skip).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-output/bench700/paa}
RUNS="paa_R18_FPN_focal paa_R18_FPN_efl" SPEED=0 OUT="$OUT" PYTHON="$PYTHON" \
  benchmarks/synthetic_lt_one_stage.sh SOLVER.MAX_ITER 700 SOLVER.STEPS "(540, 650)" \
  DATALOADER.REPEAT_THRESHOLD 0.001 "$@"
if [ "${SPEED:-1}" = 1 ]; then
  "$PYTHON" benchmarks/iteration_speed.py configs/Synthetic-LT/paa_R18_FPN_focal.yaml \
    configs/Synthetic-LT/paa_R18_FPN_efl.yaml configs/Synthetic-LT/atss_R18_FPN_focal.yaml "$@"
fi
