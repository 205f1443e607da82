#!/usr/bin/env bash
# Softmax vs SEQL on the generated Synthetic-CLS-LT (docs/CLASSIFICATION.md): the two CPU
# configs on seeds 0-2, then SEQL's gamma sweep of EQL's Tab. 7 (gamma 0, 0.75, 0.9, 0.95,
# 0.99 at lambda 3e-3) at a reduced size (SWEEP_OPTS), seeds 0-2; then the tables
# (benchmarks/classification_table.py).
#
#   nohup benchmarks/classification_seql.sh > output/classification_seql.log 2>&1 &
#   SEEDS="0" ONLY="softmax seql" benchmarks/classification_seql.sh      # a subset
#   OUT=/tmp/c PRESET_ARGS="--max-images 40" benchmarks/classification_seql.sh SOLVER.MAX_ITER 4
#
# Seed s trains on the preset generated with --seed s (DATA/synthetic_cls_lt_seed<s>, made
# here if absent; PRESET_ARGS are passed to the generator) with SEED s, so arms are paired
# by seed. Options after the script name go to every run, after SWEEP_OPTS. A run whose
# final_metrics.json exists is skipped; a run cut off continues from its last checkpoint
# (--resume). When a run has finished its periodic checkpoints are deleted (model_final.pth
# stays). One thread per run; a second driver with other SEEDS or ONLY can use another core.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-output/classification_seql}
DATA=${DATA:-datasets}
SEEDS=${SEEDS:-0 1 2}
PRESET_ARGS=${PRESET_ARGS:-}
SWEEP_OPTS=${SWEEP_OPTS:-SOLVER.MAX_ITER 1000 SOLVER.STEPS (500,750) SOLVER.WARMUP_ITERS 50 SOLVER.CHECKPOINT_PERIOD 250}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source benchmarks/runs.sh
SOFTMAX=configs/Classification/synthetic_cls_lt_R32_softmax.yaml
SEQL=configs/Classification/synthetic_cls_lt_R32_seql.yaml

# name | config | options
RUNS=(
  "softmax|$SOFTMAX|"
  "seql|$SEQL|"
)
for gamma in 0.0 0.75 0.9 0.95 0.99; do
  RUNS+=("sweep_gamma$gamma|$SEQL|$SWEEP_OPTS MODEL.CLS_LOSS.SEQL.GAMMA $gamma")
done
select_runs

for seed in $SEEDS; do
  root=$DATA/synthetic_cls_lt_seed$seed
  if [[ ! -f $root/generator.json ]]; then
    # written aside and renamed into place when complete
    echo "== generating Synthetic-CLS-LT seed $seed into $root"
    # shellcheck disable=SC2086
    "$PY" -m eql_d2.data.classification --seed "$seed" --out "$root" $PRESET_ARGS
  fi
  for run in "${RUNS[@]}"; do
    IFS='|' read -r name config options <<<"$run"
    dir=$OUT/$name/seed$seed
    # shellcheck disable=SC2086
    train_once "$name seed $seed" "$config $options $*" "$dir" "$dir.log" \
      env EQL_D2_SYNTHETIC_CLS_LT_ROOT="$(realpath "$root")" \
      "$PY" train_net.py --resume --config-file "$config" SEED "$seed" OUTPUT_DIR "$dir" \
      $options "$@"
    rm -f "$dir"/model_0*.pth
  done
done

"$PY" benchmarks/classification_table.py "$OUT"
