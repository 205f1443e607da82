"""What eql_d2's dense detectors (ATSS, EFLRetinaNet, EFLFCOS) share: the classification
loss named by ``MODEL.CLS_LOSS.NAME`` with its IoU quality targets, the positives and the
loss normalizer, the check of the head's input features, and top-k-first decoding."""

from typing import Callable, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from torch import nn

from ...utils.comm import all_reduce_
from ..cls_losses import build_cls_loss, head_classification_loss
from ..regime import RegimeIndicators
from ..stats_logging import put_scalar_periodically

__all__ = ["DenseClassificationLoss", "TopKFirstDecoding", "box_quality", "decode_positives",
           "positives_and_normalizer", "head_feature_shapes"]


def head_feature_shapes(key: str, in_features: Sequence[str], backbone, backbone_name: str):
    """The backbone's ShapeSpecs of the head's `in_features` (config key `key`, e.g.
    ``"MODEL.ATSS.IN_FEATURES"``); ValueError naming the key and the features the backbone
    gives when one is missing."""
    shapes = backbone.output_shape()
    missing = [f for f in in_features if f not in shapes]
    if missing:
        raise ValueError(f"{key} names {missing}, which the backbone {backbone_name} does not "
                         f"produce (it gives {sorted(shapes)})")
    return [shapes[f] for f in in_features]


class DenseClassificationLoss(nn.Module):
    """The classification loss of a dense detector, over all pyramid levels at once.

    ``criterion`` is the entry of :data:`~eql_d2.modeling.cls_losses.CLS_LOSS_REGISTRY` named
    by ``MODEL.CLS_LOSS.NAME`` that accepts dense heads: Focal, EFL (eq. 4 of Li et al.,
    CVPR 2022), QFL, EQFL (eq. 5), SigmoidCE, or one registered elsewhere. When it takes
    ``quality``, the positives' IoU targets are built here for every detector.

    The detector must call it once per iteration with every level and image concatenated:
    each training call of a loss with statistics (EFL, EQFL) is one update of them (buffers
    ``criterion.pos_grad`` / ``criterion.neg_grad``, saved in checkpoints), whose rare /
    common / frequent means (``efl/gradient_ratio/*``, ``efl/focusing_factor/*``) go to the
    EventStorage every ``log_period`` iterations when the training set's
    ``class_frequency`` is known.
    """

    @configurable
    def __init__(self, *, criterion: nn.Module, class_frequency: Optional[Sequence[str]] = None,
                 log_period: int = 20, regime_indicators: bool = False):
        """
        Args:
            criterion: a registered loss accepting dense heads.
            class_frequency: C LVIS groups for logging, or None (no group logging).
            log_period: ``MODEL.CLS_LOSS.LOG_PERIOD``.
            regime_indicators: keep :class:`~eql_d2.modeling.regime.RegimeIndicators` of
                the loss's gradient in ``regime`` (``MODEL.CLS_LOSS.REGIME_INDICATORS``).
        """
        super().__init__()
        if "dense" not in getattr(criterion, "heads", ()):
            raise ValueError(f"{type(criterion).__name__} is not a classification loss for "
                             "dense heads")
        num_classes = criterion.num_classes
        if class_frequency is not None and len(class_frequency) != num_classes:
            raise ValueError(f"class_frequency of the training set has {len(class_frequency)} "
                             f"entries but the detector has {num_classes} classes")
        self.criterion = criterion
        self.num_classes = num_classes
        self.class_frequency = None if class_frequency is None else list(class_frequency)
        self.log_period = int(log_period)
        self.regime = RegimeIndicators(num_classes) if regime_indicators else None

    @classmethod
    def from_config(cls, cfg, num_classes):
        train = cfg.DATASETS.TRAIN
        return {
            "criterion": build_cls_loss(cfg, num_classes, "dense"),
            # the metadata only: a model built for inference has no groups and needs none
            "class_frequency": MetadataCatalog.get(train[0]).get("class_frequency")
            if train else None,
            "log_period": cfg.MODEL.CLS_LOSS.LOG_PERIOD,
            "regime_indicators": cfg.MODEL.CLS_LOSS.REGIME_INDICATORS,
        }

    @property
    def uses_quality(self) -> bool:
        """True for the losses whose positive target is the IoU of the predicted box."""
        return "quality" in self.criterion.inputs

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, pos_mask: torch.Tensor,
                avg_factor, positive_iou: Optional[Callable[[], torch.Tensor]] = None
                ) -> torch.Tensor:
        """
        Args:
            logits: (N, R, C), every level concatenated.
            labels: (N, R) in {-1 ignore, 0..C-1, C background}.
            pos_mask: (N, R) bool, the positives.
            avg_factor: what the sum over entries is divided by (the number of positives).
            positive_iou: returns the IoU [P] of each positive's decoded box with its
                ground truth, in ``pos_mask.nonzero()`` order; called only when the loss
                takes quality targets.

        Returns the 0-dim loss.
        """
        quality = None
        if self.uses_quality:
            if positive_iou is None:
                raise ValueError(f"{type(self.criterion).__name__} needs quality targets, and "
                                 "the detector gave no positive_iou")
            quality = torch.zeros(labels.shape, dtype=logits.dtype, device=logits.device)
            quality[pos_mask] = positive_iou().to(logits.dtype)
            quality = quality.flatten()
        return head_classification_loss(
            self.criterion, logits.flatten(0, 1), labels.flatten(), avg_factor,
            regime=self.regime, class_groups=self.class_frequency, log_period=self.log_period,
            quality=quality)


def positives_and_normalizer(gt_labels: List[torch.Tensor], num_classes: int):
    """Labels, positive mask and loss normalizer of a dense head's batch.

    gt_labels: N tensors [R] in {-1 ignore, 0..C-1, C background}. Returns (labels (N, R),
    pos_mask (N, R) bool, normalizer): the number of positive anchors averaged over workers,
    at least 1, so that DDP's mean of the workers' gradients is that of one process on the
    whole batch. Logs ``num_pos_anchors`` per image on logging iterations.
    """
    labels = torch.stack(gt_labels)
    pos_mask = (labels >= 0) & (labels != num_classes)
    num_pos = pos_mask.sum()
    put_scalar_periodically("num_pos_anchors", num_pos / len(gt_labels))
    normalizer = all_reduce_(num_pos.float().clone(), mean=True)
    return labels, pos_mask, normalizer.clamp(min=1.0)


def decode_positives(box2box_transform, anchors: List[Boxes], pred_deltas: List[torch.Tensor],
                     pos_mask: torch.Tensor, gt_boxes: List[torch.Tensor]):
    """Predicted and ground-truth boxes of the positive anchors.

    Args:
        box2box_transform: the detector's delta <-> box transform.
        anchors: list over levels of Boxes [R_l].
        pred_deltas: list over levels of (N, R_l, 4).
        pos_mask: bool (N, R), R = sum(R_l).
        gt_boxes: N tensors [R, 4], the matched ground truth of every anchor.

    Returns:
        (pred_boxes [P, 4], target_boxes [P, 4]) in XYXY, P = pos_mask.sum(), ordered as
        ``pos_mask.nonzero()``; pred_boxes carry the gradient of the deltas.
    """
    anchor_idx = pos_mask.nonzero()[:, 1]
    pred_boxes = box2box_transform.apply_deltas(
        torch.cat(pred_deltas, dim=1)[pos_mask], Boxes.cat(anchors).tensor[anchor_idx])
    return pred_boxes, torch.stack(gt_boxes)[pos_mask]


def box_quality(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """IoU of each predicted box [P, 4] with its own ground truth [P, 4] (XYXY), [P].

    The target of the IoU branch and of QFL / EQFL: detached, since a target must not pull
    the box regression.
    """
    return matched_pairwise_iou(Boxes(pred_boxes.detach()), Boxes(gt_boxes))


class TopKFirstDecoding:
    """Mixin for :class:`~detectron2.modeling.meta_arch.dense_detector.DenseDetector`
    subclasses: per-level decoding that takes the top-k scores first.

    detectron2 thresholds the [anchors, C] score map and then takes the top k. With the
    paper's threshold of 0 nearly every entry passes, and the index list of an LVIS level
    (about 10^7-10^8 entries with 1203 classes) costs gigabytes. Taking the top k first
    and thresholding those k gives the same detections (up to the order of tied scores).
    """

    def _decode_per_level_predictions(self, anchors: Boxes, pred_scores: torch.Tensor,
                                      pred_deltas: torch.Tensor, score_thresh: float,
                                      topk_candidates: int, image_size) -> Instances:
        num_classes = pred_scores.shape[1]
        flat = pred_scores.flatten()
        scores, idxs = flat.topk(min(int(topk_candidates), flat.numel()))
        keep = scores > score_thresh
        scores, idxs = scores[keep], idxs[keep]
        anchor_idxs = torch.div(idxs, num_classes, rounding_mode="floor")
        classes_idxs = idxs % num_classes
        pred_boxes = self.box2box_transform.apply_deltas(
            pred_deltas[anchor_idxs], anchors.tensor[anchor_idxs])
        return Instances(image_size, pred_boxes=Boxes(pred_boxes), scores=scores,
                         pred_classes=classes_idxs)
