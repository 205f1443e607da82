"""EQLROIHeads on a hand-built two-image LVIS-format batch: which loss weights the image-level
labels change, and the errors a misconfiguration gets."""

import math

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_roi_heads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import eql_d2.modeling  # noqa: F401  (registers EQLROIHeads)
from helpers import ROOT
from eql_d2.config import get_eql_cfg
from eql_d2.data.image_labels import ImageLabels, image_label_masks
from eql_d2.modeling.roi_heads import EQLFastRCNNOutputLayers

C = 8
DATASET = "eqlh_hand_built_train"
# Frequencies f = count / 100 images; with lambda = 0.05 classes 0, 1, 2 are tail classes.
IMAGE_COUNTS = [1, 2, 3, 50, 60, 70, 80, 90]
TAIL = {0, 1, 2}
LAMBDA = 0.05

# Image A: boxes of classes 0 and 4; verified absent: LVIS ids 2, 7 (classes 1, 6); class 4
# is not exhaustively annotated. Image B: a box of class 5; verified absent: id 3 (class 2).
IMAGES = [
    dict(file_name="a.png", boxes=[[4, 4, 24, 24], [34, 30, 60, 60]], classes=[0, 4],
         neg_category_ids=[2, 7], not_exhaustive_category_ids=[5]),
    dict(file_name="b.png", boxes=[[10, 30, 40, 58]], classes=[5],
         neg_category_ids=[3], not_exhaustive_category_ids=[]),
]
VERIFIED = [{0, 4, 1, 6}, {5, 2}]  # positive + verified negative classes, per image
NOT_EXHAUSTIVE = [{4}, set()]


def setup_module():
    if MetadataCatalog.get(DATASET).get("class_image_count") is None:
        MetadataCatalog.get(DATASET).set(
            class_image_count=[{"id": j + 1, "image_count": n} for j, n in enumerate(IMAGE_COUNTS)],
            num_train_images=100, class_frequency=["r", "r", "r", "c", "c", "f", "f", "f"])


def make_cfg(loss, verified=True, prior_prob=None):
    cfg = get_eql_cfg(f"{ROOT}/configs/Synthetic-LT/EQL/Base-EQL-RCNN-R18-FPN.yaml")
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = C
    cfg.DATASETS.TRAIN = (DATASET,)
    cfg.MODEL.CLS_LOSS.NAME = loss
    cfg.MODEL.CLS_LOSS.EQL.LAMBDA = LAMBDA
    cfg.MODEL.IMAGE_LABELS.VERIFIED = verified
    if prior_prob is not None:
        cfg.MODEL.ROI_BOX_HEAD.PRIOR_PROB = prior_prob
    return cfg


def build_heads(cfg):
    shapes = {f"p{i}": ShapeSpec(channels=64, stride=2 ** i) for i in range(2, 7)}
    return build_roi_heads(cfg, shapes)


def batch():
    """Model inputs as DatasetMapper makes them (LVIS 1-based ids) and RPN-like proposals."""
    inputs, proposals = [], []
    g = torch.Generator().manual_seed(0)
    for img in IMAGES:
        inst = Instances((64, 64))
        inst.gt_boxes = Boxes(torch.tensor(img["boxes"], dtype=torch.float32))
        inst.gt_classes = torch.tensor(img["classes"])
        inputs.append({"file_name": img["file_name"], "instances": inst,
                       "neg_category_ids": img["neg_category_ids"],
                       "not_exhaustive_category_ids": img["not_exhaustive_category_ids"]})
        # jittered copies of the boxes (foreground) and random small boxes (mostly background)
        jitter = torch.randint(-2, 3, (6 * len(inst), 4), generator=g)
        gt = inst.gt_boxes.tensor.repeat(6, 1) + jitter
        xy = torch.randint(0, 50, (40, 2), generator=g).float()
        rand = torch.cat([xy, xy + torch.randint(4, 14, (40, 2), generator=g)], dim=1)
        p = Instances((64, 64))
        p.proposal_boxes = Boxes(torch.cat([gt.float(), rand]).clamp(0, 64))
        p.objectness_logits = torch.zeros(len(p))
        proposals.append(p)
    return inputs, proposals


def with_image_labels(inputs):
    """The ground truth as ImageLabelDatasetMapper leaves it: an image_labels field."""
    targets = []
    for x in inputs:
        inst = x["instances"]
        record = dict(x, annotations=[{"category_id": int(c)} for c in inst.gt_classes])
        verified, not_exhaustive = image_label_masks(record, C)
        inst = Instances(inst.image_size, **inst.get_fields())
        inst.image_labels = ImageLabels.for_image(verified, not_exhaustive, len(inst))
        targets.append(inst)
    return targets


def sample(heads, inputs, proposals):
    targets = with_image_labels(inputs)
    torch.manual_seed(0)  # same sampled proposals for every call
    with EventStorage():
        return heads.label_and_sample_proposals(proposals, targets)


def cls_grad(heads, sampled, logits):
    """d loss_cls / d logits through the predictor's own losses() (statistics frozen)."""
    z = logits.clone().requires_grad_(True)
    deltas = torch.zeros(len(z), 4 * C)
    heads.box_predictor.eval()  # EQLv2: same weights for both calls, no statistics update
    with EventStorage():
        loss = heads.box_predictor.losses((z, deltas), sampled)["loss_cls"]
    loss.backward()
    return z.grad


def image_index(sampled):
    return torch.cat([torch.full((len(p),), i) for i, p in enumerate(sampled)])


def expected_changed(sampled, loss):
    """Entries whose weight the image-level labels change, derived from the raw batch."""
    labels = torch.cat([p.gt_classes for p in sampled])
    img = image_index(sampled)
    mask = torch.zeros(len(labels), C + 1, dtype=torch.bool)
    for r in range(len(labels)):
        for j in VERIFIED[int(img[r])]:
            if j == int(labels[r]):
                continue  # a positive entry keeps its weight
            if loss == "EQL" and (int(labels[r]) == C or j not in TAIL):
                continue  # EQL only ever down-weights tail classes in foreground rows
            mask[r, j] = True
    return mask


def test_sampled_proposals_carry_image_labels_without_per_proposal_masks():
    heads = build_heads(make_cfg("EQLv2"))
    inputs, proposals = batch()
    sampled = sample(heads, inputs, proposals)
    for i, props in enumerate(sampled):
        n = len(props)
        # no [R, C] field: detectron2 gathers nothing per proposal, the labels are indices
        for name, value in props.get_fields().items():
            shape = tuple(getattr(value, "shape", ()))
            assert shape != (n, C) and shape != (n, C + 1), name
        labels = props.image_labels
        assert isinstance(labels, ImageLabels) and len(labels) == n
        assert labels.verified.shape == (1, C) and labels.image.shape == (n,)
        want = torch.zeros(C, dtype=torch.bool)
        want[list(VERIFIED[i])] = True
        assert torch.equal(labels.verified[0], want)


def test_an_image_without_boxes_keeps_its_image_labels():
    """Its proposals are all background; its verified negatives still get weight 1 (EQL)."""
    heads = build_heads(make_cfg("EQL"))
    inputs, proposals = batch()
    empty = Instances((64, 64), gt_boxes=Boxes(torch.zeros(0, 4)),
                      gt_classes=torch.zeros(0, dtype=torch.int64))
    inputs[1]["instances"] = empty
    sampled = sample(heads, inputs, proposals)
    assert torch.all(sampled[1].gt_classes == C)
    want = torch.zeros(C, dtype=torch.bool)
    want[[2]] = True  # image B's verified negative (LVIS id 3); no positives left
    assert torch.equal(sampled[1].image_labels.verified[0], want)


@pytest.mark.parametrize("loss", ["EQL", "EQLv2"])
def test_verified_mask_changes_exactly_the_verified_weights(loss):
    heads = build_heads(make_cfg(loss))
    if loss == "EQLv2":  # statistics that make every negative weight q_j < 1
        heads.box_predictor.cls_loss.pos_grad.copy_(torch.linspace(0.1, 0.8, C))
        heads.box_predictor.cls_loss.neg_grad.fill_(1.0)
    inputs, proposals = batch()
    with_labels = sample(heads, inputs, proposals)
    labels = torch.cat([p.gt_classes for p in with_labels])
    assert (labels < C).sum() >= 6 and (labels == C).sum() >= 20  # both kinds of rows present

    verified = ImageLabels.cat([p.image_labels for p in with_labels]).verified_rows()
    img = image_index(with_labels)
    for i, classes in enumerate(VERIFIED):
        want = torch.zeros(C, dtype=torch.bool)
        want[list(classes)] = True
        assert torch.equal(verified[img == i], want.expand(int((img == i).sum()), C))

    logits = torch.randn(len(labels), C + 1, generator=torch.Generator().manual_seed(1))
    g_with = cls_grad(heads, with_labels, logits)
    heads.box_predictor.use_verified = False  # MODEL.IMAGE_LABELS.VERIFIED False
    g_without = cls_grad(heads, with_labels, logits)
    changed = g_with != g_without
    want = expected_changed(with_labels, loss)
    assert want.sum() > 0
    assert torch.equal(changed, want)
    if loss == "EQL":  # a tail negative in a foreground row goes from weight 0 to weight 1
        assert torch.all(g_without[want] == 0) and torch.all(g_with[want] != 0)
    else:  # a verified negative goes from weight q_j to weight 1
        q = heads.box_predictor.cls_loss.negative_weight
        cols = want.nonzero()[:, 1]
        torch.testing.assert_close(g_without[want], g_with[want] * q[cols])


@pytest.mark.parametrize("loss", ["SoftmaxCE", "SigmoidCE", "EQL", "EQLv2"])
def test_not_exhaustive_categories_are_not_negatives_of_background(loss):
    heads = build_heads(make_cfg(loss, verified=False))
    inputs, proposals = batch()
    plain = ignoring = sample(heads, inputs, proposals)
    labels = torch.cat([p.gt_classes for p in ignoring])
    img = image_index(ignoring)
    want = torch.zeros(len(labels), C, dtype=torch.bool)
    for r in range(len(labels)):
        if labels[r] == C:
            want[r, list(NOT_EXHAUSTIVE[int(img[r])])] = True
    assert want.sum() > 0
    not_exhaustive = ImageLabels.cat([p.image_labels for p in ignoring]).not_exhaustive_rows()
    assert torch.equal((labels == C)[:, None] & not_exhaustive, want)

    logits = torch.randn(len(labels), C + 1, generator=torch.Generator().manual_seed(2))
    g_plain = cls_grad(heads, plain, logits)
    heads.box_predictor.ignore_not_exhaustive = True  # MODEL.IMAGE_LABELS.IGNORE_NOT_EXHAUSTIVE
    g_ign = cls_grad(heads, ignoring, logits)
    assert torch.all(g_ign[:, :C][want] == 0) and torch.all(g_plain[:, :C][want] != 0)
    rows = want.any(dim=1)
    # rows without excluded entries are untouched; in sigmoid-type losses so are the other
    # entries of the affected rows (in a softmax the partition function changes)
    assert torch.equal(g_ign[~rows], g_plain[~rows])
    if loss != "SoftmaxCE":
        other = torch.cat([want, torch.zeros(len(labels), 1, dtype=torch.bool)], 1)
        assert torch.equal(g_ign[~other], g_plain[~other])


def test_sigmoid_classifiers_start_at_the_prior_and_eqlv2_scores_with_objectness():
    for loss in ("SigmoidCE", "EQL", "EQLv2"):
        pred = build_heads(make_cfg(loss, prior_prob=0.01)).box_predictor
        torch.testing.assert_close(torch.sigmoid(pred.cls_score.bias[:C]),
                                   torch.full((C,), 0.01))
    bg = torch.sigmoid(pred.cls_score.bias[C])  # EQLv2: objectness starts at the bg share
    assert math.isclose(float(bg.detach()), 0.75, rel_tol=1e-5)
    logits = torch.randn(5, C + 1)
    props = [Instances((64, 64), proposal_boxes=Boxes(torch.zeros(5, 4)))]
    probs = pred.predict_probs((logits, None), props)[0]
    torch.testing.assert_close(probs[:, :C], torch.sigmoid(logits[:, :C])
                               * (1 - torch.sigmoid(logits[:, C:])))


def test_eql_frequencies_come_from_dataset_metadata(caplog):
    with caplog.at_level("INFO", logger="eql_d2"):
        pred = build_heads(make_cfg("EQL")).box_predictor
    torch.testing.assert_close(pred.cls_loss.freq, torch.tensor(IMAGE_COUNTS) / 100.0)
    assert int(pred.cls_loss.threshold().sum()) == len(TAIL)
    tr = 100.0 * sum(IMAGE_COUNTS[:3]) / sum(IMAGE_COUNTS)
    assert "3 of 8 categories are tail categories" in caplog.text
    assert f"TR(lambda) = {tr:.2f}%" in caplog.text


def test_configuration_errors_name_the_key():
    cfg = make_cfg("qfl")  # registered, but for dense heads
    with pytest.raises(ValueError, match="MODEL.CLS_LOSS.NAME 'qfl' .* does not work with "
                                         "two_stage"):
        build_heads(cfg)
    cfg = make_cfg("eqlv3")
    with pytest.raises(ValueError, match="MODEL.CLS_LOSS.NAME 'eqlv3' is not a registered"):
        build_heads(cfg)
    cfg = make_cfg("EQL")
    cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE = True
    with pytest.raises(ValueError, match="USE_SIGMOID_CE"):
        build_heads(cfg)
    # inconsistent training metadata still fails at build time; absent metadata does not
    # (inference takes the frequencies from the checkpoint: tests/test_inference_without_
    # training_data.py)
    cfg = make_cfg("EQL")
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = C + 1
    with pytest.raises(ValueError, match=f"class_image_count for {C} categories, but "
                                         f"MODEL.ROI_HEADS.NUM_CLASSES = {C + 1}"):
        build_heads(cfg)


def test_detectron2_federated_loss_key_names_the_registered_loss():
    cfg = make_cfg("SigmoidCE")
    cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS = True
    with pytest.raises(ValueError, match="MODEL.CLS_LOSS.NAME Federated"):
        build_heads(cfg)

def test_labels_are_required_and_validated():
    heads = build_heads(make_cfg("EQL"))
    inputs, proposals = batch()
    targets = [x["instances"] for x in inputs]
    with EventStorage():
        sampled = heads.label_and_sample_proposals(proposals, targets)
    logits = torch.zeros(sum(len(p) for p in sampled), C + 1)
    with EventStorage(), pytest.raises(RuntimeError, match="ImageLabelDatasetMapper"):
        heads.box_predictor.losses((logits, torch.zeros(len(logits), 4 * C)), sampled)
    record = dict(inputs[1], annotations=[{"category_id": 5}], neg_category_ids=[9])
    with pytest.raises(ValueError, match="b.png: neg_category_ids has category id 9"):
        image_label_masks(record, C)
    # a dataset without LVIS's image-level fields: empty sets, only the positives verified
    del record["neg_category_ids"], record["not_exhaustive_category_ids"]
    verified, not_exhaustive = image_label_masks(record, C)
    assert verified.nonzero().flatten().tolist() == [5] and not not_exhaustive.any()
    assert isinstance(heads.box_predictor, EQLFastRCNNOutputLayers)
