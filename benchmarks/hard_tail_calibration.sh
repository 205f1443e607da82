#!/usr/bin/env bash
# Calibration of the hard-tail preset (docs/HARD_TAIL.md): the two baselines, ATSS + focal
# loss and Faster R-CNN + sigmoid (EQL heads), on seeds 0-2, each trained to its config's
# schedule in epochs with the federated val evaluated every epoch; then the convergence
# curves (PNG) and the table of final APr / APf (benchmarks/hard_tail_curves.py).
#
#   nohup benchmarks/hard_tail_calibration.sh > output/hard_tail_calibration.log 2>&1 &
#   SEEDS="0" ONLY="atss_focal" benchmarks/hard_tail_calibration.sh     # a subset
#   OUT=/tmp/calib benchmarks/hard_tail_calibration.sh SOLVER.EPOCHS 16.0  # options for every run
#
# Seed s trains on the preset generated with --seed s (DATA/synthetic_hard_tail_seed<s>,
# made here if absent) with SEED s, so the two baselines are paired by seed. A run whose
# final_metrics.json exists is skipped; a run cut off continues from its last checkpoint
# (--resume, one an epoch). When a run has finished its periodic checkpoints are deleted
# (model_final.pth stays). One thread per run; a second driver with other SEEDS or ONLY can
# use another core.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-output/hard_tail_calibration}
DATA=${DATA:-datasets}
SEEDS=${SEEDS:-0 1 2}
PNG=${PNG:-$OUT/convergence.png}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source benchmarks/runs.sh

# name | config
RUNS=(
  "atss_focal|configs/Synthetic-HardTail/atss_R18_FPN_focal.yaml"
  "frcnn_sigmoid|configs/Synthetic-HardTail/EQL/faster_rcnn_R18_FPN_sigmoid.yaml"
)
select_runs

for seed in $SEEDS; do
  root=$DATA/synthetic_hard_tail_seed$seed
  if [[ ! -f $root/generator.json ]]; then
    # the generator writes the folder aside and renames it into place when complete
    echo "== generating synthetic_hard_tail seed $seed into $root"
    "$PY" -m eql_d2.data.synthetic --preset synthetic_hard_tail --seed "$seed" --out "$root"
  fi
  for run in "${RUNS[@]}"; do
    IFS='|' read -r name config <<<"$run"
    dir=$OUT/$name/seed$seed
    train_once "$name seed $seed" "$config $*" "$dir" "$dir.log" \
      env EQL_D2_SYNTHETIC_HARD_TAIL_ROOT="$(realpath "$root")" \
      "$PY" train_net.py --resume --config-file "$config" SEED "$seed" OUTPUT_DIR "$dir" "$@"
    rm -f "$dir"/model_0*.pth
  done
done

"$PY" benchmarks/hard_tail_curves.py "$OUT" --png "$PNG"
