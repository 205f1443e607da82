"""Fast R-CNN box predictor whose classification loss comes from the loss registry."""

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads.fast_rcnn import (FastRCNNOutputLayers,
                                                     _log_classification_stats)
from torch import nn

from ...data.image_labels import ImageLabels
from ..category_frequency import frequency_groups
from ..cls_losses import build_cls_loss, head_classification_loss
from ..regime import RegimeIndicators

__all__ = ["EQLFastRCNNOutputLayers", "exclude_entries", "check_box_head_keys"]

# An excluded logit is pinned this far below min(row max, 0). As a sigmoid negative its
# loss and gradient are then below exp(-50) ~ 2e-22, and in a softmax its share of the
# partition function is below that too: the entry is out of the loss for float32.
_EXCLUDED_MARGIN = 50.0


def exclude_entries(logits: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """Take entries out of a classification loss without changing the loss function.

    logits [N, K]; excluded [N, C] bool with C <= K (columns past C are never excluded).
    Excluded entries are replaced by a constant far below the row (see _EXCLUDED_MARGIN),
    so no gradient reaches them and they add nothing to a sigmoid or softmax loss.
    """
    if excluded.shape[1] < logits.shape[1]:
        pad = excluded.new_zeros(excluded.shape[0], logits.shape[1] - excluded.shape[1])
        excluded = torch.cat([excluded, pad], dim=1)
    floor = logits.detach().amax(dim=1, keepdim=True).clamp(max=0.0) - _EXCLUDED_MARGIN
    return torch.where(excluded, floor, logits)


def check_box_head_keys(cfg):
    """Reject detectron2's loss switches, which the EQL heads replace by MODEL.CLS_LOSS.NAME."""
    box = cfg.MODEL.ROI_BOX_HEAD
    if box.USE_FED_LOSS:
        raise ValueError("MODEL.ROI_BOX_HEAD.USE_FED_LOSS is not used by the EQL heads: set "
                         "MODEL.CLS_LOSS.NAME Federated (settings in MODEL.CLS_LOSS.FEDERATED)")
    if box.USE_SIGMOID_CE:
        raise ValueError("MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE is True, but with the EQL heads the "
                         "classification loss is chosen by MODEL.CLS_LOSS.NAME alone (sigmoid: "
                         "SigmoidCE)")


class EQLFastRCNNOutputLayers(FastRCNNOutputLayers):
    """detectron2's box predictor with the classification loss named by
    ``MODEL.CLS_LOSS.NAME``.

    The loss is any entry of :data:`~eql_d2.modeling.cls_losses.CLS_LOSS_REGISTRY` that
    accepts two-stage heads (SoftmaxCE, SigmoidCE, EQL, EQLv2, Seesaw, Federated, or one
    registered elsewhere); it is built into ``cls_loss`` and declares what this predictor
    does with it: the width C + ``extra_columns`` and layer of ``cls_score``, its initial bias
    (sigmoid-type losses start every category at ``MODEL.ROI_BOX_HEAD.PRIOR_PROB``), whether
    it reads the image-level verified mask, its inference probabilities, and the per-category
    statistics logged by r/c/f group every ``MODEL.CLS_LOSS.LOG_PERIOD`` iterations. The
    loss is a sum over the sampled proposals divided by their number (``avg_factor``).

    Proposals may carry ``image_labels``
    (:class:`~eql_d2.data.image_labels.ImageLabels`, set by the EQL ROI heads): losses that
    take ``verified`` get each proposal's image vector (EQL paper, section 4.2), and with
    ``ignore_not_exhaustive`` the image's not-exhaustive categories are taken out of the loss
    on background proposals, for every loss.

    Inference: the loss's probabilities [R, C], then detectron2's per-class NMS, score
    threshold and top-k. Built for inference, the predictor needs nothing from the training
    data: what a loss needs to predict is in the checkpoint (EQL's frequencies are a buffer
    of ``cls_loss``), and the r/c/f groups only label statistics logged while training.
    """

    @configurable
    def __init__(self, input_shape, *, cls_loss: nn.Module, prior_prob: float = 0.001,
                 class_groups=None, log_period: int = 20, background_fraction: float = 0.75,
                 use_verified: bool = True, ignore_not_exhaustive: bool = False,
                 regime_indicators: bool = False, **kwargs):
        """
        Args:
            input_shape, kwargs: as for ``FastRCNNOutputLayers`` (``use_sigmoid_ce`` and
                ``use_fed_loss`` are not used: the loss decides).
            cls_loss: a registered classification loss accepting two-stage heads.
            prior_prob: initial probability of each category for sigmoid-type losses.
            class_groups: [C] "r" / "c" / "f" of each category, for the logged statistics
                (None: not logged).
            log_period: log them every this many iterations.
            background_fraction: expected share of background proposals in a sampled
                batch (1 - ROI_HEADS.POSITIVE_FRACTION); EQLv2's objectness bias starts there.
            use_verified: give losses that take it the image-level verified mask
                (``MODEL.IMAGE_LABELS.VERIFIED``).
            ignore_not_exhaustive: background proposals are not negatives for their image's
                not-exhaustive categories (``MODEL.IMAGE_LABELS.IGNORE_NOT_EXHAUSTIVE``).
            regime_indicators: keep :class:`~eql_d2.modeling.regime.RegimeIndicators` of
                the loss's gradient in ``regime`` (``MODEL.CLS_LOSS.REGIME_INDICATORS``).
        """
        if "two_stage" not in getattr(cls_loss, "heads", ()):
            raise ValueError(f"{type(cls_loss).__name__} is not a classification loss for "
                             "two-stage heads")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"MODEL.ROI_BOX_HEAD.PRIOR_PROB must be in (0, 1), got {prior_prob}")
        if not 0.0 < background_fraction < 1.0:
            raise ValueError("MODEL.ROI_HEADS.POSITIVE_FRACTION must be in (0, 1), got "
                             f"{1.0 - background_fraction}")
        kwargs["use_sigmoid_ce"] = False
        kwargs["use_fed_loss"] = False
        super().__init__(input_shape, **kwargs)
        c = self.num_classes
        if cls_loss.num_classes != c:
            raise ValueError(f"{type(cls_loss).__name__} has {cls_loss.num_classes} classes, but "
                             f"MODEL.ROI_HEADS.NUM_CLASSES = {c}")
        self.cls_loss = cls_loss
        self.cls_score = cls_loss.classifier(self.cls_score.in_features,
                                             c + cls_loss.extra_columns)
        cls_loss.init_bias(self.cls_score.bias, prior_prob, background_fraction)
        self.log_period = int(log_period)
        self.use_verified = bool(use_verified) and "verified" in cls_loss.inputs
        self.ignore_not_exhaustive = bool(ignore_not_exhaustive)
        self.regime = RegimeIndicators(c) if regime_indicators else None
        self.class_groups = list(class_groups) if class_groups is not None else None
        if self.class_groups is not None and len(self.class_groups) != c:
            raise ValueError(f"class_groups has {len(self.class_groups)} entries for {c} classes")

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        ret.update(
            cls_loss=build_cls_loss(cfg, num_classes, "two_stage"),
            prior_prob=cfg.MODEL.ROI_BOX_HEAD.PRIOR_PROB,
            log_period=cfg.MODEL.CLS_LOSS.LOG_PERIOD,
            background_fraction=1.0 - cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION,
            use_verified=cfg.MODEL.IMAGE_LABELS.VERIFIED,
            ignore_not_exhaustive=cfg.MODEL.IMAGE_LABELS.IGNORE_NOT_EXHAUSTIVE,
            regime_indicators=cfg.MODEL.CLS_LOSS.REGIME_INDICATORS,
        )
        # Only what the training sets' metadata already holds: building a model for
        # inference must not need (or read) the training JSON.
        if cfg.MODEL.CLS_LOSS.LOG_PERIOD > 0 and cfg.DATASETS.TRAIN:
            ret["class_groups"] = frequency_groups(cfg.DATASETS.TRAIN[0], num_classes,
                                                   required=False)
        return ret

    @property
    def frequencies_known(self) -> bool:
        """False only for a loss that needs category frequencies and has none yet (EQL built
        without training metadata, before a checkpoint with them is loaded)."""
        return self.cls_loss.known

    @property
    def needs_image_labels(self) -> bool:
        """Whether training reads the proposals' ``image_labels``."""
        return self.use_verified or self.ignore_not_exhaustive

    def classification_loss(self, logits, gt_classes, image_labels=None):
        """Classification loss of logits [N, C + extra] for labels [N] in 0..C (C = background):
        a sum over proposals divided by N.

        image_labels: :class:`~eql_d2.data.image_labels.ImageLabels` of the N proposals, or
        None (images without image-level labels: no verified mask, nothing ignored).
        """
        verified = ignored = None
        if image_labels is not None:
            if self.use_verified:
                verified = image_labels.verified_rows()
            if self.ignore_not_exhaustive:
                background = gt_classes == self.num_classes
                ignored = background[:, None] & image_labels.not_exhaustive_rows()
        masked = logits if ignored is None else exclude_entries(logits, ignored)
        return head_classification_loss(
            self.cls_loss, masked, gt_classes, max(len(gt_classes), 1), regime=self.regime,
            observed_logits=logits, class_groups=self.class_groups, log_period=self.log_period,
            verified=verified)

    def losses(self, predictions, proposals):
        """Same outputs as ``FastRCNNOutputLayers.losses``, with :meth:`classification_loss`."""
        scores, proposal_deltas = predictions
        if proposals:
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            # An image without annotations has no gt_boxes: all its proposals are background,
            # whose regression targets box_reg_loss never reads, so any boxes fill the slot.
            gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor
                            for p in proposals], dim=0)
        else:
            gt_classes = torch.empty(0, dtype=torch.int64, device=scores.device)
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=proposal_deltas.device)
        # The columns past C are a background class only for some losses, so a proposal
        # counts as background when no category is the most probable with p >= 0.5.
        probs = self.cls_loss.scores(scores.detach())
        _log_classification_stats(torch.cat([probs, 0.5 * probs.new_ones(len(probs), 1)], 1),
                                  gt_classes)
        image_labels = None
        if self.needs_image_labels and proposals:
            have = [p.has("image_labels") for p in proposals]
            if not all(have):
                raise RuntimeError(
                    "MODEL.IMAGE_LABELS.VERIFIED / IGNORE_NOT_EXHAUSTIVE need each training "
                    "image's LVIS image-level labels (the ground-truth field image_labels), "
                    "which eql_d2.data.ImageLabelDatasetMapper adds and eql_d2's Trainer uses "
                    "for these heads; map the data with it, or turn both keys off")
            image_labels = ImageLabels.cat([p.image_labels for p in proposals])
        losses = {
            "loss_cls": self.classification_loss(scores, gt_classes, image_labels),
            "loss_box_reg": self.box_reg_loss(proposal_boxes, gt_boxes, proposal_deltas,
                                              gt_classes),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def predict_probs(self, predictions, proposals):
        scores, _ = predictions
        probs = self.cls_loss.scores(scores)
        # fast_rcnn_inference expects [R, C+1] and drops the last column.
        probs = torch.cat([probs, 1.0 - probs.amax(dim=1, keepdim=True)], dim=1)
        return probs.split([len(p) for p in proposals], dim=0)
