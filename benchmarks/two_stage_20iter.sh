#!/usr/bin/env bash
# Two-stage heads on CPU: Faster and Mask R-CNN with EQLROIHeads and each loss train
# ITERS iterations (default 20) on a small Synthetic-LT (8 categories, 64 px, batch 2), then
# `train_net.py --eval-only` re-evaluates model_final.pth with LVISEvaluator. Prints, per run,
# the logged total_loss and loss_cls, whether every logged loss is finite, and the eval-only
# bbox AP (and segm AP).
#
#   benchmarks/two_stage_20iter.sh            # OUT=output/benchmarks/two_stage_20iter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ITERS=${ITERS:-20}
OUT=${OUT:-output/benchmarks/two_stage_20iter}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export EQL_D2_SYNTHETIC_ROOT=$OUT/small_synthetic_lt
mkdir -p "$OUT"
if [[ ! -f $EQL_D2_SYNTHETIC_ROOT/generator.json ]]; then
  "$PY" -m eql_d2.data.synthetic --out "$EQL_D2_SYNTHETIC_ROOT" --num-categories 8 \
    --image-size 64 --max-frequent-images 110 --val-instances 2 --seed 3
fi
SMALL=(MODEL.ROI_HEADS.NUM_CLASSES 8 SOLVER.IMS_PER_BATCH 2 SOLVER.MAX_ITER "$ITERS"
       SOLVER.WARMUP_ITERS 5 "SOLVER.STEPS" "()" "INPUT.MIN_SIZE_TRAIN" "(64,)"
       INPUT.MAX_SIZE_TRAIN 64 INPUT.MIN_SIZE_TEST 64 INPUT.MAX_SIZE_TEST 64
       DATALOADER.NUM_WORKERS 0 MODEL.EQL.PERIOD 5 SOLVER.CHECKPOINT_PERIOD 100000)
for arch in faster mask; do
  for loss in softmax sigmoid eql eqlv2; do
    name=${arch}_${loss}
    cfg=configs/Synthetic-LT/EQL/${arch}_rcnn_R18_FPN_${loss}.yaml
    dir=$OUT/$name
    if [[ ! -f $dir/eval/eval_metrics.json ]]; then
      "$PY" train_net.py --config-file "$cfg" "${SMALL[@]}" OUTPUT_DIR "$dir" >"$dir.train.log" 2>&1 \
        || { echo "$name: training failed, see $dir.train.log"; exit 1; }
      "$PY" train_net.py --config-file "$cfg" --eval-only "${SMALL[@]}" \
        MODEL.WEIGHTS "$dir/model_final.pth" OUTPUT_DIR "$dir/eval" >"$dir.eval.log" 2>&1 \
        || { echo "$name: --eval-only failed, see $dir.eval.log"; exit 1; }
    fi
  done
done
"$PY" - "$OUT" <<'PYEOF'
import json, math, os, sys
out = sys.argv[1]
print("| run | iterations | total_loss | loss_cls | all logged losses finite | eval-only bbox AP | segm AP |")
print("|---|---|---|---|---|---|---|")
for arch in ("faster", "mask"):
    for loss in ("softmax", "sigmoid", "eql", "eqlv2"):
        d = os.path.join(out, f"{arch}_{loss}")
        with open(os.path.join(d, "metrics.json")) as f:
            recs = [json.loads(l) for l in f if '"total_loss"' in l]
        last = recs[-1]  # detectron2 logs the median over the last 20 iterations
        finite = all(math.isfinite(v) for r in recs for k, v in r.items() if k.startswith("loss"))
        with open(os.path.join(d, "eval", "eval_metrics.json")) as f:
            m = next(iter(json.load(f).values()))
        segm = f"{m['segm']['AP']:.2f}" if "segm" in m else "-"
        print(f"| {arch} R-CNN {loss} | {last['iteration'] + 1} | {last['total_loss']:.3f} | "
              f"{last['loss_cls']:.3f} | {finite} | {m['bbox']['AP']:.2f} | {segm} |")
PYEOF
