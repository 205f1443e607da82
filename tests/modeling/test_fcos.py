"""EFLFCOS: detectron2's FCOS with the dense classification losses of MODEL.CLS_LOSS.

In-process: focal equals detectron2's FCOS losses, QFL/EQFL targets are the IoU of the
decoded boxes, EFL/EQFL statistics equal autograd's gradient sums with one update per
iteration, inference scores, build-time errors, and every loss trains on the small
Synthetic-LT. One train_net.py pair: EFL trains, then --eval-only reproduces its metrics.
"""

import math
import os

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

import eql_d2.modeling  # noqa: F401  (registers EFLFCOS)
from helpers import (ROOT, TINY_ONE_STAGE, assert_eval_only_reproduces, dense_batch,
                     dense_forward, record_criterion_calls,
                     register_small,
                     matched_iou, train_on_small, seeded_model, sgd_steps)
from eql_d2.config import get_eql_cfg
from eql_d2.engine import Trainer
from eql_d2.losses import (EqualizedFocalLoss, EqualizedQualityFocalLoss, FocalLoss,
                           QualityFocalLoss)

CONFIGS = os.path.join(ROOT, "configs/Synthetic-LT")
NUM_CLASSES = 5
FREQ_DATASET = "fcos_test_train"  # metadata only: gives the models class_frequency
MetadataCatalog.get(FREQ_DATASET).set(class_frequency=["r", "r", "c", "f", "f"])
LOSSES = {"focal": FocalLoss, "efl": EqualizedFocalLoss, "qfl": QualityFocalLoss,
          "eqfl": EqualizedQualityFocalLoss}
# TINY_ONE_STAGE's reasons hold for FCOS's head too (1x1 P7 at 64 px, one-image batches)
TINY_FCOS = [*TINY_ONE_STAGE, "MODEL.FCOS.NUM_CLASSES", "8", "MODEL.FCOS.NUM_CONVS", "1",
             "MODEL.FCOS.NORM", ""]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(loss, *opts):
    cfg = get_eql_cfg(os.path.join(CONFIGS, f"fcos_R18_FPN_{loss}.yaml"))
    cfg.merge_from_list([
        "MODEL.FCOS.NUM_CLASSES", str(NUM_CLASSES), "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.FCOS.NUM_CONVS", "1", "MODEL.CLS_LOSS.LOG_PERIOD", "1",
        "DATASETS.TRAIN", f"('{FREQ_DATASET}',)", "DATASETS.TEST", "()", *opts,
    ])
    return cfg


# ---------------------------------------------------------------------- losses


def test_focal_losses_equal_detectron2_fcos():
    """With focal loss, EFLFCOS's three losses are detectron2's FCOS losses (same modules,
    same positives), once both divide by the same number of positives."""
    ours = seeded_model(tiny_cfg("focal"))
    theirs = FCOS(backbone=ours.backbone, head=ours.head, head_in_features=ours.head_in_features,
                  num_classes=NUM_CLASSES, center_sampling_radius=1.5,
                  pixel_mean=ours.pixel_mean.flatten().tolist(),
                  pixel_std=ours.pixel_std.flatten().tolist())
    calls = record_criterion_calls(ours)
    batch = dense_batch(NUM_CLASSES, seed=11, num_images=3)
    with EventStorage():
        a = ours(batch)
    normalizer = float(calls[0][0][2])
    assert normalizer >= 10  # the batch has positives on several points
    # detectron2 divides by a moving average m <- 0.9 m + 0.1 n; starting it at n gives n
    theirs.loss_normalizer = normalizer
    with EventStorage():
        b = theirs(batch)
    assert a.keys() == b.keys() == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
        assert a[key] > 0


@pytest.mark.parametrize("loss", ["qfl", "eqfl"])
def test_quality_targets_are_iou_of_decoded_boxes_and_normalizer_counts_positives(loss):
    model = seeded_model(tiny_cfg(loss))
    with torch.no_grad():  # boxes of about one stride per side, not points (IoU 0)
        model.head.bbox_pred.bias.fill_(1.0)
    calls = record_criterion_calls(model)
    batch = dense_batch(NUM_CLASSES, seed=5, num_images=3)
    with EventStorage():
        model(batch)
    (logits, labels, normalizer, quality), _ = calls[0]

    with torch.no_grad():
        (_, deltas, _), anchors, _, gt_boxes = dense_forward(model, batch, NUM_CLASSES)
    points = Boxes.cat(anchors).tensor  # squares of side = stride around each point
    ctr = (points[:, :2] + points[:, 2:]) / 2
    stride = (points[:, 2] - points[:, 0])[:, None]
    pos = (labels >= 0) & (labels < NUM_CLASSES)
    want = torch.zeros_like(quality)
    num_points = points.shape[0]
    for i in range(len(batch)):
        d = torch.cat(deltas, dim=1)[i].relu() * stride  # distances l, t, r, b in pixels
        boxes = torch.cat([ctr - d[:, :2], ctr + d[:, 2:]], dim=1)
        rows = slice(i * num_points, (i + 1) * num_points)
        p = pos[rows]
        want[rows][p] = matched_iou(boxes[p], gt_boxes[i][p]).to(want.dtype)
    assert float(normalizer) == pos.sum()
    assert want[pos].min() >= 0 and want[pos].max() > 0.2  # real overlaps, not all zero
    torch.testing.assert_close(quality, want, rtol=1e-5, atol=1e-6)


def reference_loss(z, labels, gamma, gamma_b, alpha, normalizer, quality=None):
    """EFL (eq. 4 of Li et al.) or, with quality, EQFL (eq. 5), from autograd ops."""
    onehot = torch.nn.functional.one_hot(labels, NUM_CLASSES + 1)[:, :NUM_CLASSES].to(z.dtype)
    p = torch.sigmoid(z)
    w = gamma / gamma_b
    if quality is None:
        pt = torch.where(onehot > 0, p, 1 - p)
        at = torch.where(onehot > 0, alpha, 1 - alpha)
        loss = -at * w * (1 - pt) ** gamma * torch.log(pt)
    else:
        y = onehot * quality.to(z.dtype)[:, None]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
        loss = w * (y - p).abs() ** gamma * bce
    return loss.sum() / normalizer, onehot


@pytest.mark.parametrize("loss", ["efl", "eqfl"])
def test_statistics_equal_autograd_gradient_sums_one_update_per_iteration(loss):
    # a prior of 0.2 makes the negatives' gradient comparable to the positives', so that
    # g^j < 1 and gamma^j differs between classes from the second step on
    model = seeded_model(tiny_cfg(loss, "MODEL.FCOS.PRIOR_PROB", "0.2"))
    crit = model.cls_loss.criterion
    calls = record_criterion_calls(model)
    history, storage = sgd_steps(model, [dense_batch(NUM_CLASSES, seed=s) for s in (1, 2, 3)], lr=0.05)
    assert len(calls) == 3

    pos_sum = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    neg_sum = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    for step, ((logits, labels, normalizer, quality), gamma) in enumerate(calls):
        assert torch.all((labels >= 0) & (labels <= NUM_CLASSES))  # FCOS ignores nothing
        z = logits.detach().double().requires_grad_()
        ref, onehot = reference_loss(z, labels, gamma.double(), 2.0, 0.25, float(normalizer),
                                     quality)
        ref.backward()
        torch.testing.assert_close(history[step]["loss_fcos_cls"].double(), ref.detach(),
                                   rtol=1e-5, atol=1e-7)
        pos_sum += (z.grad.abs() * onehot).sum(0)
        neg_sum += (z.grad.abs() * (1 - onehot)).sum(0)
    assert torch.equal(calls[0][1], torch.full((NUM_CLASSES,), 2.0))  # no statistics yet
    assert calls[-1][1].max() - calls[-1][1].min() > 0.01  # class-specific gamma^j in use
    torch.testing.assert_close(crit.pos_grad.double(), pos_sum, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(crit.neg_grad.double(), neg_sum, rtol=1e-4, atol=1e-9)
    for name in ("efl/gradient_ratio/r", "efl/focusing_factor/f"):
        assert name in storage.histories()


def test_inference_score_is_geometric_mean_of_class_and_centerness():
    model = seeded_model(tiny_cfg("focal", "TEST.DETECTIONS_PER_IMAGE", "1"))
    model.eval()
    with torch.no_grad():
        model.head.ctrness.bias.fill_(2.0)
        model.head.cls_score.bias.fill_(-1.0)
        batch = dense_batch(NUM_CLASSES, seed=3)
        images = model.preprocess_image(batch)
        feats = model.backbone(images.tensor)
        preds = model.head([feats[f] for f in model.head_in_features])
        logits, _, ctr = model._transpose_dense_predictions(preds, [NUM_CLASSES, 4, 1])
        want = max((lg[0].sigmoid() * c[0].sigmoid()).sqrt().max() for lg, c in zip(logits, ctr))
        got = model(batch)[0]["instances"]
    assert len(got) == 1
    torch.testing.assert_close(got.scores[0], want)


def test_builds_from_config_with_prior_and_names_bad_values():
    model = seeded_model(tiny_cfg("efl", "MODEL.FCOS.PRIOR_PROB", "0.001"))
    # sigmoid(bias) = prior: every class starts at probability 0.001
    torch.testing.assert_close(model.head.cls_score.bias.sigmoid(),
                               torch.full((NUM_CLASSES,), 0.001))
    assert model.num_classes == NUM_CLASSES and model.center_sampling_radius == 1.5
    assert (model.test_score_thresh, model.max_detections_per_image) == (0.0, 300)
    assert isinstance(model.cls_loss.criterion, EqualizedFocalLoss)
    for key, value in (("MODEL.FCOS.IN_FEATURES", "['p3', 'p9']"),
                       ("MODEL.FCOS.NUM_CONVS", "0"), ("MODEL.FCOS.PRIOR_PROB", "1.0"),
                       ("MODEL.FCOS.CENTER_SAMPLING_RADIUS", "0.0")):
        with pytest.raises(ValueError, match=key):
            build_model(tiny_cfg("efl", key, value))


# ---------------------------------------------------------------------- Synthetic-LT


@pytest.fixture(scope="module")
def datasets(small_synthetic):
    return register_small(small_synthetic, "fcos_small")


@pytest.mark.parametrize("loss", list(LOSSES))
def test_each_loss_trains_fcos_on_synthetic_lt(loss, datasets, tmp_path):
    cfg = get_eql_cfg(os.path.join(CONFIGS, f"fcos_R18_FPN_{loss}.yaml"),
                      [*TINY_FCOS, "DATASETS.TRAIN", (datasets[0],), "DATASETS.TEST", (),
                       "OUTPUT_DIR", str(tmp_path)])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert isinstance(trainer.model.cls_loss.criterion, LOSSES[loss])
    hist = trainer.storage.histories()
    for key in ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"):
        values = [v for v, _ in hist[key].values()]
        assert len(values) == 3 and all(math.isfinite(v) for v in values), (key, values)
    assert sum(v for v, _ in hist["loss_fcos_loc"].values()) > 0  # positives were found
    if loss in ("efl", "eqfl"):
        assert trainer.model.cls_loss.criterion.neg_grad.sum() > 0
        assert "efl/gradient_ratio/r" in hist


def test_train_net_efl_then_eval_only_reproduces_metrics(small_synthetic, tmp_path):
    cfg = os.path.join(CONFIGS, "fcos_R18_FPN_efl.yaml")
    out = str(tmp_path)
    final, state, env = train_on_small(cfg, TINY_FCOS, small_synthetic, out)
    assert state["cls_loss.criterion.pos_grad"].sum() > 0
    assert state["cls_loss.criterion.neg_grad"].sum() > 0

    assert_eval_only_reproduces(cfg, TINY_FCOS, out, env, final)
