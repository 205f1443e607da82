"""Cascade Mask R-CNN with the EQL box predictor in every stage: trains, keeps EQLv2
statistics per stage in its checkpoint, and --eval-only reproduces the final metrics."""

import json
import os

import torch

from helpers import ROOT, TINY_RCNN, run_train_net

CFG = os.path.join(ROOT, "configs/Synthetic-LT/EQL/cascade_mask_rcnn_R18_FPN_eqlv2.yaml")


def test_cascade_eqlv2_trains_keeps_statistics_per_stage_and_evaluates(small_synthetic, tmp_path):
    env = {"EQL_D2_SYNTHETIC_ROOT": small_synthetic, "OMP_NUM_THREADS": "1"}
    out = str(tmp_path)
    opts = [*TINY_RCNN, "MODEL.CLS_LOSS.LOG_PERIOD", "1"]
    proc = run_train_net(["--config-file", CFG, *opts, "OUTPUT_DIR", out], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu",
                       weights_only=False)["model"]
    for k in range(3):
        neg = state[f"roi_heads.box_predictor.{k}.cls_loss.neg_grad"]
        pos = state[f"roi_heads.box_predictor.{k}.cls_loss.pos_grad"]
        assert neg.shape == (8,) and neg.sum() > 0 and pos.sum() > 0
    # the stages see different proposals, so their statistics differ
    assert not torch.equal(state["roi_heads.box_predictor.0.cls_loss.neg_grad"],
                           state["roi_heads.box_predictor.2.cls_loss.neg_grad"])
    with open(os.path.join(out, "metrics.json")) as f:
        logged = [json.loads(line) for line in f if line.strip()]
    assert any("stage2/eqlv2/gradient_ratio/f" in row for row in logged)

    with open(os.path.join(out, "final_metrics.json")) as f:
        final = json.load(f)
    assert set(final["synthetic_lt_val"]) == {"bbox", "segm"}
    proc = run_train_net(["--config-file", CFG, "--eval-only", *opts, "MODEL.WEIGHTS",
                          os.path.join(out, "model_final.pth"), "OUTPUT_DIR",
                          os.path.join(out, "eval")], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "eval", "eval_metrics.json")) as f:
        assert json.load(f) == final
