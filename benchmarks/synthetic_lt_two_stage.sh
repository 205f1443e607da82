#!/usr/bin/env bash
# Two-stage losses on Synthetic-LT: trains and evaluates an R18-FPN R-CNN with
# EQLROIHeads for each classification loss, one seed each, one run after another, then
# prints AP / APr / APc / APf (bbox) of every run as a Markdown table.
#
#   benchmarks/synthetic_lt_two_stage.sh                # Faster R-CNN, the configs' 200 iterations each
#   ARCH=mask benchmarks/synthetic_lt_two_stage.sh      # Mask R-CNN (adds segm columns)
#   ARCH=cascade_mask benchmarks/synthetic_lt_two_stage.sh   # Cascade Mask R-CNN
#   OUT=/tmp/b SEED=1 benchmarks/synthetic_lt_two_stage.sh EXTRA_OPT VALUE ...
#   ONLY="sigmoid eql" benchmarks/synthetic_lt_two_stage.sh   # a subset of the runs
#
# A run whose final_metrics.json exists is not repeated (delete OUT to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ARCH=${ARCH:-faster}
OUT=${OUT:-output/benchmarks/synthetic_lt_two_stage_${ARCH}}
SEED=${SEED:-0}
# One thread: on the shared, loaded 2-core machine an R18 iteration took ~15 s with two
# threads and ~3 s with one (measured, see BENCHMARKS.md).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source benchmarks/runs.sh
CFG=configs/Synthetic-LT/EQL/${ARCH}_rcnn_R18_FPN

# name | config loss | extra options
RUNS=(
  "sigmoid|sigmoid|"
  "eql|eql|MODEL.IMAGE_LABELS.VERIFIED True"
  "eqlv2|eqlv2|"
  "eqlv2_no_image_labels|eqlv2|MODEL.IMAGE_LABELS.VERIFIED False"
  "softmax|softmax|"
  "eql_no_image_labels|eql|MODEL.IMAGE_LABELS.VERIFIED False"
  "eql_ignore_not_exhaustive|eql|MODEL.IMAGE_LABELS.IGNORE_NOT_EXHAUSTIVE True"
  "seesaw|seesaw|"
  "federated|federated|"
)

# ONLY="sigmoid eql" runs (and tabulates) just those names
select_runs

mkdir -p "$(dirname "$OUT")"
for run in "${RUNS[@]}"; do
  IFS='|' read -r name loss extra <<<"$run"
  # shellcheck disable=SC2086
  train_once "$name" "${CFG}_${loss}.yaml $extra" "$OUT/$name" "$OUT.$name.log" \
    "$PY" train_net.py --resume --config-file "${CFG}_${loss}.yaml" SEED "$SEED" \
    OUTPUT_DIR "$OUT/$name" SOLVER.CHECKPOINT_PERIOD 100 $extra "$@"
done

"$PY" - "$OUT" "${RUNS[@]}" <<'PYEOF'
import json, os, sys
out, runs = sys.argv[1], [r.split("|")[0] for r in sys.argv[2:]]
tasks = None
rows = []
for name in runs:
    with open(os.path.join(out, name, "final_metrics.json")) as f:
        m = next(iter(json.load(f).values()))
    tasks = tasks or [t for t in ("bbox", "segm") if t in m]
    rows.append((name, m))
keys = ("AP", "APr", "APc", "APf")
head = " | ".join(f"{t} {k}" for t in tasks for k in keys)
print(f"| run | {head} |")
print("|---|" + "---|" * (len(tasks) * len(keys)))
for name, m in rows:
    vals = " | ".join(f"{m[t][k]:.2f}" for t in tasks for k in keys)
    print(f"| {name} | {vals} |")
PYEOF
