"""RetinaNet whose classification loss is chosen by ``MODEL.CLS_LOSS.NAME``."""

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.modeling.meta_arch import RetinaNet
from torch import nn

from ..stats_logging import put_scalar_periodically
from .dense_loss import (DenseClassificationLoss, TopKFirstDecoding, box_quality,
                         decode_positives)

__all__ = ["EFLRetinaNet"]


@META_ARCH_REGISTRY.register()
class EFLRetinaNet(TopKFirstDecoding, RetinaNet):
    """detectron2's RetinaNet with the classification loss of ``MODEL.CLS_LOSS`` (focal, EFL,
    QFL, EQFL or sigmoid CE; see :class:`DenseClassificationLoss`).

    Everything else (anchors, IoU matcher, box loss, the EMA loss normalizer, inference) is
    detectron2's RetinaNet. With ``MODEL.CLS_LOSS.NAME Focal`` it computes detectron2's loss
    (up to float rounding). For QFL / EQFL the soft target of a positive anchor is the IoU of
    its decoded box with its ground truth.
    """

    @configurable
    def __init__(self, *, cls_loss: nn.Module, **kwargs):
        """
        Args:
            cls_loss: a :class:`DenseClassificationLoss` (or a module with its interface).
            kwargs: the arguments of :class:`~detectron2.modeling.meta_arch.RetinaNet`.
        """
        super().__init__(**kwargs)
        self.cls_loss = cls_loss

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        # focal's gamma and alpha have one home, MODEL.CLS_LOSS.FOCAL; refuse a RETINANET
        # value that would be silently ignored.
        focal = cfg.MODEL.CLS_LOSS.FOCAL
        for key, focal_key in (("FOCAL_LOSS_GAMMA", "GAMMA"), ("FOCAL_LOSS_ALPHA", "ALPHA")):
            if cfg.MODEL.RETINANET[key] != focal[focal_key]:
                raise ValueError(
                    f"EFLRetinaNet takes its loss parameters from MODEL.CLS_LOSS: "
                    f"MODEL.RETINANET.{key} = {cfg.MODEL.RETINANET[key]} differs from "
                    f"MODEL.CLS_LOSS.FOCAL.{focal_key} = {focal[focal_key]}; set "
                    f"MODEL.CLS_LOSS.FOCAL.{focal_key}")
        ret["cls_loss"] = DenseClassificationLoss(cfg, cfg.MODEL.RETINANET.NUM_CLASSES)
        return ret

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """As :meth:`RetinaNet.losses`, with ``loss_cls`` from :attr:`cls_loss`."""
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum()
        put_scalar_periodically("num_pos_anchors", num_pos_anchors / num_images)
        # detectron2's EMA of max(num_pos_anchors, 1), kept on the device (in float64, as
        # detectron2's Python floats) so that no iteration waits to read the count
        normalizer = self._ema_update("loss_normalizer", num_pos_anchors.clamp(min=1).double(),
                                      100).float()

        def positive_iou():
            return box_quality(*decode_positives(self.box2box_transform, anchors,
                                                 pred_anchor_deltas, pos_mask, gt_boxes))

        loss_cls = self.cls_loss(cat(pred_logits, dim=1), gt_labels, pos_mask, normalizer,
                                 positive_iou=positive_iou)

        loss_box_reg = _dense_box_regression_loss(
            anchors,
            self.box2box_transform,
            pred_anchor_deltas,
            gt_boxes,
            pos_mask,
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg / normalizer}
