"""One-stage detectors (issue 5): ATSS assignment, IoU-branch targets, EFL statistics,
focal equivalences, every loss training and inferring, checkpointed statistics."""

import copy
import math
import os
import statistics

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.utils.events import EventStorage

import eql_d2.modeling  # noqa: F401  (registers ATSS, EFLRetinaNet)
from eql_d2.config import get_eql_cfg
from eql_d2.modeling.cls_losses import build_cls_loss
from eql_d2.modeling.meta_arch import DenseClassificationLoss, atss_match
from eql_d2.modeling.meta_arch.dense_loss import decode_positives

from helpers import (ROOT, dense_batch, dense_forward, matched_iou, record_criterion_calls,
                     seeded_model, sgd_steps)

BASE = os.path.join(ROOT, "configs/Synthetic-LT/Base-OneStage-R18-FPN.yaml")
NUM_CLASSES = 5
FREQ_DATASET = "one_stage_test_train"  # metadata only: gives the models class_frequency
MetadataCatalog.get(FREQ_DATASET).set(class_frequency=["r", "r", "c", "f", "f"])


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(arch, loss, *opts):
    cfg = get_eql_cfg(BASE)
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", arch, "MODEL.CLS_LOSS.NAME", loss,
        "MODEL.ATSS.NUM_CLASSES", str(NUM_CLASSES), "MODEL.RETINANET.NUM_CLASSES", str(NUM_CLASSES),
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ATSS.NUM_CONVS", "1",
        "MODEL.RETINANET.NUM_CONVS", "1", "MODEL.CLS_LOSS.LOG_PERIOD", "1",
        "DATASETS.TRAIN", f"('{FREQ_DATASET}',)", "DATASETS.TEST", "()", *opts,
    ])
    return cfg


# ---------------------------------------------------------------------- ATSS assignment


def brute_force_atss(gt_boxes, levels, k):
    """The ATSS rule, written out per box and anchor in plain Python."""
    anchors = [a for level in levels for a in level]
    offsets = [0]
    for level in levels:
        offsets.append(offsets[-1] + len(level))

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union

    best = [(-1.0, -1)] * len(anchors)  # (IoU, box) of the claim that wins each anchor
    for g, box in enumerate(gt_boxes):
        gx, gy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        cands = []
        for lv, level in enumerate(levels):
            def d2(i):
                a = anchors[i]
                return ((a[0] + a[2]) / 2 - gx) ** 2 + ((a[1] + a[3]) / 2 - gy) ** 2
            idx = range(offsets[lv], offsets[lv + 1])
            cands += sorted(idx, key=lambda i: (d2(i), i))[:k]
        ious = [iou(box, anchors[i]) for i in cands]
        thr = statistics.mean(ious) + (statistics.stdev(ious) if len(ious) > 1 else 0.0)
        for i, v in zip(cands, ious):
            cx, cy = (anchors[i][0] + anchors[i][2]) / 2, (anchors[i][1] + anchors[i][3]) / 2
            inside = box[0] < cx < box[2] and box[1] < cy < box[3]
            if v >= thr and inside and v > best[i][0]:
                best[i] = (v, g)
    return [g for _, g in best]


def grid_anchors(size=64, strides=(8, 16, 32), scales=(6, 8)):
    gen = DefaultAnchorGenerator(sizes=[[s * st for s in scales] for st in strides],
                                 aspect_ratios=[[1.0]], strides=list(strides), offset=0.0)
    feats = [torch.zeros(1, 1, math.ceil(size / s), math.ceil(size / s)) for s in strides]
    return [b.tensor for b in gen(feats)]


@pytest.mark.parametrize("seed", range(6))
def test_atss_match_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    # hand-made: irregular anchors on 3 "levels" (no two at the same distance) ...
    levels = []
    for n, side in ((30, 8.0), (12, 20.0), (5, 40.0)):
        ctr = torch.randint(0, 129, (n, 2), generator=g).float() / 2
        wh = side * (0.5 + torch.randint(0, 5, (n, 2), generator=g).float() / 4)
        levels.append(torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1))
    # ... and a real anchor grid with 2 anchors per location (equidistant pairs)
    grids = grid_anchors()
    for anchors, k in ((levels, 4), (levels, 18), (grids, 9), (grids, 18)):
        m = int(torch.randint(1, 7, (1,), generator=g))
        xy = torch.randint(0, 100, (m, 2), generator=g).float() / 2
        wh = torch.randint(8, 70, (m, 2), generator=g).float() / 2
        gt = torch.cat([xy, xy + wh], dim=1)
        got = atss_match(gt, anchors, k).tolist()
        want = brute_force_atss(gt.tolist(), [a.tolist() for a in anchors], k)
        assert got == want
        assert any(x >= 0 for x in got)  # every case has positives (not a vacuous match)


def test_atss_match_shared_anchor_goes_to_highest_iou_and_empty_gt():
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]])]
    # k = 1: each box's only candidate is the first anchor (threshold = its own IoU) and
    # both boxes contain its centre; IoU 64/180 for box 0 and 81/119 for box 1
    gt = torch.tensor([[2.0, 2.0, 14.0, 14.0], [1.0, 1.0, 11.0, 11.0]])
    assert atss_match(gt, anchors, 1).tolist() == [1, -1]
    assert atss_match(gt[:1], anchors, 1).tolist() == [0, -1]
    assert atss_match(gt[:0], anchors, 2).tolist() == [-1, -1]
    with pytest.raises(ValueError, match="MODEL.ATSS.TOPK"):
        atss_match(gt, anchors, 0)


def test_label_anchors_uses_the_rule_on_the_model_anchors():
    model = seeded_model(tiny_cfg("ATSS", "focal"))
    batch = dense_batch(NUM_CLASSES, seed=4)
    images = model.preprocess_image(batch)
    feats = model.backbone(images.tensor)
    anchors = model.anchor_generator([feats[f] for f in model.head_in_features])
    labels, boxes = model.label_anchors(anchors, [b["instances"] for b in batch])
    for inst, lab, box in zip([b["instances"] for b in batch], labels, boxes):
        want = brute_force_atss(inst.gt_boxes.tensor.tolist(), [a.tensor.tolist() for a in anchors], 18)
        want = torch.tensor(want)
        fg = want >= 0
        assert fg.any()
        assert torch.equal(lab[fg], inst.gt_classes[want[fg]])
        assert (lab[~fg] == NUM_CLASSES).all()
        assert torch.equal(box[fg], inst.gt_boxes.tensor[want[fg]])


# ---------------------------------------------------------------------- IoU branch


def _decode(deltas, anchors, weights=(10.0, 10.0, 5.0, 5.0)):
    """Box2BoxTransform.apply_deltas written out (no clamp needed for these deltas)."""
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + w / 2, anchors[:, 1] + h / 2
    dx, dy, dw, dh = (deltas[:, i] / weights[i] for i in range(4))
    pcx, pcy, pw, ph = cx + dx * w, cy + dy * h, w * torch.exp(dw), h * torch.exp(dh)
    return torch.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], dim=1)


def test_iou_branch_targets_are_iou_of_decoded_boxes():
    model = seeded_model(tiny_cfg("ATSS", "qfl"))
    model.train()
    batch = dense_batch(NUM_CLASSES, seed=5)
    with torch.no_grad():  # give the regression branch visible, non-zero deltas
        model.head.bbox_pred.weight.normal_(std=0.05)
    (logits, deltas, ious), anchors, labels, gt_boxes = dense_forward(model, batch, NUM_CLASSES)
    pos = (torch.stack(labels) < NUM_CLASSES)
    assert pos.sum() >= 4

    # expected: decode every anchor by hand, keep the positives, IoU with their ground truth
    all_anchors = torch.cat([a.tensor for a in anchors])
    all_deltas = torch.cat(deltas, dim=1).detach()
    img, idx = pos.nonzero().unbind(1)
    decoded = _decode(all_deltas[img, idx], all_anchors[idx])
    target = torch.stack(gt_boxes)[img, idx]
    want = matched_iou(decoded, target)
    assert want.std() > 0.01  # the targets differ between anchors

    got_boxes, got_target = decode_positives(model.box2box_transform, anchors, deltas, pos, gt_boxes)
    torch.testing.assert_close(got_boxes.detach(), decoded, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_target, target)

    # the IoU loss and the QFL soft labels of the model use exactly these targets
    calls = record_criterion_calls(model)
    with EventStorage():
        out = model.losses(anchors, logits, labels, deltas, gt_boxes, ious)
    normalizer = float(pos.sum())
    iou_logits = torch.cat(ious, dim=1).squeeze(-1)[img, idx]
    want_loss = torch.nn.functional.binary_cross_entropy_with_logits(iou_logits, want, reduction="sum")
    torch.testing.assert_close(out["loss_iou"], want_loss / normalizer, rtol=1e-5, atol=1e-6)
    quality = calls[0][0][3].view(pos.shape)
    torch.testing.assert_close(quality[pos], want, rtol=1e-5, atol=1e-6)
    assert (quality[~pos] == 0).all()


def _giou_loss_by_hand(a, b):
    """1 - GIoU of two XYXY boxes, in plain Python."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return 1.0 - (inter / union - (hull - union) / hull)


def test_giou_box_loss_both_forms_equal_the_hand_computed_values():
    from eql_d2.modeling.meta_arch.atss import giou_box_loss

    target = torch.tensor([[0.0, 0.0, 2.0, 2.0]] * 3)
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
    # losses 0, 1/2 and 1 + 5/63 (IoU 1/7, hull 9, union 7); IoU targets 1, 1/2, 1/7
    losses = [0.0, 0.5, 1.0 + 5.0 / 63.0]
    assert [_giou_loss_by_hand(p, t) for p, t in zip(pred.tolist(), target.tolist())] == \
        pytest.approx(losses)
    iou = torch.tensor([1.0, 0.5, 1.0 / 7.0])
    uniform = giou_box_loss(pred, target, iou, "uniform", torch.tensor(3.0))
    assert float(uniform) == pytest.approx(sum(losses) / 3, rel=1e-6)
    weighted = giou_box_loss(pred, target, iou, "iou", torch.tensor(3.0))
    want = (0.5 * 0.5 + (1 / 7) * (1 + 5 / 63)) / (1 + 0.5 + 1 / 7)
    assert float(weighted) == pytest.approx(want, rel=1e-6)
    # no positives: 0, not NaN
    empty = torch.zeros((0, 4))
    assert float(giou_box_loss(empty, empty, torch.zeros(0), "iou", torch.tensor(1.0))) == 0.0
    with pytest.raises(ValueError, match="BBOX_REG_LOSS_WEIGHTING must be one of uniform, iou"):
        giou_box_loss(pred, target, iou, "centerness", torch.tensor(3.0))


@pytest.mark.parametrize("weighting", ["uniform", "iou"])
def test_atss_box_loss_of_the_model_is_the_configured_form(weighting):
    model = seeded_model(tiny_cfg("ATSS", "focal", "MODEL.ATSS.BBOX_REG_LOSS_WEIGHTING",
                                  weighting, "MODEL.ATSS.BBOX_REG_LOSS_WEIGHT", "1.5",
                                  "MODEL.ATSS.BBOX_REG_WEIGHTS", "(1.0, 1.0, 1.0, 1.0)"))
    assert model.box2box_transform.weights == (1.0, 1.0, 1.0, 1.0)
    model.train()
    batch = dense_batch(NUM_CLASSES, seed=5)
    with torch.no_grad():
        model.head.bbox_pred.weight.normal_(std=0.05)
    (logits, deltas, ious), anchors, labels, gt_boxes = dense_forward(model, batch, NUM_CLASSES)
    pos = torch.stack(labels) < NUM_CLASSES
    boxes, targets = decode_positives(model.box2box_transform, anchors, deltas, pos, gt_boxes)
    pairs = list(zip(boxes.detach().tolist(), targets.tolist()))
    by_hand = [_giou_loss_by_hand(p, t) for p, t in pairs]
    iou = matched_iou(boxes.detach(), targets).tolist()
    if weighting == "uniform":
        want = sum(by_hand) / len(by_hand)
    else:
        want = sum(w * v for w, v in zip(iou, by_hand)) / sum(iou)
    with EventStorage():
        out = model.losses(anchors, logits, labels, deltas, gt_boxes, ious)
    assert float(out["loss_box_reg"].detach()) == pytest.approx(1.5 * want, rel=1e-4)


# ---------------------------------------------------------------------- EFL statistics


def reference_efl(z, labels, gamma, gamma_b, alpha, normalizer, quality=None):
    """EFL eq. 4 (or EQFL eq. 5 when quality is given) from autograd-friendly ops, float64."""
    c = z.shape[1]
    keep = labels >= 0
    z, labels = z[keep], labels[keep]
    onehot = torch.nn.functional.one_hot(labels, c + 1)[:, :c].to(z.dtype)
    p = torch.sigmoid(z)
    w = gamma / gamma_b
    if quality is None:
        pt = torch.where(onehot > 0, p, 1 - p)
        at = torch.where(onehot > 0, alpha, 1 - alpha)
        loss = -at * w * (1 - pt) ** gamma * torch.log(pt)
    else:
        y = onehot * quality[keep].to(z.dtype)[:, None]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
        loss = w * (y - p).abs() ** gamma * bce
    return loss.sum() / normalizer, onehot, keep


@pytest.mark.parametrize("arch,loss", [("ATSS", "efl"), ("ATSS", "eqfl"), ("EFLRetinaNet", "efl")])
def test_efl_statistics_equal_autograd_gradient_sums(arch, loss):
    # a prior of 0.2 makes the negatives' gradient comparable to the positives', so that
    # g^j < 1 and gamma^j differs between classes already in the second step
    model = seeded_model(tiny_cfg(arch, loss, "MODEL.ATSS.PRIOR_PROB", "0.2",
                                "MODEL.RETINANET.PRIOR_PROB", "0.2"))
    crit = model.cls_loss.criterion
    calls = record_criterion_calls(model)
    history, storage = sgd_steps(model, [dense_batch(NUM_CLASSES, seed=s) for s in (1, 2, 3)], lr=0.05)

    pos_sum = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    neg_sum = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    for step, ((logits, labels, normalizer, quality), gamma) in enumerate(calls):
        z = logits.detach().double().requires_grad_()
        ref, onehot, keep = reference_efl(z, labels, gamma.double(), 2.0, 0.25,
                                          float(normalizer), quality)
        ref.backward()
        torch.testing.assert_close(history[step]["loss_cls"].double(), ref.detach(), rtol=1e-5, atol=1e-7)
        grad = z.grad[keep].abs()
        pos_sum += (grad * onehot).sum(0)
        neg_sum += (grad * (1 - onehot)).sum(0)
        if step == 0:  # the first step has no statistics yet: gamma^j = gamma_b
            assert torch.equal(gamma, torch.full_like(gamma, 2.0))
    assert len(calls) == 3  # one statistics update per iteration
    gamma = calls[-1][1]  # later steps really used class-specific gamma^j
    assert gamma.max() > 2.1 and gamma.max() - gamma.min() > 0.01
    torch.testing.assert_close(crit.pos_grad.double(), pos_sum, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(crit.neg_grad.double(), neg_sum, rtol=1e-4, atol=1e-9)
    # g^j and gamma^j are logged by LVIS group
    hist = storage.histories()
    for name in ("efl/gradient_ratio/r", "efl/gradient_ratio/c", "efl/focusing_factor/f"):
        assert name in hist


@pytest.mark.parametrize("arch", ["ATSS", "EFLRetinaNet"])
def test_scale_zero_trains_identically_to_focal(arch):
    batches = [dense_batch(NUM_CLASSES, seed=s) for s in (7, 8, 9)]
    runs = {}
    for loss, opts in (("focal", ()), ("efl", ("MODEL.CLS_LOSS.EFL.SCALE", "0.0"))):
        model = seeded_model(tiny_cfg(arch, loss, *opts), seed=1)
        history, _ = sgd_steps(model, batches, lr=0.05)
        runs[loss] = (history, model.state_dict())
    for step_focal, step_efl in zip(runs["focal"][0], runs["efl"][0]):
        for key in step_focal:
            assert torch.equal(step_focal[key], step_efl[key]), key
    for key, value in runs["focal"][1].items():
        assert torch.equal(value, runs["efl"][1][key]), key
    assert runs["efl"][1]["cls_loss.criterion.neg_grad"].sum() > 0  # EFL did update statistics


def test_focal_default_matches_detectron2_retinanet():
    cfg = tiny_cfg("EFLRetinaNet", "focal")
    ours = seeded_model(cfg)
    d2_cfg = copy.deepcopy(cfg)
    d2_cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    theirs = seeded_model(d2_cfg)
    # the same network; our loss module's buffers (regime indicators) are not detectron2's
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items()
                            if not k.startswith("cls_loss.")}, strict=True)
    batch = dense_batch(NUM_CLASSES, seed=11)
    # one storage each: detectron2 puts num_pos_anchors smoothed every iteration, ours
    # puts it as the value of every 20th iteration
    with EventStorage():
        a = ours(batch)
    with EventStorage():
        b = theirs(batch)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- every loss


@pytest.mark.parametrize("arch,loss", [
    ("ATSS", "focal"), ("ATSS", "efl"), ("ATSS", "qfl"), ("ATSS", "eqfl"),
    ("EFLRetinaNet", "focal"), ("EFLRetinaNet", "efl"), ("EFLRetinaNet", "eqfl"),
    ("EFLRetinaNet", "qfl"), ("EFLRetinaNet", "sigmoid_ce"),
])
def test_each_loss_trains_and_infers(arch, loss):
    model = seeded_model(tiny_cfg(arch, loss, "TEST.DETECTIONS_PER_IMAGE", "50"))
    history, _ = sgd_steps(model, [dense_batch(NUM_CLASSES, seed=s, num_images=3) for s in (1, 2)])
    for losses in history:
        assert all(torch.isfinite(v) for v in losses.values()), losses
    assert history[0]["loss_cls"] > 0 and history[0]["loss_box_reg"] > 0
    model.eval()
    with torch.no_grad():
        out = model(dense_batch(NUM_CLASSES, seed=3))
    for res in out:
        inst = res["instances"]
        assert 0 < len(inst) <= 50
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < NUM_CLASSES)).all()


def test_atss_inference_scores_combine_class_and_iou():
    """With one location and no NMS ties, the top score is sqrt(p_cls * p_iou)."""
    model = seeded_model(tiny_cfg("ATSS", "focal", "TEST.DETECTIONS_PER_IMAGE", "1"))
    model.eval()
    with torch.no_grad():
        model.head.iou_pred.bias.fill_(2.0)
        model.head.cls_score.bias.fill_(-1.0)
        batch = dense_batch(NUM_CLASSES, seed=3)
        images = model.preprocess_image(batch)
        feats = model.backbone(images.tensor)
        preds = model.head([feats[f] for f in model.head_in_features])
        logits, _, ious = model._transpose_dense_predictions(preds, [NUM_CLASSES, 4, 1])
        want = max((torch.sigmoid(lg[0]) * torch.sigmoid(io[0])).sqrt().max() for lg, io in zip(logits, ious))
        got = model(batch)[0]["instances"].scores
    torch.testing.assert_close(got[0], want)


# ---------------------------------------------------------------------- checkpoints, errors


def test_checkpoint_round_trip_restores_statistics(tmp_path):
    cfg = tiny_cfg("ATSS", "efl")
    model = seeded_model(cfg)
    sgd_steps(model, [dense_batch(NUM_CLASSES, seed=s) for s in (1, 2)])
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_x")
    fresh = seeded_model(cfg, seed=5)
    assert fresh.cls_loss.criterion.neg_grad.sum() == 0
    DetectionCheckpointer(fresh, save_dir=str(tmp_path)).resume_or_load(
        str(tmp_path / "model_x.pth"), resume=True)
    for name in ("pos_grad", "neg_grad"):
        saved = getattr(model.cls_loss.criterion, name)
        assert saved.sum() > 0
        assert torch.equal(getattr(fresh.cls_loss.criterion, name), saved)
    assert torch.equal(fresh.cls_loss.criterion.focusing_factor, model.cls_loss.criterion.focusing_factor)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="MODEL.CLS_LOSS.NAME"):
        build_model(tiny_cfg("ATSS", "eqlv2"))
    with pytest.raises(ValueError, match="MODEL.RETINANET.FOCAL_LOSS_GAMMA"):
        build_model(tiny_cfg("EFLRetinaNet", "efl", "MODEL.RETINANET.FOCAL_LOSS_GAMMA", "3.0"))
    with pytest.raises(ValueError, match="MODEL.ATSS.IN_FEATURES"):
        build_model(tiny_cfg("ATSS", "efl", "MODEL.ATSS.IN_FEATURES", "['p3', 'p9']"))
    with pytest.raises(ValueError, match="class_frequency"):
        DenseClassificationLoss(criterion=build_cls_loss(tiny_cfg("ATSS", "efl"), 3, "dense"),
                                class_frequency=["r", "f"])
