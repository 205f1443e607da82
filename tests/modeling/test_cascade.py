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


def test_test_scores_combine_the_stages_as_configured(monkeypatch):
    """mean_logits: the loss's probabilities of the mean of the stages' logits (EQLv2:
    sigmoid(z_j) (1 - sigmoid(z_obj)) of the mean); stageK: that stage's own; boxes from the
    last stage. Checked against the stage outputs recorded during the same forward pass."""
    import pytest
    from detectron2.modeling import build_model

    from eql_d2.config import get_eql_cfg
    from eql_d2.modeling.roi_heads import cascade

    torch.manual_seed(0)
    cfg = get_eql_cfg(CFG, [*TINY_RCNN, "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
                            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    model = build_model(cfg).eval()
    image = {"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8),
             "height": 64, "width": 64}
    seen, captured = [], {}
    for predictor in model.roi_heads.box_predictor:
        predictor.register_forward_hook(lambda m, i, out: seen.append(out[0].detach()))

    def capture(boxes, scores, *args):
        captured["scores"], captured["boxes"] = scores[0], boxes[0]
        return [Instances((64, 64), pred_boxes=Boxes(torch.zeros(0, 4)), scores=torch.zeros(0),
                          pred_classes=torch.zeros(0, dtype=torch.long))], None

    from detectron2.structures import Boxes, Instances

    monkeypatch.setattr(cascade, "fast_rcnn_inference", capture)
    for mode in ("mean_logits", "stage1", "stage3"):
        seen.clear()
        model.roi_heads.test_scores = mode
        with torch.no_grad():
            model([image])
        assert len(seen) == 3
        logits = sum(seen) / 3 if mode == "mean_logits" else seen[int(mode[-1]) - 1]
        want = torch.sigmoid(logits[:, :-1]) * torch.sigmoid(-logits[:, -1:])
        torch.testing.assert_close(captured["scores"][:, :-1], want)
        torch.testing.assert_close(captured["scores"][:, -1], 1 - want.amax(dim=1))
    with pytest.raises(ValueError, match="TEST_SCORES 'stage4' is not one of"):
        get = get_eql_cfg(CFG, [*TINY_RCNN, "MODEL.ROI_BOX_CASCADE_HEAD.TEST_SCORES", "stage4",
                                "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"])
        build_model(get)


def test_sample_every_stage_samples_the_later_stages_as_the_first():
    """SAMPLE_EVERY_STAGE: a later stage labels the ground truth plus the previous stage's
    boxes and samples BATCH_SIZE_PER_IMAGE of them with at most POSITIVE_FRACTION
    foreground; off, it labels every box of the previous stage (detectron2)."""
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    from eql_d2.config import get_eql_cfg

    gt = torch.tensor([[4.0, 4.0, 30.0, 30.0], [34.0, 34.0, 60.0, 60.0]])
    far = torch.tensor([[0.0, 40.0, 8.0, 48.0]]).repeat(4, 1)
    # 40 boxes on the objects (IoU 1 at every stage's threshold) and 4 background boxes
    boxes = torch.cat([gt.repeat(20, 1), far])
    targets = [Instances((64, 64), gt_boxes=Boxes(gt), gt_classes=torch.tensor([1, 5]))]

    def label(sample_every_stage, stage):
        cfg = get_eql_cfg(CFG, [*TINY_RCNN, "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
                                "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
                                "MODEL.ROI_BOX_CASCADE_HEAD.SAMPLE_EVERY_STAGE",
                                str(sample_every_stage)])
        heads = build_model(cfg).roi_heads
        proposals = [Instances((64, 64), proposal_boxes=Boxes(boxes.clone()))]
        with EventStorage() as storage:
            out = heads._match_and_label_boxes(proposals, stage, targets)[0]
            # one value per count and stage: what the stage classifies
            logged = {k: v.values() for k, v in storage.histories().items()}
        logged = {k: v[0][0] for k, v in logged.items() if len(v) == 1}
        fg = int((out.gt_classes < 8).sum())
        assert logged[f"stage{stage}/roi_head/num_fg_samples"] == fg
        assert logged[f"stage{stage}/roi_head/num_bg_samples"] == len(out) - fg
        return len(out), fg

    for stage in (1, 2):
        assert label(False, stage) == (44, 40)
        # 42 foreground (the 40 boxes and the 2 ground-truth boxes) and 4 background: 8 of
        # the foreground (32 x 0.25) and all 4 background are kept
        assert label(True, stage) == (12, 8)
