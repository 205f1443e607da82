#!/usr/bin/env bash
# The hard-tail detectors' pre-trained R18 (docs/HARD_TAIL.md, "A backbone pre-trained as
# LVIS's are"): generate synthetic_hard_tail_pretrain if absent, train its Faster R-CNN 16
# epochs (skipped when finished, resumed from its last checkpoint when cut off), then keep
# its ResNet as a backbone file.
#
#   nohup benchmarks/hard_tail_pretrain.sh > output/hard_tail_pretrain.log 2>&1 &
#   OUT=/tmp/p BACKBONE=/tmp/p/r18.pth benchmarks/hard_tail_pretrain.sh SOLVER.EPOCHS 0.1
#
# Options after the script name go to train_net.py. One thread.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-output/synthetic_hard_tail_pretrain/faster_rcnn_R18_FPN}
DATA=${DATA:-datasets/synthetic_hard_tail_pretrain}
BACKBONE=${BACKBONE:-datasets/synthetic_hard_tail_R18_pretrained.pth}
CONFIG=configs/Synthetic-HardTail/Pretrain/faster_rcnn_R18_FPN_d2heads_softmax_pretrain.yaml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source benchmarks/runs.sh

if [[ ! -f $DATA/generator.json ]]; then
  # the generator writes the folder aside and renames it into place when complete
  echo "== generating synthetic_hard_tail_pretrain into $DATA"
  "$PY" -m eql_d2.data.synthetic --preset synthetic_hard_tail_pretrain --out "$DATA"
fi
train_once "pre-training" "$CONFIG $*" "$OUT" "$OUT.log" \
  env EQL_D2_SYNTHETIC_HARD_TAIL_PRETRAIN_ROOT="$(realpath "$DATA")" \
  "$PY" train_net.py --resume --config-file "$CONFIG" OUTPUT_DIR "$OUT" "$@"
rm -f "$OUT"/model_0*.pth
"$PY" tools/backbone_weights.py --half "$OUT/model_final.pth" "$BACKBONE"
