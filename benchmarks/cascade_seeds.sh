#!/usr/bin/env bash
# Cascade Mask R-CNN R18-FPN on Synthetic-LT, sigmoid against EQLv2 (with the image-level
# verified mask, the EQL paper's rule, and without it, the EQLv2 authors'), 700 iterations, on several
# seeds, one run after another with one thread (resumable: finished runs are skipped, a run
# cut off continues from its last checkpoint). Tables: benchmarks/cascade_diagnosis.py.
#
#   benchmarks/cascade_seeds.sh                         # seeds 0 1 2, the three arms
#   SEEDS="3" ONLY="eqlv2" benchmarks/cascade_seeds.sh MODEL.IMAGE_LABELS.VERIFIED False
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/bench700/cascade}
for seed in ${SEEDS:-0 1 2}; do
  ARCH=cascade_mask OUT=${OUT}_seed${seed} SEED=$seed ONLY=${ONLY:-"sigmoid eqlv2 eqlv2_no_image_labels"} \
    benchmarks/synthetic_lt_two_stage.sh SOLVER.MAX_ITER 700 SOLVER.STEPS "(540, 650)" "$@"
done
