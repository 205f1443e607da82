#!/usr/bin/env bash
# Every detector and classification loss on CPU: Faster / Mask R-CNN with EQLROIHeads
# (softmax, sigmoid, EQL, EQLv2) and ATSS / RetinaNet (focal, EFL, QFL, EQFL, sigmoid CE)
# train ITERS iterations (default 20) on a small Synthetic-LT (8 categories, 64 px, batch 2)
# from the shipped Synthetic-LT configs, then `train_net.py --eval-only` re-evaluates
# model_final.pth with the LVIS evaluator. Prints, per run, the last logged total_loss and
# loss_cls, whether every logged loss is finite, whether the --eval-only metrics equal the
# end-of-training ones, and bbox (segm) AP.
#
#   benchmarks/train_eval_20iter.sh            # OUT=output/benchmarks/train_eval_20iter
#   ONLY="atss_efl mask_eqlv2" benchmarks/train_eval_20iter.sh   # a subset of the runs
#
# A run whose eval_metrics.json exists is not repeated (delete OUT to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ITERS=${ITERS:-20}
OUT=${OUT:-output/benchmarks/train_eval_20iter}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export EQL_D2_SYNTHETIC_ROOT=$OUT/small_synthetic_lt
mkdir -p "$OUT"
if [[ ! -f $EQL_D2_SYNTHETIC_ROOT/generator.json ]]; then
  "$PY" -m eql_d2.data.synthetic --out "$EQL_D2_SYNTHETIC_ROOT" --num-categories 8 \
    --image-size 64 --max-frequent-images 110 --val-instances 2 --seed 3
fi
SMALL=(SOLVER.IMS_PER_BATCH 2 SOLVER.MAX_ITER "$ITERS" SOLVER.WARMUP_ITERS 5 SOLVER.STEPS "()"
       INPUT.MIN_SIZE_TRAIN "(64,)" INPUT.MAX_SIZE_TRAIN 64 INPUT.MIN_SIZE_TEST 64
       INPUT.MAX_SIZE_TEST 64 DATALOADER.NUM_WORKERS 0 SOLVER.CHECKPOINT_PERIOD 100000)
TWO_STAGE=(MODEL.ROI_HEADS.NUM_CLASSES 8 MODEL.CLS_LOSS.LOG_PERIOD 5)
ONE_STAGE=(MODEL.ATSS.NUM_CLASSES 8 MODEL.RETINANET.NUM_CLASSES 8 MODEL.CLS_LOSS.LOG_PERIOD 5)

# name | config | extra options
RUNS=()
for arch in faster mask; do
  for loss in softmax sigmoid eql eqlv2; do
    RUNS+=("${arch}_${loss}|EQL/${arch}_rcnn_R18_FPN_${loss}.yaml|two")
  done
done
for arch in atss retinanet; do
  for loss in focal efl qfl eqfl sigmoid_ce; do
    RUNS+=("${arch}_${loss}|${arch}_R18_FPN_focal.yaml|one MODEL.CLS_LOSS.NAME $loss")
  done
done

names=()
for run in "${RUNS[@]}"; do
  IFS='|' read -r name cfg extra <<<"$run"
  [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]] && continue
  names+=("$name")
  dir=$OUT/$name
  [[ -f $dir/eval/eval_metrics.json ]] && continue
  read -r kind extra <<<"$extra"
  if [[ $kind == two ]]; then opts=("${SMALL[@]}" "${TWO_STAGE[@]}"); else opts=("${SMALL[@]}" "${ONE_STAGE[@]}"); fi
  # shellcheck disable=SC2206
  opts+=($extra)
  start=$(date +%s)
  "$PY" train_net.py --config-file "configs/Synthetic-LT/$cfg" "${opts[@]}" OUTPUT_DIR "$dir" \
    >"$dir.train.log" 2>&1 || { echo "$name: training failed, see $dir.train.log"; exit 1; }
  "$PY" train_net.py --config-file "configs/Synthetic-LT/$cfg" --eval-only "${opts[@]}" \
    MODEL.WEIGHTS "$dir/model_final.pth" OUTPUT_DIR "$dir/eval" >"$dir.eval.log" 2>&1 \
    || { echo "$name: --eval-only failed, see $dir.eval.log"; exit 1; }
  echo "== $name: $(( $(date +%s) - start )) s"
done

"$PY" - "$OUT" "${names[@]}" <<'PYEOF'
import json, math, os, sys
out, names = sys.argv[1], sys.argv[2:]
print("| run | iterations | total_loss | loss_cls | all logged losses finite "
      "| --eval-only = end of training | bbox AP | segm AP |")
print("|---|---|---|---|---|---|---|---|")
for name in names:
    d = os.path.join(out, name)
    with open(os.path.join(d, "metrics.json")) as f:
        recs = [json.loads(l) for l in f if '"total_loss"' in l]
    last = recs[-1]  # detectron2 logs the median over the last 20 iterations
    finite = all(math.isfinite(v) for r in recs for k, v in r.items() if k.startswith("loss"))
    with open(os.path.join(d, "final_metrics.json")) as f:
        final = json.load(f)
    with open(os.path.join(d, "eval", "eval_metrics.json")) as f:
        evaluated = json.load(f)
    m = next(iter(evaluated.values()))
    segm = f"{m['segm']['AP']:.2f}" if "segm" in m else "-"
    print(f"| {name} | {last['iteration'] + 1} | {last['total_loss']:.3f} | "
          f"{last['loss_cls']:.3f} | {finite} | {evaluated == final} | {m['bbox']['AP']:.2f} | {segm} |")
PYEOF
