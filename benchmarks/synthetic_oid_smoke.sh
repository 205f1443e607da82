#!/usr/bin/env bash
# Smoke table on Synthetic-OID (docs/OPEN_IMAGES.md): Faster R-CNN (EQL heads) with sigmoid
# cross-entropy and with EQL, ATSS with focal loss and with EFL, each trained to its config's
# schedule (1000 iterations at batch 8) and evaluated by the Open Images Challenge rules;
# then the table of AP and AP1..AP5 from their final_metrics.json.
#
#   nohup benchmarks/synthetic_oid_smoke.sh > output/synthetic_oid_smoke.log 2>&1 &
#   ONLY="frcnn_sigmoid frcnn_eql" benchmarks/synthetic_oid_smoke.sh      # a subset
#   OUT=/tmp/smoke benchmarks/synthetic_oid_smoke.sh SOLVER.MAX_ITER 20   # options for every run
#
# The preset is generated once into $DATA/synthetic_oid_seed<SEED> (SEED, default 0, is also
# the training seed). A run whose final_metrics.json exists is skipped; a run cut off
# continues from its last checkpoint (--resume; one every CHECKPOINT iterations, default
# 200). When a run has finished its periodic checkpoints are deleted (model_final.pth
# stays). One thread per run; a second driver with another ONLY can use another core.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-output/synthetic_oid_smoke}
DATA=${DATA:-datasets}
SEED=${SEED:-0}
CHECKPOINT=${CHECKPOINT:-200}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source benchmarks/runs.sh

# name | config
RUNS=(
  "frcnn_sigmoid|configs/Synthetic-OID/EQL/faster_rcnn_R18_FPN_sigmoid.yaml"
  "frcnn_eql|configs/Synthetic-OID/EQL/faster_rcnn_R18_FPN_eql.yaml"
  "atss_focal|configs/Synthetic-OID/atss_R18_FPN_focal.yaml"
  "atss_efl|configs/Synthetic-OID/atss_R18_FPN_efl.yaml"
)
select_runs

root=$DATA/synthetic_oid_seed$SEED
if [[ ! -f $root/synthetic_oid.json ]]; then
  # the marker file is written last: a cut-off generation is redone
  echo "== generating Synthetic-OID seed $SEED into $root"
  "$PY" -m eql_d2.data.synthetic_oid --seed "$SEED" --out "$root"
fi
for run in "${RUNS[@]}"; do
  IFS='|' read -r name config <<<"$run"
  dir=$OUT/$name
  train_once "$name" "$config $*" "$dir" "$dir.log" \
    env EQL_D2_SYNTHETIC_OID_ROOT="$(realpath "$root")" \
    "$PY" train_net.py --resume --config-file "$config" SEED "$SEED" OUTPUT_DIR "$dir" \
    SOLVER.CHECKPOINT_PERIOD "$CHECKPOINT" "$@"
  rm -f "$dir"/model_0*.pth
done

"$PY" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
arms = [("frcnn_sigmoid", "Faster R-CNN", "sigmoid"), ("frcnn_eql", "Faster R-CNN", "EQL"),
        ("atss_focal", "ATSS", "focal"), ("atss_efl", "ATSS", "EFL")]
print("| detector | loss | groups by | AP | AP1 | AP2 | AP3 | AP4 | AP5 |")
print("|---|---|---|---|---|---|---|---|---|")
for name, detector, loss in arms:
    path = os.path.join(out, name, "final_metrics.json")
    if not os.path.isfile(path):
        continue
    with open(path) as f:
        m = next(iter(json.load(f).values()))["bbox"]
    groups = ("train images, AP5 rarest" if detector != "ATSS"
              else "train instances, AP1 rarest")
    print(f"| {detector} | {loss} | {groups} | "
          + " | ".join(f"{m[k]:.2f}" for k in ("AP", "AP1", "AP2", "AP3", "AP4", "AP5")) + " |")
PY
