"""Classification loss of eql_d2's dense detectors, named by ``MODEL.EFL.LOSS``, and shared
pieces of their heads."""

import logging
from typing import List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils import comm
from torch import nn

from ...config import get_eql_cfg
from ..cls_losses import build_cls_loss
from ..regime import RegimeIndicators
from ..stats_logging import logging_due, put_group_means, put_scalar_periodically

__all__ = ["DenseClassificationLoss", "TopKFirstDecoding", "box_quality", "decode_positives",
           "positives_and_normalizer"]

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

    ``criterion`` is the entry of :data:`~eql_d2.modeling.cls_losses.CLS_LOSS_REGISTRY` named
    by ``MODEL.EFL.LOSS`` that accepts dense heads: focal, efl (eq. 4 of Li et al., CVPR
    2022), qfl, eqfl (eq. 5), sigmoid_ce (the focal loss with gamma 0 and no alpha), or one
    registered elsewhere. It declares whether it takes the IoU quality of positives
    (:attr:`uses_quality`) and which per-category statistics it keeps.

    The detector must call it once per iteration with every level and image concatenated:
    each training call of a loss with statistics (EFL, EQFL) is one update of them (buffers
    ``criterion.pos_grad`` / ``criterion.neg_grad``, saved in checkpoints). After each such
    update the rare / common / frequent means of its statistics (EFL: ``efl/gradient_ratio/*``
    and ``efl/focusing_factor/*``) go to the EventStorage every ``period`` iterations, when
    the training set's ``class_frequency`` is known.
    """

    @configurable
    def __init__(self, *, num_classes: int, criterion: Optional[nn.Module] = None,
                 loss: str = "focal", gamma_b: float = 2.0, scale: float = 8.0,
                 alpha: Optional[float] = 0.25,
                 class_frequency: Optional[Sequence[str]] = None, period: int = 20,
                 regime_indicators: bool = True):
        """
        Args:
            num_classes: C, foreground categories.
            criterion: a registered loss accepting dense heads; when None, the one named
                ``loss`` is built with ``gamma_b``, ``scale``, ``alpha`` (``MODEL.EFL.*``).
            class_frequency: C LVIS groups for logging, or None (no group logging).
            period: ``MODEL.EFL.PERIOD``.
            regime_indicators: keep :class:`~eql_d2.modeling.regime.RegimeIndicators` of
                the loss's gradient in ``regime`` (``MODEL.REGIME_INDICATORS.ENABLED``).
        """
        super().__init__()
        if criterion is None:
            cfg = get_eql_cfg()
            cfg.MODEL.EFL.LOSS = loss
            cfg.MODEL.EFL.GAMMA_B, cfg.MODEL.EFL.SCALE, cfg.MODEL.EFL.ALPHA = gamma_b, scale, alpha
            criterion = build_cls_loss(cfg, "MODEL.EFL.LOSS", num_classes, "dense")
        if "dense" not in getattr(criterion, "heads", ()):
            raise ValueError(f"{type(criterion).__name__} is not a classification loss for "
                             "dense heads")
        if class_frequency is not None and len(class_frequency) != num_classes:
            raise ValueError(f"class_frequency of the training set has {len(class_frequency)} "
                             f"entries but the detector has {num_classes} classes")
        self.criterion = criterion
        self.num_classes = num_classes
        self.class_frequency = None if class_frequency is None else list(class_frequency)
        self.period = int(period)
        self.regime = RegimeIndicators(num_classes) if regime_indicators else None
        self._warned_no_groups = False

    @classmethod
    def from_config(cls, cfg, num_classes):
        return {
            "num_classes": num_classes,
            "criterion": build_cls_loss(cfg, "MODEL.EFL.LOSS", num_classes, "dense"),
            "class_frequency": _train_class_frequency(cfg),
            "period": cfg.MODEL.EFL.PERIOD,
            "regime_indicators": cfg.MODEL.REGIME_INDICATORS.ENABLED,
        }

    @property
    def loss_name(self) -> str:
        """The criterion's registry name."""
        return type(self.criterion).__name__

    @property
    def uses_quality(self) -> bool:
        """True for the losses whose positive target is the IoU of the predicted box."""
        return self.criterion.uses_quality

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, normalizer,
                quality: Optional[torch.Tensor] = None) -> torch.Tensor:
        """logits [N, C], labels [N] in {-1 ignore, 0..C-1, C background}, normalizer > 0,
        quality [N] (IoU targets of the foreground rows; required by qfl / eqfl).
        Returns the 0-dim loss: the sum over entries divided by ``normalizer``."""
        if self.uses_quality and quality is None:
            raise ValueError(f"MODEL.EFL.LOSS {self.loss_name} needs quality targets")
        if self.training:
            self.criterion.check_trainable()
        loss = self.criterion.head_loss(logits, labels, normalizer=normalizer,
                                        quality=quality if self.uses_quality else None)
        if self.regime is not None:
            self.regime.observe(loss, logits, labels)
        if self.criterion.statistics_name and self.training and torch.is_grad_enabled():
            self._log_statistics()
        return loss

    def _log_statistics(self):
        if self.class_frequency is None:
            # said once, when training starts: a model built for inference has no groups
            # and needs none
            if self.period > 0 and not self._warned_no_groups:
                self._warned_no_groups = True
                logger.warning("MODEL.EFL.LOSS %s: the training set has no class_frequency "
                               "metadata, so its statistics are not logged by group",
                               self.loss_name)
            return
        if not logging_due(self.period):
            return
        name = self.criterion.statistics_name
        for key, values in self.criterion.statistics().items():
            put_group_means(f"{name}/{key}", values, self.class_frequency, self.period)


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
    normalizer = num_pos.float()
    if comm.get_world_size() > 1:
        normalizer = normalizer.clone()
        torch.distributed.all_reduce(normalizer)
        normalizer = normalizer / comm.get_world_size()
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
