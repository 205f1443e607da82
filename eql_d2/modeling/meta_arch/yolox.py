"""YOLOX (Ge et al., "YOLOX: Exceeding YOLO Series in 2021", arXiv 2107.08430) with the
classification loss of ``MODEL.CLS_LOSS``, and the enhanced YOLOX of Li et al., "Equalized
Focal Loss for Dense Long-Tailed Object Detection" (CVPR 2022, appendix A, Tab. 8).

The detector (forms as in the YOLOX release, Megvii-BaseDetection/YOLOX, ``yolo_head.py``):

- one prediction per cell of strides 8, 16, 32 (``p3``-``p5`` of the CSPDarknet-PAFPN
  backbone); a box is decoded from its deltas d as centre ((x + d0) s, (y + d1) s) and size
  (exp(d2) s, exp(d3) s) for the cell (x, y) of stride s;
- the decoupled head (:class:`YOLOXHead`): per level a 1x1 stem, then a classification branch
  and a regression branch of 3x3 convs, the latter predicting the box deltas and a quality
  logit (objectness, or the IoU of the enhanced YOLOX);
- SimOTA assignment (:func:`simota_match`);
- losses, each divided by the number of positives averaged over workers: ``loss_box``,
  ``box_loss_weight`` x (1 - IoU^2) of the positives' decoded boxes (YOLOX's IoU loss, weight
  5); ``loss_obj``, BCE of the objectness of every point against 1 for positives and 0
  otherwise; ``loss_cls``, the registered classification loss on the positives only (the
  objectness learns the background), whose soft target is the IoU of the decoded box for
  losses that take one (QFL, EQFL); ``loss_l1``, the L1 distance of the positives' raw deltas
  to those of their ground truth, while ``use_l1_loss`` is True (YOLOX turns it on for the
  last 15 epochs; a training hook sets the attribute);
- inference: score of class j at a point sigmoid(z_j) x sigmoid(z_obj); per level the
  ``test_topk_candidates`` best (point, class) pairs above ``test_score_thresh``, class-wise
  NMS, the best ``max_detections_per_image``.

The enhanced YOLOX (``MODEL.YOLOX.ASSIGNER "ATSS"``, ``QUALITY "iou"``, ``L1_LOSS True``)
replaces the supervisor and predictor by those of the improved ATSS baseline: ATSS assignment
(:func:`~eql_d2.modeling.meta_arch.atss.atss_match`) on square anchors of
``anchor_scales`` x stride at each cell (one prediction per anchor), the IoU branch (BCE of
the quality logit of positives against the IoU of their detached decoded box), the
classification loss over every point (background points are negatives, as in ATSS) and the
score sqrt(sigmoid(z_j) x sigmoid(z_iou)) at test time; the IoU and L1 losses throughout.
"""

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.structures.boxes import matched_pairwise_iou
from torch import Tensor, nn

from ..backbone.cspdarknet import ConvNormAct
from .atss import atss_match
from .dense_loss import DenseClassificationLoss, head_feature_shapes, positives_and_normalizer

__all__ = ["YOLOX", "YOLOXHead", "simota_match", "dynamic_k_matching", "decode_boxes", "ASSIGNERS",
           "QUALITIES"]

# MODEL.YOLOX.ASSIGNER and MODEL.YOLOX.QUALITY
ASSIGNERS = ("SimOTA", "ATSS")
QUALITIES = ("objectness", "iou")
# the cost of a point outside the box or the centre region of an object (YOLOX's constant)
OUTSIDE_COST = 1e5
# box deltas d2, d3 are clamped here before exp (detectron2's clamp: boxes up to 62.5 strides)
SCALE_CLAMP = math.log(1000.0 / 16)


@torch.no_grad()
def simota_match(gt_boxes: Tensor, gt_classes: Tensor, centers: Tensor, strides: Tensor,
                 pred_boxes: Tensor, pred_scores: Tensor, center_radius: float = 2.5,
                 candidate_topk: int = 10, iou_weight: float = 3.0) -> Tensor:
    """SimOTA: the object each point is assigned to (YOLOX's ``get_assignments``).

    1. Candidates: points whose centre lies inside some object's box or within
       ``center_radius`` strides of its centre (a square), for any object.
    2. Cost of object g and candidate i: sum over classes of the binary cross-entropy of the
       candidate's score p_i (classes x quality, square-rooted) against g's one-hot class,
       plus ``iou_weight`` x -log(IoU(g, predicted box i) + 1e-8), plus
       :data:`OUTSIDE_COST` unless i lies both in g's box and in g's centre region.
    3. Dynamic k of g: the sum of its ``candidate_topk`` largest IoUs with the candidates'
       predicted boxes, truncated to an integer, at least 1; g takes its k lowest-cost
       candidates (a stable sort decides equal costs).
    4. A candidate taken by several objects goes to the object of lowest cost for it among
       all objects (as YOLOX's code: the argmin over every object; the first on ties).

    Args:
        gt_boxes: [M, 4] XYXY; gt_classes: [M] in 0..C-1.
        centers: [R, 2] the points (cell centres); strides: [R].
        pred_boxes: [R, 4] decoded predictions (XYXY); pred_scores: [R, C] probabilities.

    Returns:
        [R] long: index into ``gt_boxes``, or -1 for background.
    """
    num_points = centers.shape[0]
    matched = torch.full((num_points,), -1, dtype=torch.long, device=centers.device)
    if gt_boxes.shape[0] == 0 or num_points == 0:
        return matched
    x, y = centers[None, :, 0], centers[None, :, 1]
    x0, y0, x1, y1 = (gt_boxes[:, i, None] for i in range(4))
    in_box = (x > x0) & (x < x1) & (y > y0) & (y < y1)  # [M, R]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    radius = center_radius * strides[None, :]
    in_center = ((x > cx - radius) & (x < cx + radius)
                 & (y > cy - radius) & (y < cy + radius))
    candidates = (in_box | in_center).any(dim=0).nonzero().squeeze(1)  # [K]
    if candidates.numel() == 0:
        return matched
    ious = pairwise_iou(Boxes(gt_boxes), Boxes(pred_boxes[candidates]))  # [M, K]

    # BCE against the one-hot class, summed over classes: every class as a negative, then
    # the object's own class turned positive (logs clamped at -100 as binary_cross_entropy)
    p = pred_scores[candidates]
    log_p, log_not_p = p.log().clamp(min=-100), (1 - p).log().clamp(min=-100)
    neg_sum = -log_not_p.sum(dim=1)  # [K]
    own_p, own_not_p = log_p[:, gt_classes].T, log_not_p[:, gt_classes].T  # [M, K]
    cls_cost = neg_sum[None, :] + own_not_p - own_p
    inside_both = (in_box & in_center)[:, candidates]
    cost = cls_cost + iou_weight * -torch.log(ious + 1e-8) + OUTSIDE_COST * (~inside_both)

    owner = dynamic_k_matching(cost, ious, candidate_topk)
    fg = owner >= 0
    matched[candidates[fg]] = owner[fg]
    return matched


def dynamic_k_matching(cost: Tensor, ious: Tensor, candidate_topk: int = 10) -> Tensor:
    """Steps 3 and 4 of :func:`simota_match` on M objects' costs and IoUs [M, K] with K
    candidates: the object each candidate goes to [K] (-1: none chose it)."""
    k = min(candidate_topk, cost.shape[1])
    dynamic_k = ious.topk(k, dim=1).values.sum(dim=1).int().clamp(min=1)  # [M]
    order = cost.argsort(dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    chosen = rank < dynamic_k[:, None]  # [M, K]
    taken = chosen.sum(dim=0)
    # YOLOX resolves a shared candidate by the lowest cost over every object
    owner = torch.where(taken > 1, cost.argmin(dim=0), chosen.int().argmax(dim=0))
    return torch.where(taken > 0, owner, -1)


def decode_boxes(deltas: Tensor, grid: Tensor, strides: Tensor) -> Tensor:
    """YOLOX's boxes from deltas [..., R, 4] at cells grid [R, 2] (x, y) of strides [R]:
    centre (grid + d[:2]) x stride, size exp(d[2:]) x stride (d[2:] clamped at
    :data:`SCALE_CLAMP`); XYXY [..., R, 4]."""
    s = strides[:, None]
    center = (deltas[..., :2] + grid) * s
    half = torch.exp(deltas[..., 2:].clamp(max=SCALE_CLAMP)) * s / 2
    return torch.cat([center - half, center + half], dim=-1)


def l1_targets(gt_boxes: Tensor, grid: Tensor, strides: Tensor, eps: float = 1e-8) -> Tensor:
    """The deltas that decode to gt_boxes [P, 4] (XYXY) at cells grid [P, 2] of strides [P]
    (YOLOX's ``get_l1_target``): centre / stride - cell, log(size / stride + eps)."""
    s = strides[:, None]
    center = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    size = gt_boxes[:, 2:] - gt_boxes[:, :2]
    return torch.cat([center / s - grid, torch.log(size / s + eps)], dim=1)


class YOLOXHead(nn.Module):
    """YOLOX's decoupled head. Per level: a 1x1 stem to ``channels``, then a classification
    branch and a regression branch of ``num_convs`` 3x3 conv-norm-SiLU blocks; 1x1 convs
    predict A x C class logits (``cls_preds``) from the first, A x 4 box deltas
    (``reg_preds``) and A quality logits (``quality_preds``: objectness or IoU) from the
    second. Class logits start at the prior ``prior_prob``; objectness too (YOLOX), an IoU
    branch at bias 0 (as ATSS's)."""

    @configurable
    def __init__(self, *, input_shape: List[ShapeSpec], num_classes: int, num_anchors: int,
                 channels: int, num_convs: int = 2, norm: str = "BN", prior_prob: float = 0.01,
                 quality: str = "objectness"):
        super().__init__()
        self.stems, self.cls_convs, self.reg_convs = (nn.ModuleList() for _ in range(3))
        self.cls_preds, self.reg_preds, self.quality_preds = (nn.ModuleList() for _ in range(3))
        bias = -math.log((1 - prior_prob) / prior_prob)
        for shape in input_shape:
            self.stems.append(ConvNormAct(shape.channels, channels, 1, norm=norm))
            for branch in (self.cls_convs, self.reg_convs):
                branch.append(nn.Sequential(*[ConvNormAct(channels, channels, 3, norm=norm)
                                              for _ in range(num_convs)]))
            self.cls_preds.append(nn.Conv2d(channels, num_anchors * num_classes, 1))
            self.reg_preds.append(nn.Conv2d(channels, num_anchors * 4, 1))
            self.quality_preds.append(nn.Conv2d(channels, num_anchors, 1))
            nn.init.constant_(self.cls_preds[-1].bias, bias)
            nn.init.constant_(self.quality_preds[-1].bias, bias if quality == "objectness" else 0.0)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        y = cfg.MODEL.YOLOX
        return {
            "input_shape": input_shape,
            "num_classes": y.NUM_CLASSES,
            "num_anchors": len(y.ANCHOR_SCALES) if y.ASSIGNER == "ATSS" else 1,
            "channels": y.HEAD_CHANNELS,
            "num_convs": y.NUM_CONVS,
            "norm": y.NORM,
            "prior_prob": y.PRIOR_PROB,
            "quality": y.QUALITY,
        }

    def forward(self, features: List[Tensor]):
        """Three lists over levels: class logits (N, A*C, H, W), box deltas (N, A*4, H, W),
        quality logits (N, A, H, W)."""
        if len(features) != len(self.stems):
            raise ValueError(f"YOLOXHead was built for {len(self.stems)} levels, got "
                             f"{len(features)} feature maps")
        logits, deltas, quality = [], [], []
        for k, feature in enumerate(features):
            x = self.stems[k](feature)
            logits.append(self.cls_preds[k](self.cls_convs[k](x)))
            reg = self.reg_convs[k](x)
            deltas.append(self.reg_preds[k](reg))
            quality.append(self.quality_preds[k](reg))
        return logits, deltas, quality


def _check(cfg):
    """Config values a YOLOX cannot be built with, named by key."""
    y = cfg.MODEL.YOLOX
    if y.ASSIGNER not in ASSIGNERS:
        raise ValueError(f"MODEL.YOLOX.ASSIGNER must be one of {', '.join(ASSIGNERS)}, "
                         f"got {y.ASSIGNER!r}")
    if y.QUALITY not in QUALITIES:
        raise ValueError(f"MODEL.YOLOX.QUALITY must be one of {', '.join(QUALITIES)}, "
                         f"got {y.QUALITY!r}")
    scales = list(y.ANCHOR_SCALES)
    if not scales or min(scales) <= 0:
        raise ValueError(f"MODEL.YOLOX.ANCHOR_SCALES must be positive numbers, got {scales}")
    if y.ASSIGNER == "SimOTA" and len(scales) != 1:
        raise ValueError("MODEL.YOLOX.ANCHOR_SCALES: SimOTA assigns one prediction per cell, "
                         f"so one scale (unused by SimOTA); got {scales}")
    for key in ("ATSS_TOPK", "SIMOTA_CANDIDATE_TOPK", "NUM_CONVS", "HEAD_CHANNELS"):
        if y[key] < 1:
            raise ValueError(f"MODEL.YOLOX.{key} must be >= 1, got {y[key]}")
    if not y.SIMOTA_CENTER_RADIUS > 0:
        raise ValueError(f"MODEL.YOLOX.SIMOTA_CENTER_RADIUS must be > 0, got "
                         f"{y.SIMOTA_CENTER_RADIUS}")
    if not 0.0 < y.PRIOR_PROB < 1.0:
        raise ValueError(f"MODEL.YOLOX.PRIOR_PROB must lie in (0, 1), got {y.PRIOR_PROB}")


@META_ARCH_REGISTRY.register()
class YOLOX(DenseDetector):
    """YOLOX and the enhanced YOLOX (see the module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        backbone,
        head: nn.Module,
        head_in_features: List[str],
        num_classes: int,
        cls_loss: nn.Module,
        assigner: str = "SimOTA",
        quality: str = "objectness",
        anchor_scales: Sequence[float] = (8.0,),
        atss_topk: int = 9,
        center_radius: float = 2.5,
        candidate_topk: int = 10,
        iou_cost_weight: float = 3.0,
        box_loss_weight: float = 5.0,
        quality_loss_weight: float = 1.0,
        use_l1_loss: bool = False,
        test_score_thresh: float = 0.01,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.65,
        max_detections_per_image: int = 100,
        pixel_mean,
        pixel_std,
        input_format: str = "BGR",
    ):
        """
        Args:
            backbone, head, head_in_features: the CSPDarknet-PAFPN, a :class:`YOLOXHead`,
                the backbone outputs it reads (strides in increasing order).
            num_classes: C; cls_loss: a :class:`DenseClassificationLoss`.
            assigner: "SimOTA" (:func:`simota_match`) or "ATSS" (ATSS's ``atss_match`` on
                square anchors of ``anchor_scales`` x stride, ``atss_topk`` per level).
            quality: "objectness" (YOLOX) or "iou" (the improved baseline's IoU branch).
            center_radius, candidate_topk, iou_cost_weight: SimOTA's settings.
            box_loss_weight: of the IoU loss; quality_loss_weight: of the objectness / IoU BCE.
            use_l1_loss: add the L1 loss of the raw deltas; an attribute a hook may change.
            test_*: the score threshold, per-level candidates and NMS IoU of inference;
                max_detections_per_image: TEST.DETECTIONS_PER_IMAGE.
        """
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean,
                         pixel_std=pixel_std)
        if assigner not in ASSIGNERS or quality not in QUALITIES:
            raise ValueError(f"assigner must be one of {ASSIGNERS} and quality one of "
                             f"{QUALITIES}, got {assigner!r}, {quality!r}")
        self.num_classes = num_classes
        self.cls_loss = cls_loss
        self.assigner = assigner
        self.quality = quality
        self.anchor_scales = tuple(float(s) for s in anchor_scales)
        self.num_anchors = len(self.anchor_scales) if assigner == "ATSS" else 1
        self.atss_topk = int(atss_topk)
        self.center_radius = center_radius
        self.candidate_topk = int(candidate_topk)
        self.iou_cost_weight = iou_cost_weight
        self.box_loss_weight = box_loss_weight
        self.quality_loss_weight = quality_loss_weight
        self.use_l1_loss = bool(use_l1_loss)
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format
        self.strides = [backbone.output_shape()[f].stride for f in head_in_features]

    @classmethod
    def from_config(cls, cfg):
        _check(cfg)
        y = cfg.MODEL.YOLOX
        backbone = build_backbone(cfg)
        in_features = list(y.IN_FEATURES)
        shapes = head_feature_shapes("MODEL.YOLOX.IN_FEATURES", in_features, backbone,
                                     cfg.MODEL.BACKBONE.NAME)
        return {
            "backbone": backbone,
            "head": YOLOXHead(cfg, shapes),
            "head_in_features": in_features,
            "num_classes": y.NUM_CLASSES,
            "cls_loss": DenseClassificationLoss(cfg, y.NUM_CLASSES),
            "assigner": y.ASSIGNER,
            "quality": y.QUALITY,
            "anchor_scales": list(y.ANCHOR_SCALES),
            "atss_topk": y.ATSS_TOPK,
            "center_radius": y.SIMOTA_CENTER_RADIUS,
            "candidate_topk": y.SIMOTA_CANDIDATE_TOPK,
            "iou_cost_weight": y.SIMOTA_IOU_WEIGHT,
            "box_loss_weight": y.BOX_LOSS_WEIGHT,
            "quality_loss_weight": y.QUALITY_LOSS_WEIGHT,
            "use_l1_loss": y.L1_LOSS,
            "test_score_thresh": y.SCORE_THRESH_TEST,
            "test_topk_candidates": y.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": y.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
        }

    # ------------------------------------------------------------------ the points

    def points(self, features: List[Tensor]):
        """The predictions' places, levels concatenated in the head's order (row-major
        cells, then the A anchors of a cell): grid [R, 2] (cell x, y), centres [R, 2] (the
        cell's centre in pixels), strides [R], and per level the ATSS anchors [R_l, 4]
        (squares of scale x stride about the centre)."""
        grids, strides, anchors = [], [], []
        for feature, stride in zip(features, self.strides):
            h, w = feature.shape[-2:]
            ys, xs = torch.meshgrid(torch.arange(h, device=feature.device),
                                    torch.arange(w, device=feature.device), indexing="ij")
            cell = torch.stack([xs, ys], dim=-1).reshape(-1, 1, 2).float()
            cell = cell.expand(-1, self.num_anchors, 2).reshape(-1, 2)
            grids.append(cell)
            strides.append(torch.full((cell.shape[0],), float(stride), device=feature.device))
            side = torch.tensor(self.anchor_scales[: self.num_anchors], device=feature.device)
            half = (side * stride / 2).repeat(h * w)[:, None]
            center = (cell + 0.5) * stride
            anchors.append(torch.cat([center - half, center + half], dim=1))
        grid, stride = torch.cat(grids), torch.cat(strides)
        return grid, (grid + 0.5) * stride[:, None], stride, anchors

    # ------------------------------------------------------------------ training

    def forward_training(self, images, features, predictions, gt_instances):
        logits, deltas, quality = (cat(x, dim=1) for x in self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1]))
        quality = quality.squeeze(-1)
        grid, centers, strides, anchors = self.points(features)
        boxes = decode_boxes(deltas, grid, strides)  # (N, R, 4)
        gt_labels, gt_boxes = self.label_points(gt_instances, centers, strides, anchors,
                                                boxes, logits, quality)
        return self.losses(logits, deltas, quality, boxes, grid, strides, gt_labels, gt_boxes)

    @torch.no_grad()
    def label_points(self, gt_instances: List[Instances], centers: Tensor, strides: Tensor,
                     anchors: List[Tensor], boxes: Tensor, logits: Tensor, quality: Tensor):
        """Per image, labels [R] in {0..C-1, C background} and matched boxes [R, 4] (zeros
        for background) from the assigner; SimOTA reads the detached predictions."""
        gt_labels, gt_boxes = [], []
        for img, inst in enumerate(gt_instances):
            if self.assigner == "ATSS":
                idx = atss_match(inst.gt_boxes.tensor, anchors, self.atss_topk)
            else:
                scores = (logits[img].float().sigmoid()
                          * quality[img, :, None].float().sigmoid()).sqrt()
                idx = simota_match(inst.gt_boxes.tensor, inst.gt_classes, centers, strides,
                                   boxes[img].float(), scores, self.center_radius,
                                   self.candidate_topk, self.iou_cost_weight)
            fg = idx >= 0
            if len(inst) > 0:
                safe = idx.clamp(min=0)
                gt_labels.append(torch.where(fg, inst.gt_classes[safe], self.num_classes))
                gt_boxes.append(inst.gt_boxes.tensor[safe] * fg[:, None])
            else:
                gt_labels.append(torch.full_like(idx, self.num_classes))
                gt_boxes.append(torch.zeros((idx.shape[0], 4), device=idx.device))
        return gt_labels, gt_boxes

    def losses(self, logits, deltas, quality, boxes, grid, strides, gt_labels, gt_boxes):
        """
        Args:
            logits, deltas, quality: (N, R, C), (N, R, 4), (N, R), every level.
            boxes: (N, R, 4) decoded from ``deltas``; grid [R, 2], strides [R].
            gt_labels, gt_boxes: output of :meth:`label_points`.

        Returns:
            dict with ``loss_cls``, ``loss_box``, ``loss_obj`` or ``loss_iou``, and
            ``loss_l1`` while :attr:`use_l1_loss`.
        """
        labels, pos_mask, normalizer = positives_and_normalizer(gt_labels, self.num_classes)
        pred_boxes = boxes[pos_mask]
        target_boxes = torch.stack(gt_boxes)[pos_mask]
        iou = matched_pairwise_iou(Boxes(pred_boxes), Boxes(target_boxes))
        iou_target = iou.detach()

        if self.quality == "objectness":
            # YOLOX: classes are learnt on the positives; the objectness learns the background
            loss_cls = self.cls_loss(logits[pos_mask][None], labels[pos_mask][None],
                                     pos_mask[pos_mask][None], normalizer,
                                     positive_iou=lambda: iou_target)
            loss_quality = F.binary_cross_entropy_with_logits(
                quality, pos_mask.to(quality.dtype), reduction="sum")
            quality_name = "loss_obj"
        else:
            loss_cls = self.cls_loss(logits, labels, pos_mask, normalizer,
                                     positive_iou=lambda: iou_target)
            loss_quality = F.binary_cross_entropy_with_logits(
                quality[pos_mask], iou_target, reduction="sum")
            quality_name = "loss_iou"
        losses = {
            "loss_cls": loss_cls,
            "loss_box": (1 - iou ** 2).sum() * (self.box_loss_weight / normalizer),
            quality_name: loss_quality * (self.quality_loss_weight / normalizer),
        }
        if self.use_l1_loss:
            point = pos_mask.nonzero()[:, 1]
            target = l1_targets(target_boxes, grid[point], strides[point])
            losses["loss_l1"] = F.l1_loss(deltas[pos_mask], target, reduction="sum") / normalizer
        return losses

    # ------------------------------------------------------------------ inference

    def forward_inference(self, images: ImageList, features: List[Tensor],
                          predictions: List[List[Tensor]]):
        logits, deltas, quality = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1])
        grid, _, strides, _ = self.points(features)
        sizes = [x.shape[1] for x in logits]
        grids, level_strides = grid.split(sizes), strides.split(sizes)
        results = []
        for img, image_size in enumerate(images.image_sizes):
            per_level = []
            for lv in range(len(logits)):
                prob = logits[lv][img].sigmoid() * quality[lv][img].sigmoid()
                scores = prob.sqrt() if self.quality == "iou" else prob
                per_level.append(self._decode_level(scores, deltas[lv][img], grids[lv],
                                                    level_strides[lv], image_size))
            pred = Instances.cat(per_level)
            keep = batched_nms(pred.pred_boxes.tensor, pred.scores, pred.pred_classes,
                               self.test_nms_thresh)
            results.append(pred[keep[: self.max_detections_per_image]])
        return results

    def _decode_level(self, scores: Tensor, deltas: Tensor, grid: Tensor, strides: Tensor,
                      image_size) -> Instances:
        """The ``test_topk_candidates`` best (point, class) pairs of one level above the
        score threshold, decoded (top-k first, as :class:`TopKFirstDecoding`)."""
        flat = scores.flatten()
        top, idx = flat.topk(min(int(self.test_topk_candidates), flat.numel()))
        keep = top > self.test_score_thresh
        top, idx = top[keep], idx[keep]
        point = torch.div(idx, self.num_classes, rounding_mode="floor")
        boxes = decode_boxes(deltas[point], grid[point], strides[point])
        return Instances(image_size, pred_boxes=Boxes(boxes), scores=top,
                         pred_classes=idx % self.num_classes)
