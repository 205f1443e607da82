"""PAA (issue 24): the Gaussian mixture against scikit-learn's, the assignment against the
authors' per-box procedure, score voting by hand, training with every dense loss, inference;
one train_net.py pair: EFL trains 3 iterations, then --eval-only reproduces its detections."""

import math
import os
import warnings

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, pairwise_iou
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

import eql_d2.modeling  # noqa: F401  (registers PAA)
from eql_d2.config import get_eql_cfg
from eql_d2.modeling.meta_arch.paa import (fit_two_gaussians, paa_anchor_scores,
                                           paa_candidates, paa_split, score_voting)

from helpers import (ROOT, TINY_ONE_STAGE, assert_eval_only_reproduces, dense_batch,
                     record_criterion_calls, train_on_small,
                     seeded_model, sgd_steps)

BASE = os.path.join(ROOT, "configs/Synthetic-LT/Base-OneStage-R18-FPN.yaml")
NUM_CLASSES = 5
FREQ_DATASET = "paa_test_train"  # metadata only: gives the models class_frequency
MetadataCatalog.get(FREQ_DATASET).set(class_frequency=["r", "r", "c", "f", "f"])

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(loss, *opts):
    cfg = get_eql_cfg(BASE)
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "PAA", "MODEL.CLS_LOSS.NAME", loss,
        "MODEL.PAA.NUM_CLASSES", str(NUM_CLASSES), "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.PAA.NUM_CONVS", "1", "MODEL.CLS_LOSS.LOG_PERIOD", "1",
        # 32 px anchors at P3 for the 10-28 px boxes of dense_batch: several levels and
        # several candidates per box
        "MODEL.PAA.ANCHOR_SCALES", "[4.0]",
        "DATASETS.TRAIN", f"('{FREQ_DATASET}',)", "DATASETS.TEST", "()", *opts,
    ])
    return cfg


def sklearn_fit(values):
    """The authors' call on one box's candidate scores: (predict, score_samples)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    gmm = GaussianMixture(2, weights_init=[0.5, 0.5], means_init=[[x.min()], [x.max()]],
                          precisions_init=[[[1.0]], [[1.0]]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x)
    return gmm.predict(x), gmm.score_samples(x)


def sklearn_positives(values):
    """The authors' rule (kkhoot/PAA, compute_paa) on one box's candidate scores: the
    positions, in the input order, of the positives."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    if len(order) == 1:
        return set(order)
    component, density = sklearn_fit([values[i] for i in order])
    fg = component == 0
    if not fg.any():
        return set(order)
    best = density[fg].max()
    boundary = min(j for j in range(len(order)) if fg[j] and density[j] == best)
    return set(order[:boundary + 1])


def random_rows(seed, num_rows=40, width=45):
    """Rows of anchor-score-like values (two clusters, one cluster, ties, 2 values), padded
    with +inf to `width`."""
    g = np.random.default_rng(seed)
    rows = []
    for r in range(num_rows):
        k = int(g.integers(2, width + 1)) if r > 2 else (2, 5, width)[r]
        if r % 4 == 0:
            row = g.uniform(0.5, 3.0, k)
        else:
            n_fg = int(g.integers(1, k))
            row = np.concatenate([g.normal(0.4, 0.15, n_fg), g.normal(1.6, 0.5, k - n_fg)])
        if r == 1:
            row[:] = 1.25  # all equal
        g.shuffle(row)
        rows.append(row)
    x = torch.full((num_rows, width), math.inf, dtype=torch.float64)
    for i, row in enumerate(rows):
        x[i, :len(row)] = torch.from_numpy(row)
    return rows, x


# ---------------------------------------------------------------------- the mixture


@pytest.mark.parametrize("seed", [0, 1])
def test_gaussian_mixture_equals_scikit_learn(seed):
    rows, x = random_rows(seed)
    valid = torch.isfinite(x)
    component, density = fit_two_gaussians(x, valid)
    for i, row in enumerate(rows):
        want_component, want_density = sklearn_fit(row)
        k = len(row)
        assert component[i, :k].tolist() == want_component.tolist(), f"row {i}"
        np.testing.assert_allclose(density[i, :k].numpy(), want_density, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_equals_the_authors_rule_with_scikit_learn(seed):
    rows, x = random_rows(seed + 10)
    positive = paa_split(x.float())
    counts = []
    for i, row in enumerate(rows):
        got = set(positive[i].nonzero().squeeze(1).tolist())
        assert got == sklearn_positives(row.astype(np.float32).tolist()), f"row {i}"
        counts.append(len(got))
    assert len(set(counts)) > 3  # the boundary moves from row to row


def test_split_of_hand_made_scores():
    inf = math.inf
    scores = torch.tensor([
        # two clear groups: component 0 is {0.10, 0.12, 0.15}, whose density peaks at
        # 0.12 (nearest its mean 0.1233), so the positives are 0.10 and 0.12
        [2.1, 0.15, 0.10, 2.3, 0.12, 2.0],
        # one candidate: positive
        [0.7, inf, inf, inf, inf, inf],
        # equal scores: one component at the same density everywhere, the first wins
        [0.5, 0.5, 0.5, inf, inf, inf],
        # no candidate
        [inf] * 6,
    ])
    assert paa_split(scores).tolist() == [
        [False, False, True, False, True, False],
        [True, False, False, False, False, False],
        [True, False, False, False, False, False],
        [False] * 6,
    ]


def test_candidates_are_the_lowest_scores_of_each_box_per_level():
    inf = math.inf
    # two levels of 5 and 3 anchors; box 0 owns anchors 0, 1, 3, 4 | 5, 7; box 1 owns 2 | 6
    matched = torch.tensor([0, 0, 1, 0, 0, 0, 1, 0])
    scores = torch.tensor([0.9, 0.2, 0.1, 0.5, 0.3, 0.4, 0.8, 0.6])
    index, value = paa_candidates(matched, scores, [5, 3], num_gt=2, topk=2)
    assert index[0, :2].tolist() == [1, 4] and index[0, 2:].tolist() == [5, 7]
    assert value[0].tolist() == pytest.approx([0.2, 0.3, 0.4, 0.6])
    assert index[1, 0].item() == 2 and index[1, 2].item() == 6
    assert value[1].tolist() == pytest.approx([0.1, inf, 0.8, inf])
    with pytest.raises(ValueError, match="MODEL.PAA.TOPK"):
        paa_candidates(matched, scores, [5, 3], num_gt=2, topk=0)


def test_anchor_score_is_focal_plus_giou_loss_by_hand():
    logits = torch.tensor([[0.5, -1.0, 2.0], [-3.0, 0.0, 1.0]])
    classes = torch.tensor([2, 0])
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
    gt = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
    alpha, gamma = 0.25, 2.0
    want = []
    for z, c, giou_loss in zip(logits.tolist(), classes.tolist(), [0.0, 1.0 + 5.0 / 63.0]):
        total = 0.0
        for j, zj in enumerate(z):
            p = 1 / (1 + math.exp(-zj))
            if j == c:
                total += -alpha * (1 - p) ** gamma * math.log(p)
            else:
                total += -(1 - alpha) * p ** gamma * math.log(1 - p)
        want.append(total + giou_loss)  # GIoU loss: 0 and 1 - (1/7 - 2/9)
    got = paa_anchor_scores(logits, classes, pred, gt, alpha, gamma)
    assert got.tolist() == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------- the assignment


def authors_assignment(gt_boxes, gt_classes, anchors_per_level, logits, pred_boxes, topk,
                       alpha=0.25, gamma=2.0):
    """kkhoot/PAA's assignment of one image written out per box (lists and loops; scores in
    float64 by their formulas, rounded to float32 as the model computes them): the box
    index of each anchor (-1 for background) and the number of candidates."""
    anchors = torch.cat(anchors_per_level)
    counts = [len(a) for a in anchors_per_level]
    iou = pairwise_iou(Boxes(gt_boxes), Boxes(anchors))  # [M, R]
    best_iou, best_gt = iou.max(dim=0)
    pool = (best_iou >= 0.1).tolist()
    for g in range(len(gt_boxes)):  # low-quality matches: each box's best anchors
        for i in (iou[g] == iou[g].max()).nonzero().squeeze(1).tolist():
            pool[i] = True
    best_gt = best_gt.tolist()

    p = torch.sigmoid(logits.double())
    onehot = torch.nn.functional.one_hot(gt_classes[best_gt], logits.shape[1]).bool()
    focal = torch.where(onehot, -alpha * (1 - p) ** gamma * torch.log(p),
                        -(1 - alpha) * p ** gamma * torch.log(1 - p)).sum(dim=1)
    a, b = pred_boxes.double(), gt_boxes[best_gt].double()
    inter = ((torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2]))
             .clamp(min=0).prod(dim=1))
    union = (a[:, 2:] - a[:, :2]).prod(dim=1) + (b[:, 2:] - b[:, :2]).prod(dim=1) - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(dim=1)
    score = (focal + 1 - (inter / union - (hull - union) / hull)).float().tolist()

    assigned = [-1] * len(anchors)
    num_candidates = 0
    for g in range(len(gt_boxes)):
        candidates, start = [], 0
        for n in counts:
            own = [i for i in range(start, start + n) if pool[i] and best_gt[i] == g]
            candidates += sorted(own, key=lambda i: score[i])[:topk]
            start += n
        num_candidates += len(candidates)
        if not candidates:
            continue
        positives = sklearn_positives([score[i] for i in candidates])
        for j in positives:
            assigned[candidates[j]] = g
    return assigned, num_candidates


@pytest.mark.parametrize("seed", [4, 5])
def test_label_anchors_equals_the_authors_procedure(seed):
    model = seeded_model(tiny_cfg("focal", "MODEL.PAA.TOPK", "3"), seed=seed)
    with torch.no_grad():  # visible, differing box predictions and class scores
        model.head.bbox_pred.weight.normal_(std=0.05)
        model.head.cls_score.weight.normal_(std=0.05)
    batch = dense_batch(NUM_CLASSES, seed=seed, num_images=3)
    images = model.preprocess_image(batch)
    feats = model.backbone(images.tensor)
    feats = [feats[f] for f in model.head_in_features]
    logits, deltas, _ = model._transpose_dense_predictions(model.head(feats), [NUM_CLASSES, 4, 1])
    anchors = model.anchor_generator(feats)
    instances = [b["instances"] for b in batch]
    labels, boxes = model.label_anchors(anchors, instances, logits, deltas)

    all_anchors = torch.cat([a.tensor for a in anchors])
    positives = candidates = 0
    for img, inst in enumerate(instances):
        if len(inst) == 0:
            assert (labels[img] == NUM_CLASSES).all()
            continue
        pred = model.box2box_transform.apply_deltas(torch.cat(deltas, 1)[img].detach(), all_anchors)
        want, num_candidates = authors_assignment(
            inst.gt_boxes.tensor, inst.gt_classes, [a.tensor for a in anchors],
            torch.cat(logits, 1)[img].detach(), pred, topk=3)
        want = torch.tensor(want)
        fg = want >= 0
        assert torch.equal(labels[img] < NUM_CLASSES, fg)
        assert torch.equal(labels[img][fg], inst.gt_classes[want[fg]])
        assert torch.equal(boxes[img][fg], inst.gt_boxes.tensor[want[fg]])
        assert (boxes[img][~fg] == 0).all()
        positives += int(fg.sum())
        candidates += num_candidates
    # some boxes have several positives, and the mixture turned some candidates down
    assert len([i for i in instances if len(i)]) < positives < candidates


# ---------------------------------------------------------------------- score voting


def test_score_voting_equals_the_hand_computation():
    kept = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    candidates = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],   # the kept box itself, IoU 1
        [0.0, 0.0, 10.0, 8.0],    # IoU 0.8
        [5.0, 0.0, 15.0, 10.0],   # IoU 50 / 150 = 1/3
        [1.0, 1.0, 11.0, 11.0],   # another class: no vote
        [50.0, 50.0, 60.0, 60.0],  # no overlap: no vote
    ])
    scores = torch.tensor([0.9, 0.6, 0.5, 0.99, 0.99])
    classes = torch.tensor([3, 3, 3, 1, 3])
    sigma = 0.025
    weights = [0.9 * math.exp(0.0), 0.6 * math.exp(-(0.2 ** 2) / sigma),
               0.5 * math.exp(-((2.0 / 3.0) ** 2) / sigma)]
    want = [sum(w * c for w, c in zip(weights, coord)) / sum(weights)
            for coord in zip(*candidates[:3].tolist())]
    got = score_voting(kept, torch.tensor([3]), candidates, scores, classes, sigma)
    assert got[0].tolist() == pytest.approx(want, rel=1e-6)
    assert got[0, 3].item() < 10.0  # the IoU-0.8 box pulled the bottom edge up
    # a box with no vote of positive weight stays where it is
    lone = score_voting(kept, torch.tensor([3]), candidates, torch.zeros(5), classes, sigma)
    assert torch.equal(lone, kept)


# ---------------------------------------------------------------------- training, inference


@pytest.mark.parametrize("loss", ["focal", "efl"])
def test_training_decreases_the_loss(loss):
    model = seeded_model(tiny_cfg(loss))
    calls = record_criterion_calls(model)
    batch = dense_batch(NUM_CLASSES, seed=2, num_images=3)
    history, _ = sgd_steps(model, [batch] * 8, lr=0.01)
    assert len(calls) == 8  # one classification-loss call (one EFL update) per iteration
    for losses in history:
        assert set(losses) == {"loss_cls", "loss_box_reg", "loss_iou"}
        assert all(torch.isfinite(v) for v in losses.values()), losses
    first, last = (sum(h.values()) for h in (history[0], history[-1]))
    assert last < 0.8 * first
    if loss == "efl":
        assert model.cls_loss.criterion.neg_grad.sum() > 0


@pytest.mark.parametrize("loss", ["qfl", "eqfl", "sigmoid_ce"])
def test_other_dense_losses_train(loss):
    model = seeded_model(tiny_cfg(loss))
    batches = [dense_batch(NUM_CLASSES, seed=s, num_images=3) for s in (1, 2, 3)]
    history, _ = sgd_steps(model, batches)
    for losses in history:
        assert all(torch.isfinite(v) for v in losses.values()), losses
    assert history[0]["loss_box_reg"] > 0


def test_inference_outputs_and_score_voting():
    cfg = tiny_cfg("focal", "TEST.DETECTIONS_PER_IMAGE", "20")
    voted, plain = (seeded_model(c) for c in (cfg, tiny_cfg(
        "focal", "TEST.DETECTIONS_PER_IMAGE", "20", "MODEL.PAA.SCORE_VOTING", "False")))
    plain.load_state_dict(voted.state_dict())
    sgd_steps(voted, [dense_batch(NUM_CLASSES, seed=1, num_images=2)] * 2)
    plain.load_state_dict(voted.state_dict())
    for m in (voted, plain):
        m.eval()
    batch = dense_batch(NUM_CLASSES, seed=3, num_images=2)
    with torch.no_grad():
        out_voted, out_plain = voted(batch), plain(batch)
    moved = 0
    for a, b in zip(out_voted, out_plain):
        a, b = a["instances"], b["instances"]
        assert 0 < len(a) <= 20 and len(a) == len(b)
        assert a.pred_boxes.tensor.shape == (len(a), 4)
        assert ((a.scores >= 0) & (a.scores <= 1)).all()
        assert ((a.pred_classes >= 0) & (a.pred_classes < NUM_CLASSES)).all()
        # voting moves boxes, never scores or classes
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)
        moved += int((a.pred_boxes.tensor - b.pred_boxes.tensor).abs().amax(dim=1).gt(1e-3).sum())
        h, w = a.image_size
        box = a.pred_boxes.tensor
        assert (box[:, 0] >= 0).all() and (box[:, 2] <= w).all() and (box[:, 3] <= h).all()
    assert moved > 0


def test_bad_config_values_are_named():
    for key, value in (("MODEL.PAA.TOPK", "0"), ("MODEL.PAA.IOU_THRESHOLD", "0.0"),
                       ("MODEL.PAA.ANCHOR_SCALES", "[]"), ("MODEL.PAA.SCORE_VOTING_SIGMA", "0.0"),
                       ("MODEL.PAA.IN_FEATURES", "['p3', 'p9']")):
        with pytest.raises(ValueError, match=key):
            build_model(tiny_cfg("focal", key, value))
    with pytest.raises(ValueError, match="MODEL.CLS_LOSS.NAME"):
        build_model(tiny_cfg("eqlv2"))


# the small Synthetic-LT's 8 classes; no GroupNorm, whose 1x1 P7 fails on one image (eval)
TINY_PAA = [*TINY_ONE_STAGE, "MODEL.PAA.NUM_CLASSES", "8", "MODEL.PAA.NUM_CONVS", "1",
            "MODEL.PAA.NORM", ""]


def test_train_net_then_eval_only_from_the_checkpoint(small_synthetic, tmp_path):
    cfg = os.path.join(ROOT, "configs/Synthetic-LT/paa_R18_FPN_efl.yaml")
    out = str(tmp_path)
    final, state, env = train_on_small(cfg, TINY_PAA, small_synthetic, out)
    assert state["cls_loss.criterion.neg_grad"].sum() > 0
    assert not torch.equal(state["head.box_scales"], torch.ones(5))  # the scales train

    assert_eval_only_reproduces(cfg, TINY_PAA, out, env, final)
