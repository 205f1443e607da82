"""YOLOX (issue 24): SimOTA against a brute-force reference, the CSPDarknet-PAFPN's strides,
channels and sizes, the enhanced switch (ATSS assignment, IoU branch), the L1 switch, every
dense loss training, inference scores, the bias weight decay of the optimizer; one
train_net.py pair: EFL trains 3 iterations, then --eval-only reproduces its detections."""

import math
import os

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model

import eql_d2.modeling  # noqa: F401  (registers YOLOX and its backbone)
from eql_d2.config import get_eql_cfg
from eql_d2.modeling.backbone.cspdarknet import Bottleneck
from eql_d2.modeling.meta_arch import atss_match
from eql_d2.modeling.meta_arch.yolox import (decode_boxes, dynamic_k_matching, l1_targets,
                                             simota_match)
from eql_d2.solver import build_optimizer

from helpers import (ROOT, TINY_YOLOX, assert_eval_only_reproduces, dense_batch,
                     record_criterion_calls, seeded_model, sgd_steps, train_on_small)

BASE = os.path.join(ROOT, "configs/Synthetic-LT/Base-YOLOX-Tiny.yaml")
ENHANCED = ["MODEL.YOLOX.ASSIGNER", "ATSS", "MODEL.YOLOX.QUALITY", "iou",
            # anchors of 16 / 24 px at P3 for the 10-28 px boxes of dense_batch
            "MODEL.YOLOX.ANCHOR_SCALES", "[2.0, 3.0]", "MODEL.YOLOX.ATSS_TOPK", "6",
            "MODEL.YOLOX.L1_LOSS", "True"]
NUM_CLASSES = 5
FREQ_DATASET = "yolox_test_train"  # metadata only: gives the models class_frequency
MetadataCatalog.get(FREQ_DATASET).set(class_frequency=["r", "r", "c", "f", "f"])

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(loss, *opts):
    cfg = get_eql_cfg(BASE)
    cfg.merge_from_list([
        "MODEL.CLS_LOSS.NAME", loss, "MODEL.YOLOX.NUM_CLASSES", str(NUM_CLASSES),
        "MODEL.CSPDARKNET.WIDTH_MULTIPLIER", "0.125", "MODEL.YOLOX.HEAD_CHANNELS", "16",
        "MODEL.CLS_LOSS.LOG_PERIOD", "1",
        "DATASETS.TRAIN", f"('{FREQ_DATASET}',)", "DATASETS.TEST", "()", *opts,
    ])
    return cfg


# ---------------------------------------------------------------------- SimOTA


def brute_force_simota(gt, classes, centers, strides, boxes, scores, radius=2.5, topk=10,
                       iou_weight=3.0):
    """YOLOX's SimOTA (0.3.0, ``get_assignments``) written out with lists and loops: the
    object of each point (-1: background) and the number of points several objects chose."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    def regions(g, i):
        x, y = centers[i]
        box = g[0] < x < g[2] and g[1] < y < g[3]
        cx, cy, r = (g[0] + g[2]) / 2, (g[1] + g[3]) / 2, radius * strides[i]
        return box, cx - r < x < cx + r and cy - r < y < cy + r

    cand = [i for i in range(len(centers)) if any(any(regions(g, i)) for g in gt)]
    cost, ious = [], []
    for g, c in zip(gt, classes):
        row_cost, row_iou = [], []
        for i in cand:
            v = iou(g, boxes[i])
            bce = sum(-max(math.log(p), -100.0) if j == c else -max(math.log(1 - p), -100.0)
                      for j, p in enumerate(scores[i]))
            inside = all(regions(g, i))
            row_cost.append(bce + iou_weight * -math.log(v + 1e-8) + (0.0 if inside else 1e5))
            row_iou.append(v)
        cost.append(row_cost)
        ious.append(row_iou)
    chosen = [set() for _ in gt]
    for g in range(len(gt)):
        k = max(int(sum(sorted(ious[g], reverse=True)[:min(topk, len(cand))])), 1)
        chosen[g] = set(sorted(range(len(cand)), key=lambda j: (cost[g][j], j))[:k])
    matched = [-1] * len(centers)
    conflicts = 0
    for j, i in enumerate(cand):
        takers = [g for g in range(len(gt)) if j in chosen[g]]
        if len(takers) == 1:
            matched[i] = takers[0]
        elif takers:
            conflicts += 1
            costs = [cost[g][j] for g in range(len(gt))]
            matched[i] = costs.index(min(costs))  # over every object, as YOLOX
    return matched, conflicts


def random_simota_case(seed, size=64, num_classes=4):
    g = torch.Generator().manual_seed(seed)
    cells, strides = [], []
    for s in (8, 16, 32):
        n = size // s
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        cells.append(torch.stack([xs, ys], -1).reshape(-1, 2).double())
        strides.append(torch.full((n * n,), float(s), dtype=torch.float64))
    cell, stride = torch.cat(cells), torch.cat(strides)
    centers = (cell + 0.5) * stride[:, None]
    m = int(torch.randint(1, 6, (1,), generator=g))
    xy = torch.rand(m, 2, generator=g, dtype=torch.float64) * (size - 24)
    wh = 6 + torch.rand(m, 2, generator=g, dtype=torch.float64) * 30
    gt = torch.cat([xy, xy + wh], dim=1)
    classes = torch.randint(0, num_classes, (m,), generator=g)
    # predictions near the points: IoUs spread over (0, 1), several per object
    deltas = torch.cat([torch.rand(len(cell), 2, generator=g, dtype=torch.float64),
                        torch.log(0.8 + 3 * torch.rand(len(cell), 2, generator=g,
                                                       dtype=torch.float64))], dim=1)
    boxes = decode_boxes(deltas, cell, stride)
    scores = torch.rand(len(cell), num_classes, generator=g, dtype=torch.float64) * 0.98 + 0.01
    return gt, classes, centers, stride, boxes, scores


def test_simota_equals_brute_force():
    conflicts = positives = several = 0
    for seed in range(12):
        gt, classes, centers, strides, boxes, scores = random_simota_case(seed)
        got = simota_match(gt, classes, centers, strides, boxes, scores).tolist()
        want, n = brute_force_simota(gt.tolist(), classes.tolist(), centers.tolist(),
                                     strides.tolist(), boxes.tolist(), scores.tolist())
        assert got == want, f"seed {seed}"
        conflicts += n
        positives += sum(x >= 0 for x in got)
        several += sum(got.count(j) > 1 for j in range(len(gt)))
    # not vacuous: shared points were resolved, and dynamic k gave objects several points
    assert conflicts > 0 and several > 3 and positives > 12


def test_dynamic_k_and_conflicts_by_hand():
    # IoUs 0.3: dynamic k = int(0.9) -> 1 for objects 0-2; object 3's IoUs sum to 2.1 -> k = 2
    ious = torch.tensor([[0.3] * 3, [0.3] * 3, [0.3] * 3, [0.7] * 3])
    cost = torch.tensor([
        [1.0, 5.0, 9.0],  # object 0 chooses candidate 0
        [1.5, 6.0, 9.0],  # object 1 chooses candidate 0 too
        [0.8, 0.1, 9.0],  # object 2 chooses candidate 1, and is the cheapest at candidate 0
        [7.0, 8.0, 2.0],  # object 3 chooses candidates 2 and 0
    ])
    # candidate 0, chosen by 0, 1 and 3, goes to the object of lowest cost over all objects
    # (object 2, which did not choose it), as YOLOX's code does
    assert dynamic_k_matching(cost, ious).tolist() == [2, 2, 3]
    assert dynamic_k_matching(cost[:2], ious[:2]).tolist() == [0, -1, -1]
    # equal costs: the stable sort takes the lower index
    assert dynamic_k_matching(torch.ones(1, 3), torch.full((1, 3), 0.3)).tolist() == [0, -1, -1]


def test_simota_radius_and_empty_cases():
    centers = torch.tensor([[4.0, 4.0], [12.0, 4.0], [60.0, 60.0]])
    strides = torch.tensor([8.0, 8.0, 8.0])
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0], [56.0, 56.0, 64.0, 64.0]])
    scores = torch.full((3, 2), 0.5)
    gt = torch.tensor([[2.0, 2.0, 10.0, 10.0]])
    # the far point is no candidate: it is never assigned whatever its cost
    assert simota_match(gt, torch.tensor([1]), centers, strides, boxes, scores).tolist()[2] == -1
    empty = simota_match(gt[:0], torch.tensor([], dtype=torch.long), centers, strides, boxes,
                         scores)
    assert empty.tolist() == [-1, -1, -1]


# ---------------------------------------------------------------------- backbone


def test_backbone_strides_channels_and_depths():
    cfg = tiny_cfg("focal")
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "p3": (32, 8), "p4": (64, 16), "p5": (128, 32)}
    with torch.no_grad():
        out = backbone(torch.rand(2, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p3": (2, 32, 8, 12), "p4": (2, 64, 4, 6), "p5": (2, 128, 2, 3)}
    # bottlenecks: n + 3n + 3n + n in the backbone, round(3 d) in each of the PAFPN's 4 CSP
    # layers; YOLOX-S d = 0.33: n = 1; YOLOX-M d = 0.67: n = 2
    for depth, want in ((0.33, 8 + 4), (0.67, 16 + 8)):
        cfg.MODEL.CSPDARKNET.DEPTH_MULTIPLIER = depth
        model = build_backbone(cfg, ShapeSpec(channels=3))
        assert sum(isinstance(m, Bottleneck) for m in model.modules()) == want
    bn = next(m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert (bn.eps, bn.momentum) == (1e-3, 0.03)


@pytest.mark.parametrize("size,depth,width,channels,params", [
    ("s", 0.33, 0.50, 128, 9.0e6), ("m", 0.67, 0.75, 192, 25.3e6)])
def test_yolox_s_and_m_have_the_papers_sizes(size, depth, width, channels, params):
    """YOLOX's Tab. 3 (COCO, 80 classes): YOLOX-S 9.0M parameters, YOLOX-M 25.3M."""
    cfg = get_eql_cfg(os.path.join(ROOT, f"configs/LVIS-v1/yolox_{size}_sigmoid_300e_rfs.yaml"))
    assert (cfg.MODEL.CSPDARKNET.DEPTH_MULTIPLIER, cfg.MODEL.CSPDARKNET.WIDTH_MULTIPLIER,
            cfg.MODEL.YOLOX.HEAD_CHANNELS) == (depth, width, channels)
    cfg.merge_from_list(["MODEL.YOLOX.NUM_CLASSES", "80", "MODEL.DEVICE", "cpu",
                         "DATASETS.TRAIN", "()"])
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, abs=0.05e6)


def test_focus_stacks_the_four_pixel_phases():
    from eql_d2.modeling.backbone.cspdarknet import Focus

    focus = Focus(1, 4, norm="")
    with torch.no_grad():
        focus.conv.conv.weight.zero_()
        for c in range(4):  # the centre tap of output c reads input channel c
            focus.conv.conv.weight[c, c, 1, 1] = 1.0
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = focus(x)
    silu = torch.nn.functional.silu
    for c, (dy, dx) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        assert torch.equal(y[0, c], silu(x[0, 0, dy::2, dx::2]))


# ---------------------------------------------------------------------- training


def test_boxes_decode_and_l1_targets_invert_each_other():
    grid = torch.tensor([[3.0, 1.0], [0.0, 0.0]])
    strides = torch.tensor([8.0, 32.0])
    gt = torch.tensor([[20.0, 6.0, 40.0, 30.0], [1.0, 2.0, 61.0, 50.0]])
    target = l1_targets(gt, grid, strides)
    # centre (30, 18) at cell (3, 1) of stride 8: offsets (0.75, 1.25), log sizes log(2.5), log(3)
    assert target[0].tolist() == pytest.approx([0.75, 1.25, math.log(2.5), math.log(3.0)])
    assert torch.allclose(decode_boxes(target, grid, strides), gt, atol=1e-4)


def test_simota_labels_come_from_the_detached_predictions():
    model = seeded_model(tiny_cfg("focal"))
    batch = dense_batch(NUM_CLASSES, seed=4, num_images=2)
    images = model.preprocess_image(batch)
    feats = model.backbone(images.tensor)
    feats = [feats[f] for f in model.head_in_features]
    logits, deltas, quality = (torch.cat(x, 1) for x in model._transpose_dense_predictions(
        model.head(feats), [NUM_CLASSES, 4, 1]))
    grid, centers, strides, anchors = model.points(feats)
    boxes = decode_boxes(deltas, grid, strides)
    labels, gt_boxes = model.label_points([b["instances"] for b in batch], centers, strides,
                                          anchors, boxes, logits, quality.squeeze(-1))
    for img, inst in enumerate(b["instances"] for b in batch):
        scores = (logits[img].sigmoid() * quality[img].sigmoid()).sqrt().detach()
        want = torch.tensor(brute_force_simota(
            inst.gt_boxes.tensor.tolist(), inst.gt_classes.tolist(), centers.tolist(),
            strides.tolist(), boxes[img].detach().tolist(), scores.tolist())[0])
        fg = want >= 0
        assert fg.any()
        assert torch.equal(labels[img][fg], inst.gt_classes[want[fg]])
        assert (labels[img][~fg] == NUM_CLASSES).all()
        assert torch.equal(gt_boxes[img][fg], inst.gt_boxes.tensor[want[fg]])


def test_enhanced_switch_uses_atss_and_the_iou_branch():
    model = seeded_model(tiny_cfg("efl", *ENHANCED))
    assert model.num_anchors == 2 and model.head.cls_preds[0].out_channels == 2 * NUM_CLASSES
    batch = dense_batch(NUM_CLASSES, seed=4, num_images=2)
    images = model.preprocess_image(batch)
    feats = model.backbone(images.tensor)
    feats = [feats[f] for f in model.head_in_features]
    grid, centers, strides, anchors = model.points(feats)
    # anchors: squares of 2 and 3 strides about each cell centre, the cell's two in order
    assert anchors[0][:2].tolist() == [[-4.0, -4.0, 12.0, 12.0], [-8.0, -8.0, 16.0, 16.0]]
    labels, _ = model.label_points([b["instances"] for b in batch], centers, strides, anchors,
                                   None, None, None)
    for img, inst in enumerate(b["instances"] for b in batch):
        want = atss_match(inst.gt_boxes.tensor, anchors, 6)
        assert (want >= 0).any()
        assert torch.equal(labels[img] < NUM_CLASSES, want >= 0)
    history, _ = sgd_steps(model, [batch])
    assert set(history[0]) == {"loss_cls", "loss_box", "loss_iou", "loss_l1"}
    # the IoU branch starts at bias 0, objectness at the prior
    assert model.head.quality_preds[0].bias.detach().abs().max() < 0.05
    plain = seeded_model(tiny_cfg("focal"))
    assert plain.head.quality_preds[0].bias[0].item() == pytest.approx(math.log(0.01 / 0.99))


def test_the_l1_switch_is_an_attribute():
    model = seeded_model(tiny_cfg("sigmoid_ce"))
    batch = dense_batch(NUM_CLASSES, seed=1, num_images=2)
    assert model.use_l1_loss is False
    first, _ = sgd_steps(model, [batch])
    model.use_l1_loss = True  # what the last-epochs hook does
    second, _ = sgd_steps(model, [batch])
    assert "loss_l1" not in first[0] and second[0]["loss_l1"] > 0
    assert set(first[0]) == {"loss_cls", "loss_box", "loss_obj"}


@pytest.mark.parametrize("opts", [[], ENHANCED], ids=["yolox", "enhanced"])
def test_training_decreases_the_loss(opts):
    model = seeded_model(tiny_cfg("focal", *opts))
    batch = dense_batch(NUM_CLASSES, seed=2, num_images=3)
    history, _ = sgd_steps(model, [batch] * 30, lr=0.02)
    for losses in history:
        assert all(torch.isfinite(v) for v in losses.values()), losses
    # SimOTA re-assigns the positives every step, so single steps go up and down (and their
    # path differs between CPUs); the mean of five steps falls steadily
    totals = [float(sum(h.values())) for h in history]
    first, last = sum(totals[:5]) / 5, sum(totals[-5:]) / 5
    assert last < 0.7 * first, totals


@pytest.mark.parametrize("loss", ["sigmoid_ce", "focal", "efl", "qfl", "eqfl"])
@pytest.mark.parametrize("opts", [[], ENHANCED], ids=["yolox", "enhanced"])
def test_every_dense_loss_trains_3_iterations(loss, opts):
    model = seeded_model(tiny_cfg(loss, *opts))
    calls = record_criterion_calls(model)
    batches = [dense_batch(NUM_CLASSES, seed=s, num_images=3) for s in (1, 2, 3)]
    history, _ = sgd_steps(model, batches)
    assert len(calls) == 3  # one classification-loss call (one EFL update) per iteration
    for losses, ((logits, labels, avg, quality), _) in zip(history, calls):
        assert all(torch.isfinite(v) for v in losses.values()), losses
        assert history[0]["loss_box"] > 0
        if not opts:  # YOLOX: the classes of the positives only
            assert (labels < NUM_CLASSES).all() and len(labels) > 0
        else:
            assert (labels == NUM_CLASSES).sum() > 10 * (labels < NUM_CLASSES).sum() > 0
        if loss in ("qfl", "eqfl"):  # YOLOX's soft target: the IoU of the decoded box
            pos = labels < NUM_CLASSES
            assert ((quality[pos] > 0) & (quality[pos] <= 1)).all()
            assert (quality[~pos] == 0).all()
    if loss in ("efl", "eqfl"):
        assert model.cls_loss.criterion.neg_grad.sum() > 0


# ---------------------------------------------------------------------- inference


@pytest.mark.parametrize("opts", [[], ENHANCED], ids=["yolox", "enhanced"])
def test_inference_scores_and_output_size(opts):
    model = seeded_model(tiny_cfg("focal", "TEST.DETECTIONS_PER_IMAGE", "20",
                                  "MODEL.YOLOX.SCORE_THRESH_TEST", "0.0", *opts))
    sgd_steps(model, [dense_batch(NUM_CLASSES, seed=1, num_images=2)] * 2)
    model.eval()
    batch = dense_batch(NUM_CLASSES, seed=3, num_images=2)
    for b in batch:  # the original image was twice as large
        b["height"], b["width"] = 128, 128
    with torch.no_grad():
        out = model(batch)
        images = model.preprocess_image(batch)
        feats = model.backbone(images.tensor)
        logits, _, quality = (torch.cat(x, 1) for x in model._transpose_dense_predictions(
            model.head([feats[f] for f in model.head_in_features]), [NUM_CLASSES, 4, 1]))
    for img, result in enumerate(out):
        inst = result["instances"]
        assert len(inst) == 20 and inst.image_size == (128, 128)
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < NUM_CLASSES)).all()
        box = inst.pred_boxes.tensor
        assert (box >= 0).all() and (box <= 128).all() and box.max() > 64
        prob = logits[img].sigmoid() * quality[img].sigmoid()
        best = prob.max().sqrt() if opts else prob.max()
        # NMS keeps the best-scoring pair of all: score = class x objectness (x -> sqrt for IoU)
        assert inst.scores.max().item() == pytest.approx(best.item(), rel=1e-5)


# ---------------------------------------------------------------------- optimizer, config


def test_bias_weight_decay_of_the_last_classification_layer():
    cfg = get_eql_cfg(os.path.join(ROOT, "configs/Synthetic-LT/yolox_tiny_efl.yaml"))
    cfg.merge_from_list(["MODEL.YOLOX.NUM_CLASSES", str(NUM_CLASSES),
                         "DATASETS.TRAIN", f"('{FREQ_DATASET}',)"])
    model = build_model(cfg)
    decay = {}
    for group in build_optimizer(cfg, model).param_groups:
        for p in group["params"]:
            decay[p] = group["weight_decay"]
    named = dict(model.named_parameters())
    assert len(decay) == len(named)
    for name, p in named.items():
        if name.startswith("head.cls_preds.") and name.endswith(".bias"):
            want = 1e-4
        elif name.endswith(".bias") or ".norm." in name:
            want = 0.0  # YOLOX: no decay on biases and BatchNorm
        else:
            want = 5e-4
        assert decay[p] == want, name
    for bad, message in (([["head.nothing.*", 1e-4]], "match no trainable parameter"),
                         ([["head.cls_preds.*.bias"]], "pairs")):
        cfg.SOLVER.PARAM_WEIGHT_DECAY = bad
        with pytest.raises(ValueError, match="SOLVER.PARAM_WEIGHT_DECAY"):
            build_optimizer(cfg, model)


def test_bad_config_values_are_named():
    for key, value in (("MODEL.YOLOX.ASSIGNER", "OTA"), ("MODEL.YOLOX.QUALITY", "ctr"),
                       ("MODEL.YOLOX.ANCHOR_SCALES", "[6.0, 8.0]"),
                       ("MODEL.YOLOX.SIMOTA_CENTER_RADIUS", "0.0"),
                       ("MODEL.YOLOX.PRIOR_PROB", "1.0"),
                       ("MODEL.YOLOX.IN_FEATURES", "['p3', 'p6']"),
                       ("MODEL.CSPDARKNET.WIDTH_MULTIPLIER", "0.0")):
        with pytest.raises(ValueError, match=key):
            build_model(tiny_cfg("focal", key, value))
    with pytest.raises(ValueError, match="MODEL.CLS_LOSS.NAME"):
        build_model(tiny_cfg("eqlv2"))


# ---------------------------------------------------------------------- train_net.py


def test_train_net_then_eval_only_from_the_checkpoint(small_synthetic, tmp_path):
    cfg = os.path.join(ROOT, "configs/Synthetic-LT/yolox_tiny_efl.yaml")
    out = str(tmp_path)
    final, state, env = train_on_small(cfg, TINY_YOLOX, small_synthetic, out)
    assert state["cls_loss.criterion.neg_grad"].sum() > 0
    # BatchNorm statistics are part of the checkpoint the evaluation reads
    assert state["backbone.darknet.stem.conv.norm.num_batches_tracked"] == 3

    assert_eval_only_reproduces(cfg, TINY_YOLOX, out, env, final)
