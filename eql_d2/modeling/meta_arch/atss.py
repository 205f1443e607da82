"""ATSS, the improved one-stage baseline of Li et al., "Equalized Focal Loss for Dense
Long-Tailed Object Detection" (CVPR 2022, sec. 4.1 and Tab. 5), on detectron2's
:class:`~detectron2.modeling.meta_arch.dense_detector.DenseDetector`.

ATSS itself is Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free
Detection via Adaptive Training Sample Selection" (CVPR 2020). The improved baseline changes
it in three ways: an IoU branch instead of centerness, anchors of scales {6, 8} x stride
(2 per location) and k = 18, plus the stabilized settings (6000 warm-up iterations and
gradient clipping at norm 35, which live in the solver config).
"""

import logging
from typing import List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from ...utils.comm import all_reduce_
from .dense_loss import (DenseClassificationLoss, TopKFirstDecoding, box_quality,
                         decode_positives, head_feature_shapes, positives_and_normalizer)

__all__ = ["ATSS", "ATSSHead", "atss_match", "giou_box_loss", "BOX_LOSS_WEIGHTINGS"]

# MODEL.ATSS.BBOX_REG_LOSS_WEIGHTING: how positives share the GIoU box loss
BOX_LOSS_WEIGHTINGS = ("uniform", "iou")

logger = logging.getLogger(__name__)


@torch.no_grad()
def atss_match(gt_boxes: Tensor, anchors_per_level: List[Tensor], topk: int) -> Tensor:
    """Adaptive training sample selection: the ground truth each anchor is assigned to.

    For each ground-truth box g:

    1. on each pyramid level, the ``topk`` anchors whose centres are nearest to g's centre
       (L2; equal distances go to the lower anchor index) are candidates;
    2. the IoU threshold of g is mean + std of the candidates' IoUs with g (std with
       Bessel's correction, as ``torch.std``; 0 for a single candidate);
    3. a candidate is positive for g if its IoU >= that threshold and its centre lies
       strictly inside g.

    An anchor positive for several boxes goes to the one with the highest IoU (the first
    such box on equal IoU).

    Args:
        gt_boxes: [M, 4] XYXY.
        anchors_per_level: one [R_l, 4] XYXY tensor per level, in the order the head
            predicts them.
        topk: k >= 1; a level with fewer anchors contributes all of them.

    Returns:
        [R] long, R = sum(R_l): index into ``gt_boxes``, or -1 for background.
    """
    if topk < 1:
        raise ValueError(f"MODEL.ATSS.TOPK must be >= 1, got {topk}")
    anchors = torch.cat(anchors_per_level)
    num_anchors = anchors.shape[0]
    matched = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if gt_boxes.shape[0] == 0 or num_anchors == 0:
        return matched
    ious = pairwise_iou(Boxes(gt_boxes), Boxes(anchors))  # [M, R]
    gt_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    anchor_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    # squared distance ranks like the distance and is exact for grid coordinates
    dist2 = (gt_ctr[:, None, :] - anchor_ctr[None, :, :]).pow(2).sum(-1)  # [M, R]

    candidates = []
    start = 0
    for level in anchors_per_level:
        n = level.shape[0]
        k = min(topk, n)
        # a stable sort, unlike topk, fixes which of two equidistant anchors is taken
        order = dist2[:, start:start + n].sort(dim=1, stable=True).indices[:, :k]
        candidates.append(order + start)
        start += n
    candidates = torch.cat(candidates, dim=1)  # [M, K]

    cand_iou = ious.gather(1, candidates)
    threshold = cand_iou.mean(dim=1)
    if candidates.shape[1] > 1:
        threshold = threshold + cand_iou.std(dim=1)
    cx, cy = anchor_ctr[candidates, 0], anchor_ctr[candidates, 1]  # [M, K]
    inside = ((cx > gt_boxes[:, None, 0]) & (cx < gt_boxes[:, None, 2])
              & (cy > gt_boxes[:, None, 1]) & (cy < gt_boxes[:, None, 3]))
    positive = (cand_iou >= threshold[:, None]) & inside

    # IoU where g claims the anchor, -1 elsewhere; the max over g resolves shared anchors
    claim = torch.full_like(ious, -1.0)
    claim.scatter_(1, candidates, torch.where(positive, cand_iou, torch.full_like(cand_iou, -1.0)))
    best, best_gt = claim.max(dim=0)
    return torch.where(best >= 0, best_gt, matched)


def giou_box_loss(pred_boxes: Tensor, target_boxes: Tensor, iou_target: Tensor,
                  weighting: str, num_pos: Tensor) -> Tensor:
    """GIoU loss of P positive anchors' decoded boxes [P, 4] against their targets, reduced
    to a scalar the two ways ATSS implementations do:

    - "uniform": sum of the P losses / ``num_pos`` (the positive count averaged over workers);
    - "iou": each loss weighted by its IoU target [P] (the IoU of the detached decoded box
      with its ground truth, as ATSS weights by centerness) and divided by the sum of those
      targets averaged over workers: sum_i t_i L_i / mean_workers(sum_i t_i). The EFL
      authors' improved baseline does this.

    Both are averaged over workers so that DDP's mean of the workers' gradients equals one
    process on the whole batch.
    """
    losses = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none")
    if weighting == "uniform":
        return losses.sum() / num_pos
    if weighting == "iou":
        total = all_reduce_(iou_target.sum().detach().clone(), mean=True)
        # no positive anywhere (or only zero-IoU boxes): the loss is 0 with a defined gradient
        return (losses * iou_target).sum() / total.clamp(min=1e-6)
    raise ValueError(f"MODEL.ATSS.BBOX_REG_LOSS_WEIGHTING must be one of "
                     f"{', '.join(BOX_LOSS_WEIGHTINGS)}, got {weighting!r}")


class ATSSHead(RetinaNetHead):
    """RetinaNet's head (shared convs, NORM, prior-probability bias) plus an IoU branch: a
    3x3 conv on the box subnet's features predicting, per anchor, the logit of the IoU of
    the decoded box with its ground truth."""

    @configurable
    def __init__(self, *, input_shape: List[ShapeSpec], num_classes, num_anchors,
                 conv_dims: List[int], norm="GN", prior_prob=0.001):
        super().__init__(input_shape=input_shape, num_classes=num_classes,
                         num_anchors=num_anchors, conv_dims=conv_dims, norm=norm,
                         prior_prob=prior_prob)
        self.iou_pred = nn.Conv2d(conv_dims[-1], num_anchors, kernel_size=3, stride=1,
                                  padding=1)
        nn.init.normal_(self.iou_pred.weight, std=0.01)
        nn.init.constant_(self.iou_pred.bias, 0.0)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.ATSS.NUM_CLASSES,
            "num_anchors": len(cfg.MODEL.ATSS.ANCHOR_SCALES)
            * len(cfg.MODEL.ATSS.ANCHOR_ASPECT_RATIOS),
            "conv_dims": [input_shape[0].channels] * cfg.MODEL.ATSS.NUM_CONVS,
            "norm": cfg.MODEL.ATSS.NORM,
            "prior_prob": cfg.MODEL.ATSS.PRIOR_PROB,
        }

    def forward(self, features: List[Tensor]):
        """Returns three lists over levels: class logits (N, A*C, H, W), box deltas
        (N, A*4, H, W), IoU logits (N, A, H, W)."""
        if len(features) != self._num_features:
            raise ValueError(f"ATSSHead was built for {self._num_features} levels, "
                             f"got {len(features)} feature maps")
        logits, deltas, ious = [], [], []
        for feature in features:
            logits.append(self.cls_score(self.cls_subnet(feature)))
            box_feature = self.bbox_subnet(feature)
            deltas.append(self.bbox_pred(box_feature))
            ious.append(self.iou_pred(box_feature))
        return logits, deltas, ious


@META_ARCH_REGISTRY.register()
class ATSS(TopKFirstDecoding, DenseDetector):
    """The improved ATSS baseline (see the module docstring).

    Training: anchors are labelled by :func:`atss_match`. Losses, each divided by the
    number of positive anchors (averaged over workers):

    - ``loss_cls``: :class:`DenseClassificationLoss` over all levels and images at once
      (focal / EFL / QFL / EQFL; QFL and EQFL use the IoU target below as soft label);
    - ``loss_box_reg``: GIoU loss of the decoded boxes of positive anchors, times
      ``box_reg_loss_weight``, either divided by the number of positives or weighted by
      each positive's IoU target and divided by their sum (``box_reg_loss_weighting``,
      :func:`giou_box_loss`);
    - ``loss_iou``: BCE of the IoU branch on positive anchors against the IoU of the
      decoded (detached) box with its ground truth, times ``iou_loss_weight``.

    Inference: the score of class j at an anchor is sqrt(sigmoid(z_j) * sigmoid(z_iou)),
    the geometric mean of class probability and predicted IoU. It ranks boxes exactly as
    the product used for centerness in ATSS, while staying on the scale of a probability
    (as detectron2's FCOS does). Per level the ``test_topk_candidates`` best (anchor,
    class) pairs above ``test_score_thresh`` (0 in the paper: nothing is dropped for its
    score) are decoded, then per-class NMS keeps the ``max_detections_per_image`` best.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: nn.Module,
        head_in_features: List[str],
        anchor_generator: nn.Module,
        box2box_transform: Box2BoxTransform,
        num_classes: int,
        cls_loss: nn.Module,
        topk: int = 18,
        box_reg_loss_weight: float = 2.0,
        box_reg_loss_weighting: str = "uniform",
        iou_loss_weight: float = 1.0,
        test_score_thresh: float = 0.0,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 300,
        pixel_mean,
        pixel_std,
        input_format: str = "BGR",
    ):
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean,
                         pixel_std=pixel_std)
        if topk < 1:
            raise ValueError(f"MODEL.ATSS.TOPK must be >= 1, got {topk}")
        self.num_classes = num_classes
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.cls_loss = cls_loss
        self.topk = int(topk)
        self.box_reg_loss_weight = box_reg_loss_weight
        if box_reg_loss_weighting not in BOX_LOSS_WEIGHTINGS:
            raise ValueError(f"MODEL.ATSS.BBOX_REG_LOSS_WEIGHTING must be one of "
                             f"{', '.join(BOX_LOSS_WEIGHTINGS)}, got {box_reg_loss_weighting!r}")
        self.box_reg_loss_weighting = box_reg_loss_weighting
        self.iou_loss_weight = iou_loss_weight
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        in_features = list(cfg.MODEL.ATSS.IN_FEATURES)
        feature_shapes = head_feature_shapes("MODEL.ATSS.IN_FEATURES", in_features, backbone,
                                             cfg.MODEL.BACKBONE.NAME)
        strides = [s.stride for s in feature_shapes]
        scales = list(cfg.MODEL.ATSS.ANCHOR_SCALES)
        if not scales or min(scales) <= 0:
            raise ValueError(f"MODEL.ATSS.ANCHOR_SCALES must be positive numbers, got {scales}")
        anchor_generator = DefaultAnchorGenerator(
            sizes=[[s * stride for s in scales] for stride in strides],
            aspect_ratios=[list(cfg.MODEL.ATSS.ANCHOR_ASPECT_RATIOS)],
            strides=strides,
            offset=cfg.MODEL.ANCHOR_GENERATOR.OFFSET,
        )
        return {
            "backbone": backbone,
            "head": ATSSHead(cfg, feature_shapes),
            "head_in_features": in_features,
            "anchor_generator": anchor_generator,
            "box2box_transform": Box2BoxTransform(weights=cfg.MODEL.ATSS.BBOX_REG_WEIGHTS),
            "num_classes": cfg.MODEL.ATSS.NUM_CLASSES,
            "cls_loss": DenseClassificationLoss(cfg, cfg.MODEL.ATSS.NUM_CLASSES),
            "topk": cfg.MODEL.ATSS.TOPK,
            "box_reg_loss_weight": cfg.MODEL.ATSS.BBOX_REG_LOSS_WEIGHT,
            "box_reg_loss_weighting": cfg.MODEL.ATSS.BBOX_REG_LOSS_WEIGHTING,
            "iou_loss_weight": cfg.MODEL.ATSS.IOU_LOSS_WEIGHT,
            "test_score_thresh": cfg.MODEL.ATSS.SCORE_THRESH_TEST,
            "test_topk_candidates": cfg.MODEL.ATSS.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": cfg.MODEL.ATSS.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
        }

    def forward_training(self, images, features, predictions, gt_instances):
        pred_logits, pred_deltas, pred_ious = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1])
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        return self.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes, pred_ious)

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]):
        """Same interface as :meth:`RetinaNet.label_anchors` with :func:`atss_match`:
        per image, labels [R] in {0..C-1, C background} (ATSS ignores no anchor) and the
        matched ground-truth boxes [R, 4] (zeros for background)."""
        per_level = [a.tensor for a in anchors]
        gt_labels, matched_boxes = [], []
        for inst in gt_instances:
            idx = atss_match(inst.gt_boxes.tensor, per_level, self.topk)
            fg = idx >= 0
            safe = idx.clamp(min=0)
            if len(inst) > 0:
                labels = torch.where(fg, inst.gt_classes[safe], self.num_classes)
                boxes = inst.gt_boxes.tensor[safe] * fg[:, None]
            else:
                labels = torch.full_like(idx, self.num_classes)
                boxes = torch.zeros((idx.shape[0], 4), device=idx.device)
            gt_labels.append(labels)
            matched_boxes.append(boxes)
        return gt_labels, matched_boxes

    def losses(self, anchors, pred_logits, gt_labels, pred_deltas, gt_boxes, pred_ious):
        """
        Args:
            anchors: list over levels of Boxes.
            pred_logits, pred_deltas, pred_ious: lists over levels of (N, R_l, C / 4 / 1).
            gt_labels, gt_boxes: output of :meth:`label_anchors`.

        Returns:
            dict with ``loss_cls``, ``loss_box_reg``, ``loss_iou``.
        """
        gt_labels, pos_mask, normalizer = positives_and_normalizer(gt_labels, self.num_classes)

        pred_boxes, target_boxes = decode_positives(
            self.box2box_transform, anchors, pred_deltas, pos_mask, gt_boxes)
        iou_target = box_quality(pred_boxes, target_boxes)

        loss_cls = self.cls_loss(cat(pred_logits, dim=1), gt_labels, pos_mask, normalizer,
                                 positive_iou=lambda: iou_target)

        loss_box = giou_box_loss(pred_boxes, target_boxes, iou_target,
                                 self.box_reg_loss_weighting, normalizer)
        iou_logits = cat(pred_ious, dim=1).squeeze(-1)[pos_mask]
        loss_iou = F.binary_cross_entropy_with_logits(iou_logits, iou_target, reduction="sum")
        return {
            "loss_cls": loss_cls,
            "loss_box_reg": loss_box * self.box_reg_loss_weight,
            "loss_iou": loss_iou * (self.iou_loss_weight / normalizer),
        }

    def forward_inference(self, images: ImageList, features: List[Tensor],
                          predictions: List[List[Tensor]]):
        pred_logits, pred_deltas, pred_ious = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1])
        anchors = self.anchor_generator(features)
        results: List[Instances] = []
        for img_idx, image_size in enumerate(images.image_sizes):
            scores = [torch.sqrt(x[img_idx].sigmoid() * y[img_idx].sigmoid())
                      for x, y in zip(pred_logits, pred_ious)]
            deltas = [x[img_idx] for x in pred_deltas]
            pred = self._decode_multi_level_predictions(
                anchors, scores, deltas, self.test_score_thresh, self.test_topk_candidates,
                image_size)
            results.append(self._select(pred, image_size))
        return results

    def _select(self, pred: Instances, image_size) -> Instances:
        """The detections of one image from its decoded candidates: class-wise NMS, then the
        highest-scoring TEST.DETECTIONS_PER_IMAGE."""
        keep = batched_nms(pred.pred_boxes.tensor, pred.scores, pred.pred_classes,
                           self.test_nms_thresh)
        return pred[keep[: self.max_detections_per_image]]
