#!/usr/bin/env bash
# One-stage losses on Synthetic-LT: ATSS with focal / EFL / QFL / EQFL and
# RetinaNet with focal / EFL, one seed each, run one after another; then a markdown table
# of bbox AP / APr / APc / APf and the ATSS+EFL vs ATSS+focal iteration-time comparison.
#
#   benchmarks/synthetic_lt_one_stage.sh [train_net overrides ...]
#   e.g. benchmarks/synthetic_lt_one_stage.sh SOLVER.MAX_ITER 100 SOLVER.STEPS "(76, 92)" SOLVER.WARMUP_ITERS 20
#
# Environment: PYTHON (default .venv/bin/python), SEED (0), OUT (output/benchmarks/
# synthetic_lt_one_stage), OMP_NUM_THREADS (default 1: on a shared 2-core machine two
# OpenMP threads per process were up to 8x slower than one, measured), RUNS (the configs
# to run, in order), SPEED (1: also run the speed comparison; 0: skip it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SEED=${SEED:-0}
OUT=${OUT:-output/benchmarks/synthetic_lt_one_stage}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUNS=${RUNS:-"atss_R18_FPN_focal atss_R18_FPN_efl retinanet_R18_FPN_focal retinanet_R18_FPN_efl atss_R18_FPN_qfl atss_R18_FPN_eqfl"}
mkdir -p "$OUT"
for run in $RUNS; do
  if [ -f "$OUT/$run/final_metrics.json" ]; then
    echo "== $run: done already ($OUT/$run/final_metrics.json)"; continue
  fi
  echo "== $run"
  # --resume: a run cut off continues from its last checkpoint (SOLVER.CHECKPOINT_PERIOD)
  "$PYTHON" train_net.py --resume --config-file "configs/Synthetic-LT/$run.yaml" SEED "$SEED" \
    OUTPUT_DIR "$OUT/$run" SOLVER.CHECKPOINT_PERIOD 100 "$@" >> "$OUT/$run.log" 2>&1 \
    || { echo "$run failed: see $OUT/$run.log"; exit 1; }
done
"$PYTHON" benchmarks/one_stage_table.py "$OUT" $RUNS
if [ "${SPEED:-1}" = 1 ]; then
  "$PYTHON" benchmarks/iteration_speed.py configs/Synthetic-LT/atss_R18_FPN_focal.yaml \
    configs/Synthetic-LT/atss_R18_FPN_efl.yaml
fi
