"""FCOS whose classification loss is chosen by ``MODEL.CLS_LOSS.NAME``.

FCOS is Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection" (ICCV 2019),
here as detectron2 implements it (with center sampling, as the FCOS of the EFL paper's
Tab. 1 and 6). Li et al., "Equalized Focal Loss for Dense Long-Tailed Object Detection"
(CVPR 2022, Tab. 6) train it on LVIS v1 with focal loss and with EFL.
"""

import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from .dense_loss import (DenseClassificationLoss, TopKFirstDecoding, box_quality,
                         head_feature_shapes,
                         decode_positives, positives_and_normalizer)

__all__ = ["EFLFCOS"]


@META_ARCH_REGISTRY.register()
class EFLFCOS(TopKFirstDecoding, FCOS):
    """detectron2's FCOS with the classification loss of ``MODEL.CLS_LOSS`` (focal, EFL, QFL,
    EQFL or sigmoid CE; see :class:`DenseClassificationLoss`).

    From detectron2's :class:`~detectron2.modeling.meta_arch.fcos.FCOS`, unchanged: one
    anchor point per location (a square of side = stride), the assignment (centre sampling
    within ``center_sampling_radius`` x stride of the box centre, point inside the box,
    level scale ranges [0, 64], [64, 128], [128, 256], [256, 512], [512, inf) of the largest
    distance to the box edges at strides 8-128, the smallest box on ties), the head
    (:class:`FCOSHead`: RetinaNet's head with one anchor plus a centerness conv on the box
    branch), the box parameterization (distances to the four edges / stride) and inference.

    Training losses, each divided by the number of positive points averaged over workers
    (instead of detectron2's moving average of the local count: EFL's statistics then see
    the same scale on any number of workers):

    - ``loss_fcos_cls``: :class:`DenseClassificationLoss`, called once per iteration on
      all levels and images; for QFL / EQFL the soft target of a positive point is the IoU
      of its decoded box with its ground truth (0 for background);
    - ``loss_fcos_loc``: GIoU loss of the decoded boxes of positive points;
    - ``loss_fcos_ctr``: BCE of the centerness logit on positive points against
      sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) (l, t, r, b: distances from the
      point to the ground-truth box edges).

    Inference (detectron2's FCOS): the score of class j at a point is
    sqrt(sigmoid(z_j) * sigmoid(z_ctr)); per level the ``test_topk_candidates`` best
    (point, class) pairs above ``test_score_thresh`` are decoded, taking the top k first
    (:class:`TopKFirstDecoding`), then per-class NMS keeps ``max_detections_per_image``.
    """

    @configurable
    def __init__(self, *, cls_loss: nn.Module, input_format: str = "BGR", **kwargs):
        """
        Args:
            cls_loss: a :class:`DenseClassificationLoss` (or a module with its interface).
            input_format: channel order of the input images (for training visualization).
            kwargs: the arguments of detectron2's
                :class:`~detectron2.modeling.meta_arch.fcos.FCOS`.
        """
        super().__init__(**kwargs)
        self.cls_loss = cls_loss
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg):
        fcos = cfg.MODEL.FCOS
        backbone = build_backbone(cfg)
        in_features = list(fcos.IN_FEATURES)
        feature_shapes = head_feature_shapes("MODEL.FCOS.IN_FEATURES", in_features, backbone,
                                             cfg.MODEL.BACKBONE.NAME)
        if fcos.NUM_CONVS < 1:
            raise ValueError(f"MODEL.FCOS.NUM_CONVS must be >= 1, got {fcos.NUM_CONVS}")
        if not 0.0 < fcos.PRIOR_PROB < 1.0:
            raise ValueError(f"MODEL.FCOS.PRIOR_PROB must lie in (0, 1), got {fcos.PRIOR_PROB}")
        if fcos.CENTER_SAMPLING_RADIUS <= 0:
            raise ValueError("MODEL.FCOS.CENTER_SAMPLING_RADIUS must be > 0, got "
                             f"{fcos.CENTER_SAMPLING_RADIUS}")
        head = FCOSHead(
            input_shape=feature_shapes,
            conv_dims=[feature_shapes[0].channels] * fcos.NUM_CONVS,
            num_classes=fcos.NUM_CLASSES,
            norm=fcos.NORM,
            prior_prob=fcos.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": in_features,
            "num_classes": fcos.NUM_CLASSES,
            "cls_loss": DenseClassificationLoss(cfg, fcos.NUM_CLASSES),
            "center_sampling_radius": fcos.CENTER_SAMPLING_RADIUS,
            "test_score_thresh": fcos.SCORE_THRESH_TEST,
            "test_topk_candidates": fcos.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": fcos.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
        }

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes,
               pred_centerness):
        """
        Args:
            anchors: list over levels of Boxes [R_l] (the anchor points as squares).
            pred_logits, pred_anchor_deltas, pred_centerness: lists over levels of
                (N, R_l, C / 4 / 1).
            gt_labels, gt_boxes: output of :meth:`FCOS.label_anchors`: N tensors [R] in
                {0..C-1, C background} and N tensors [R, 4] (matched boxes, XYXY).

        Returns:
            dict with ``loss_fcos_cls``, ``loss_fcos_loc``, ``loss_fcos_ctr`` (see the
            class docstring).
        """
        gt_labels, pos_mask, normalizer = positives_and_normalizer(gt_labels, self.num_classes)

        pred_boxes, target_boxes = decode_positives(
            self.box2box_transform, anchors, pred_anchor_deltas, pos_mask, gt_boxes)

        loss_cls = self.cls_loss(cat(pred_logits, dim=1), gt_labels, pos_mask, normalizer,
                                 positive_iou=lambda: box_quality(pred_boxes, target_boxes))

        loss_loc = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="sum")

        # detectron2's targets; background points get NaN there, which the mask drops
        ctr_targets = self.compute_ctrness_targets(anchors, gt_boxes)[pos_mask]
        ctr_logits = cat(pred_centerness, dim=1).squeeze(2)[pos_mask]
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_logits, ctr_targets, reduction="sum")
        return {
            "loss_fcos_cls": loss_cls,
            "loss_fcos_loc": loss_loc / normalizer,
            "loss_fcos_ctr": loss_ctr / normalizer,
        }
