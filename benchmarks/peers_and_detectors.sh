#!/usr/bin/env bash
# The 700-iteration Synthetic-LT runs of the peer losses and the added detectors, one after
# another on one thread, each resumable; finished runs are skipped, so running it again
# continues where it stopped. Tables: see each script's output (and BENCHMARKS.md).
#   nohup benchmarks/peers_and_detectors.sh > output/bench700/peers.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
SCHEDULE=(SOLVER.MAX_ITER 700 SOLVER.STEPS "(540, 650)")
# Faster R-CNN: Seesaw and federated loss next to the existing sigmoid / EQL / EQLv2 rows
OUT=output/bench700/two_stage ONLY="seesaw federated sigmoid" \
  benchmarks/synthetic_lt_two_stage.sh "${SCHEDULE[@]}"
# FCOS: EFL against focal
SPEED=0 OUT=output/bench700/fcos RUNS="fcos_R18_FPN_focal fcos_R18_FPN_efl" \
  benchmarks/synthetic_lt_one_stage.sh "${SCHEDULE[@]}"
# Cascade Mask R-CNN: EQLv2 against sigmoid, with the regime indicators that
# benchmarks/results/synthetic_lt_700 keeps (a snapshot every 100 iterations)
ARCH=cascade_mask OUT=output/bench700/cascade ONLY="sigmoid eqlv2" \
  benchmarks/synthetic_lt_two_stage.sh "${SCHEDULE[@]}" \
  MODEL.CLS_LOSS.REGIME_INDICATORS True MODEL.CLS_LOSS.LOG_PERIOD 100
