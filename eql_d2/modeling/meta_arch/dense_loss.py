"""Classification loss of eql_d2's dense detectors, chosen by ``MODEL.EFL.LOSS``."""

import logging
from typing import List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from torch import nn

from ...losses import (EqualizedFocalLoss, EqualizedQualityFocalLoss, FocalLoss,
                       QualityFocalLoss)
from ..stats_logging import logging_due, put_group_means

__all__ = ["DenseClassificationLoss", "TopKFirstDecoding", "box_quality", "decode_positives"]

logger = logging.getLogger(__name__)


def _train_class_frequency(cfg):
    """LVIS groups ("r"/"c"/"f") of the first training set, or None when its metadata has
    none. Reads the MetadataCatalog only: a model built for inference, whose training set is
    neither loaded nor perhaps registered, gets None (the groups only label training logs)."""
    if not cfg.DATASETS.TRAIN:
        return None
    return MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("class_frequency")


class DenseClassificationLoss(nn.Module):
    """The sigmoid classification loss of a dense detector, over all pyramid levels at once.

    ``loss`` picks one of :attr:`LOSSES` from :mod:`eql_d2.losses`:

    - ``focal``: :class:`~eql_d2.losses.FocalLoss` (gamma = gamma_b, alpha);
    - ``efl``: :class:`~eql_d2.losses.EqualizedFocalLoss` (eq. 4 of Li et al., CVPR 2022);
    - ``qfl``: :class:`~eql_d2.losses.QualityFocalLoss` (beta = gamma_b);
    - ``eqfl``: :class:`~eql_d2.losses.EqualizedQualityFocalLoss` (eq. 5);
    - ``sigmoid_ce``: binary cross-entropy, i.e. the focal loss with gamma 0 and no alpha.
      It goes through :class:`~eql_d2.losses.FocalLoss` because that one takes the ignore
      label and the positive-count normalizer of dense detectors, which
      :class:`~eql_d2.losses.SigmoidCELoss` (mean over rows) does not.

    The detector must call it once per iteration with every level and image concatenated:
    each training call of ``efl`` / ``eqfl`` is one update of the gradient statistics
    (buffers ``criterion.pos_grad`` / ``criterion.neg_grad``, saved in checkpoints). After
    each such update the rare / common / frequent means of g^j (``efl/gradient_ratio/*``)
    and of gamma^j (``efl/focusing_factor/*``) go to the EventStorage every ``period``
    iterations, when the training set's ``class_frequency`` is known.
    """

    LOSSES = ("focal", "efl", "qfl", "eqfl", "sigmoid_ce")

    @configurable
    def __init__(self, *, loss: str = "focal", num_classes: int, gamma_b: float = 2.0,
                 scale: float = 8.0, alpha: Optional[float] = 0.25,
                 class_frequency: Optional[Sequence[str]] = None, period: int = 20):
        """
        Args:
            loss: one of :attr:`LOSSES` (``MODEL.EFL.LOSS``).
            num_classes: C, foreground categories.
            gamma_b, scale, alpha: ``MODEL.EFL.GAMMA_B``, ``SCALE``, ``ALPHA``.
            class_frequency: C LVIS groups for logging, or None (no group logging).
            period: ``MODEL.EFL.PERIOD``.
        """
        super().__init__()
        if loss not in self.LOSSES:
            raise ValueError(f"MODEL.EFL.LOSS must be one of {', '.join(self.LOSSES)}; "
                             f"got {loss!r}")
        if class_frequency is not None and len(class_frequency) != num_classes:
            raise ValueError(f"class_frequency of the training set has {len(class_frequency)} "
                             f"entries but the detector has {num_classes} classes")
        self.loss_name = loss
        self.num_classes = num_classes
        self.class_frequency = None if class_frequency is None else list(class_frequency)
        self.period = int(period)
        self._warned_no_groups = False
        if loss == "focal":
            self.criterion = FocalLoss(gamma=gamma_b, alpha=alpha)
        elif loss == "efl":
            self.criterion = EqualizedFocalLoss(num_classes, gamma_b=gamma_b, scale=scale,
                                                alpha=alpha)
        elif loss == "qfl":
            self.criterion = QualityFocalLoss(beta=gamma_b)
        elif loss == "eqfl":
            self.criterion = EqualizedQualityFocalLoss(num_classes, gamma_b=gamma_b,
                                                       scale=scale)
        else:
            self.criterion = FocalLoss(gamma=0.0, alpha=None)

    @classmethod
    def from_config(cls, cfg, num_classes):
        return {
            "loss": cfg.MODEL.EFL.LOSS,
            "num_classes": num_classes,
            "gamma_b": cfg.MODEL.EFL.GAMMA_B,
            "scale": cfg.MODEL.EFL.SCALE,
            "alpha": cfg.MODEL.EFL.ALPHA,
            "class_frequency": _train_class_frequency(cfg),
            "period": cfg.MODEL.EFL.PERIOD,
        }

    @property
    def uses_quality(self) -> bool:
        """True for the losses whose positive target is the IoU of the predicted box."""
        return self.loss_name in ("qfl", "eqfl")

    @property
    def equalized(self) -> bool:
        """True for the losses with gradient statistics (EFL, EQFL)."""
        return self.loss_name in ("efl", "eqfl")

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, normalizer,
                quality: Optional[torch.Tensor] = None) -> torch.Tensor:
        """logits [N, C], labels [N] in {-1 ignore, 0..C-1, C background}, normalizer > 0,
        quality [N] (IoU targets of the foreground rows; required by qfl / eqfl).
        Returns the 0-dim loss: the sum over entries divided by ``normalizer``."""
        if self.uses_quality:
            if quality is None:
                raise ValueError(f"MODEL.EFL.LOSS {self.loss_name} needs quality targets")
            loss = self.criterion(logits, labels, quality, normalizer)
        else:
            loss = self.criterion(logits, labels, normalizer)
        if self.equalized and self.training and torch.is_grad_enabled():
            self._log_statistics()
        return loss

    def _log_statistics(self):
        if self.class_frequency is None:
            # said once, when training starts: a model built for inference has no groups
            # and needs none
            if self.period > 0 and not self._warned_no_groups:
                self._warned_no_groups = True
                logger.warning("MODEL.EFL.LOSS %s: the training set has no class_frequency "
                               "metadata, so g^j / gamma^j are not logged by group",
                               self.loss_name)
            return
        if not logging_due(self.period):
            return
        put_group_means("efl/gradient_ratio", self.criterion.gradient_ratio,
                        self.class_frequency, self.period)
        put_group_means("efl/focusing_factor", self.criterion.focusing_factor,
                        self.class_frequency, self.period)


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
