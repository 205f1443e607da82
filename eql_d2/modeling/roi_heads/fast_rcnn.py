"""Fast R-CNN box predictor whose classification loss is softmax CE, sigmoid CE, EQL or EQLv2."""

import logging
import math

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads.fast_rcnn import (FastRCNNOutputLayers,
                                                     _log_classification_stats)
from torch import nn

from ...losses import EQLLoss, EQLv2Loss, SigmoidCELoss, SoftmaxCELoss
from ..stats_logging import logging_due, put_group_means
from .category_frequency import category_frequencies, frequency_groups

__all__ = ["EQLFastRCNNOutputLayers", "exclude_entries", "LOSSES"]

logger = logging.getLogger(__name__)

LOSSES = ("softmax", "sigmoid", "eql", "eqlv2")

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


class EQLFastRCNNOutputLayers(FastRCNNOutputLayers):
    """detectron2's box predictor with the classification loss chosen by ``MODEL.EQL.LOSS``.

    ``cls_score`` keeps detectron2's C + 1 outputs. Column C is the background class for
    "softmax", the objectness (background) logit of EQLv2 for "eqlv2", and unused for
    "sigmoid" and "eql" (as with detectron2's ``USE_SIGMOID_CE``). Sigmoid-type classifiers
    start every category at probability ``prior_prob``.

    Per-proposal fields read by :meth:`losses` when present (set by
    :class:`~eql_d2.modeling.roi_heads.EQLROIHeads`):

    - ``gt_verified`` [R, C] bool: category in the image's positive or verified-negative
      set; EQL / EQLv2 keep weight 1 there (EQL paper, section 4.2);
    - ``gt_ignored`` [R, C] bool: entries taken out of the loss (background proposals and
      the image's not-exhaustive categories).

    Inference: softmax or sigmoid probabilities, or for EQLv2 sigmoid(z_j) (1 -
    sigmoid(z_obj)); then detectron2's per-class NMS, score threshold and top-k.

    Built for inference, the predictor needs nothing from the training data: EQL's category
    frequencies are a buffer of the checkpoint (``cls_loss.freq``), and the r/c/f groups only
    label statistics logged while training. A predictor built without frequencies (its
    training sets' metadata not loaded) takes them from the checkpoint it loads, and refuses
    to train if none arrived. Loading a checkpoint saved before the frequencies were stored
    keeps the training data's, with a warning.
    """

    @configurable
    def __init__(self, input_shape, *, loss: str = "softmax", class_freq=None,
                 lambda_: float = 1.76e-3, prior_prob: float = 0.001,
                 eqlv2_gamma: float = 12.0, eqlv2_mu: float = 0.8, eqlv2_alpha: float = 4.0,
                 class_groups=None, log_period: int = 20, background_fraction: float = 0.75,
                 train_datasets=(), **kwargs):
        """
        Args:
            input_shape, kwargs: as for ``FastRCNNOutputLayers`` (``use_sigmoid_ce`` is set
                from ``loss``; ``use_fed_loss`` only with ``loss="sigmoid"``).
            loss: "softmax", "sigmoid", "eql" or "eqlv2".
            class_freq: [C] image-level frequency of each category, for "eql". None: not
                known yet; the checkpoint loaded next must hold them before training.
            lambda_: EQL threshold lambda.
            prior_prob: initial probability of each category for sigmoid-type losses.
            eqlv2_gamma, eqlv2_mu, eqlv2_alpha: EQLv2 hyper-parameters.
            class_groups: [C] "r" / "c" / "f" of each category, for EQLv2's logged
                gradient-ratio means (None: not logged).
            log_period: log those means every this many iterations.
            background_fraction: expected share of background proposals in a sampled
                batch (1 - ROI_HEADS.POSITIVE_FRACTION); EQLv2's objectness bias starts there.
            train_datasets: DATASETS.TRAIN, named in messages only.
        """
        if loss not in LOSSES:
            raise ValueError(f"MODEL.EQL.LOSS must be one of {', '.join(LOSSES)}; got {loss!r}")
        if kwargs.get("use_fed_loss") and loss != "sigmoid":
            raise ValueError("MODEL.ROI_BOX_HEAD.USE_FED_LOSS (detectron2's federated loss) "
                             f"is a sigmoid baseline: set MODEL.EQL.LOSS sigmoid, not {loss!r}")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"MODEL.EQL.PRIOR_PROB must be in (0, 1), got {prior_prob}")
        if not 0.0 < background_fraction < 1.0:
            raise ValueError("MODEL.ROI_HEADS.POSITIVE_FRACTION must be in (0, 1), got "
                             f"{1.0 - background_fraction}")
        kwargs["use_sigmoid_ce"] = loss != "softmax"
        super().__init__(input_shape, **kwargs)
        self.loss = loss
        self.log_period = int(log_period)
        self.train_datasets = tuple(train_datasets)
        self._warned_no_groups = False
        c = self.num_classes
        if loss != "softmax":
            bias = -math.log((1.0 - prior_prob) / prior_prob)
            nn.init.constant_(self.cls_score.bias[:c], bias)
        if loss == "eqlv2":
            # The objectness target is 1 on background proposals, which make up about
            # background_fraction of a sampled batch; start the column there.
            nn.init.constant_(self.cls_score.bias[c:],
                              math.log(background_fraction / (1.0 - background_fraction)))

        self.class_groups = list(class_groups) if class_groups is not None else None
        if self.class_groups is not None and len(self.class_groups) != c:
            raise ValueError(f"class_groups has {len(self.class_groups)} entries for {c} classes")
        if loss == "softmax":
            self.cls_loss = SoftmaxCELoss()
        elif loss == "sigmoid":
            self.cls_loss = SigmoidCELoss()
        elif loss == "eql":
            self._frequencies_known = class_freq is not None
            if class_freq is None:
                # NaN marks "unknown" in the buffer too, so a checkpoint saved from this
                # model is not mistaken for one that holds frequencies.
                self.cls_loss = EQLLoss(torch.zeros(c), lambda_)
                self.cls_loss.freq.fill_(float("nan"))
                logger.info("EQL: lambda = %g; the category frequencies of DATASETS.TRAIN %s are "
                            "not in their metadata: they come from the checkpoint",
                            lambda_, list(self.train_datasets))
            else:
                self.cls_loss = EQLLoss(class_freq, lambda_)
                if self.cls_loss.num_classes != c:
                    raise ValueError(f"class_freq has {self.cls_loss.num_classes} entries, but "
                                     f"MODEL.ROI_HEADS.NUM_CLASSES = {c}")
                tail = int(self.cls_loss.threshold().sum())
                logger.info("EQL: lambda = %g; %d of %d categories are tail categories "
                            "(f < lambda); tail ratio TR(lambda) = %.2f%%", lambda_, tail, c,
                            100.0 * self.cls_loss.tail_ratio())
            self.register_load_state_dict_pre_hook(_frequencies_from_checkpoint)
        else:
            self.cls_loss = EQLv2Loss(c, eqlv2_gamma, eqlv2_mu, eqlv2_alpha)
            logger.info("EQLv2: gamma = %g, mu = %g, alpha = %g, %d categories", eqlv2_gamma,
                        eqlv2_mu, eqlv2_alpha, c)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        e = cfg.MODEL.EQL
        loss = e.LOSS
        if cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE and loss != "sigmoid":
            raise ValueError(
                f"MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE is True but MODEL.EQL.LOSS is {loss!r}: with "
                "EQLROIHeads the classification loss is chosen by MODEL.EQL.LOSS alone")
        num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        ret.update(
            loss=loss,
            lambda_=e.LAMBDA,
            prior_prob=e.PRIOR_PROB,
            eqlv2_gamma=e.EQLV2.GAMMA,
            eqlv2_mu=e.EQLV2.MU,
            eqlv2_alpha=e.EQLV2.ALPHA,
            log_period=e.PERIOD,
            background_fraction=1.0 - cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION,
        )
        ret["train_datasets"] = tuple(cfg.DATASETS.TRAIN)
        # Only what the training sets' metadata already holds is used: building a model for
        # inference must not need (or read) the training JSON. prepare_datasets loads it
        # before a training run.
        if loss == "eql":
            ret["class_freq"] = category_frequencies(cfg.DATASETS.TRAIN, num_classes,
                                                     required=False)
        if loss == "eqlv2" and e.PERIOD > 0 and cfg.DATASETS.TRAIN:
            ret["class_groups"] = frequency_groups(cfg.DATASETS.TRAIN[0], num_classes,
                                                   required=False)
        return ret

    @property
    def frequencies_known(self) -> bool:
        """Whether EQL's category frequencies are set (from the training data or a
        checkpoint); always True for the other losses, which have none."""
        return self.loss != "eql" or self._frequencies_known

    def _check_before_training(self):
        if not self.frequencies_known:
            raise ValueError(
                "MODEL.EQL.LOSS eql cannot train this model: its category frequencies are "
                "unknown. They come from the metadata (class_image_count, num_train_images) of "
                f"DATASETS.TRAIN {list(self.train_datasets)}, which was not loaded when the "
                "model was built, and the loaded checkpoint (if any) had none. Call "
                "eql_d2.engine.prepare_datasets(cfg) before building the model "
                "(train_net.py does)")
        if (self.loss == "eqlv2" and self.class_groups is None and self.log_period > 0
                and not self._warned_no_groups):
            self._warned_no_groups = True
            logger.warning("MODEL.EQL.PERIOD = %d, but DATASETS.TRAIN %s has no class_frequency "
                           "(r/c/f) in its metadata: EQLv2 statistics are not logged by group",
                           self.log_period, list(self.train_datasets))

    @property
    def uses_verified(self) -> bool:
        """Whether the loss reads the image-level ``gt_verified`` mask (EQL and EQLv2)."""
        return self.loss in ("eql", "eqlv2")

    def classification_loss(self, logits, gt_classes, verified=None, ignored=None):
        """Classification loss of logits [N, C+1] for labels [N] in 0..C (C = background).

        verified [N, C] bool or None: see the class docstring; used by EQL and EQLv2.
        ignored [N, C] bool or None: entries taken out of the loss, for every loss.
        """
        if ignored is not None:
            logits = exclude_entries(logits, ignored)
        if self.loss == "softmax":
            return self.cls_loss(logits, gt_classes)
        if self.loss == "sigmoid":
            if self.use_fed_loss:
                return self.sigmoid_cross_entropy_loss(logits, gt_classes)
            return self.cls_loss(logits[:, :-1], gt_classes)
        if self.loss == "eql":
            return self.cls_loss(logits[:, :-1], gt_classes, verified)
        loss = self.cls_loss(logits, gt_classes, verified)
        if (self.class_groups is not None and self.training and torch.is_grad_enabled()
                and logging_due(self.log_period)):
            put_group_means("eqlv2/gradient_ratio", self.cls_loss.gradient_ratio,
                            self.class_groups, self.log_period)
            put_group_means("eqlv2/negative_weight", self.cls_loss.negative_weight,
                            self.class_groups, self.log_period)
        return loss

    def losses(self, predictions, proposals):
        """Same outputs as ``FastRCNNOutputLayers.losses``, with :meth:`classification_loss`."""
        self._check_before_training()
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
        if self.loss == "softmax":
            _log_classification_stats(scores, gt_classes)
        else:
            # Column C is not a background class here (unused, or EQLv2's objectness), so
            # a proposal counts as background when no category reaches probability 0.5.
            _log_classification_stats(torch.cat([scores[:, :-1].detach(),
                                                 scores.new_zeros(len(scores), 1)], 1),
                                      gt_classes)
        verified = self._cat_field(proposals, "gt_verified") if self.uses_verified else None
        ignored = self._cat_field(proposals, "gt_ignored")
        losses = {
            "loss_cls": self.classification_loss(scores, gt_classes, verified, ignored),
            "loss_box_reg": self.box_reg_loss(proposal_boxes, gt_boxes, proposal_deltas,
                                              gt_classes),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    @staticmethod
    def _cat_field(proposals, name):
        have = [p.has(name) for p in proposals]
        if not any(have):
            return None
        if not all(have):
            raise ValueError(f"some proposals have the field {name!r} and some do not")
        return cat([p.get(name) for p in proposals], dim=0)

    def predict_probs(self, predictions, proposals):
        if self.loss != "eqlv2":
            return super().predict_probs(predictions, proposals)
        scores, _ = predictions
        probs = self.cls_loss.scores(scores)
        # fast_rcnn_inference expects [R, C+1] and drops the last column.
        probs = torch.cat([probs, torch.sigmoid(scores[:, -1:])], dim=1)
        return probs.split([len(p) for p in proposals], dim=0)


def _frequencies_from_checkpoint(module, state_dict, prefix, local_metadata, strict,
                                 missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook of an "eql" predictor: settle where ``cls_loss.freq`` comes from.

    - The predictor was built with the training data's frequencies: those stay (training
      derives them from the data). A checkpoint without them (saved before they were
      stored) or with other values gets a warning; its entry is replaced by the data's.
    - Built without them: a checkpoint's finite [C] values in [0, 1] are taken; otherwise
      the model still predicts (inference never reads them) and training will refuse.

    `state_dict` is load_state_dict's own copy, so editing it changes nothing of the caller's.
    """
    key = prefix + "cls_loss.freq"
    saved = state_dict.get(key)
    current = module.cls_loss.freq
    valid = (isinstance(saved, torch.Tensor) and saved.shape == current.shape
             and bool(torch.isfinite(saved).all()) and bool(((saved >= 0) & (saved <= 1)).all()))
    if module._frequencies_known:
        if not valid:
            logger.warning("%s: the checkpoint has no EQL category frequencies (%s); keeping "
                           "those of DATASETS.TRAIN %s", key,
                           "saved before checkpoints held them" if saved is None else
                           "its entry is not C finite values in [0, 1]",
                           list(module.train_datasets))
        elif not torch.equal(saved.to(current), current):
            logger.warning("%s: the checkpoint's EQL category frequencies differ from those of "
                           "DATASETS.TRAIN %s for %d of %d categories; training uses the data's",
                           key, list(module.train_datasets),
                           int((saved.to(current) != current).sum()), current.numel())
        state_dict[key] = current.detach().clone()
    elif valid:
        module._frequencies_known = True
    else:
        logger.warning("%s: neither the checkpoint nor DATASETS.TRAIN %s's metadata give EQL's "
                       "category frequencies; the model predicts as usual but cannot train",
                       key, list(module.train_datasets))
        if saved is not None:
            # an invalid entry (for instance the NaN of a model saved without frequencies)
            # must not overwrite the buffer's NaN with something that looks like data
            state_dict[key] = current.detach().clone()
