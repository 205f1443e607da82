"""Equalization losses (Tan et al., CVPR 2020 and CVPR 2021) for two-stage heads."""

import logging
import math

import torch
from torch import nn

from ...losses import EQLLoss, EQLv2Loss
from ...losses._checks import check_logits
from ..category_frequency import category_frequencies
from .base import CLS_LOSS_REGISTRY, ClassificationLoss

__all__ = ["EQL", "EQLv2"]

logger = logging.getLogger(__name__)


@CLS_LOSS_REGISTRY.register()
class EQL(EQLLoss, ClassificationLoss):
    """EQL, eq. 6-8 (``MODEL.CLS_LOSS.EQL.LAMBDA``, ``EXCLUDING_FUNCTION``), with the
    image-level verified mask.

    The category frequencies come from the training sets' metadata when it is loaded
    (training), else from the checkpoint (``freq`` is a persistent buffer): built for
    inference, the loss needs no training data, and it refuses to train if no frequencies
    arrived. A checkpoint saved before frequencies were stored loads with a warning and
    keeps the data's.
    """

    inputs = ("verified",)
    training_data = "the category frequencies (class_image_count, num_train_images)"

    def __init__(self, num_classes: int, freq=None, lambda_: float = 1.76e-3,
                 train_datasets=(), use_excluding_function: bool = True):
        super().__init__(torch.zeros(num_classes) if freq is None else freq, lambda_,
                         use_excluding_function=use_excluding_function)
        if not use_excluding_function:
            logger.info("EQL: no excluding function E(r): background proposals send no "
                        "negative gradient to tail categories either")
        self.train_datasets = tuple(train_datasets)
        self.known = freq is not None
        if freq is None:
            # NaN marks "unknown" in the buffer too, so a checkpoint saved from this model
            # is not mistaken for one that holds frequencies
            self.freq.fill_(float("nan"))
            logger.info("EQL: lambda = %g; the category frequencies of DATASETS.TRAIN %s are "
                        "not in their metadata: they come from the checkpoint", lambda_,
                        list(self.train_datasets))
        else:
            if self.num_classes != num_classes:
                raise ValueError(f"class_freq has {self.num_classes} entries, but the head has "
                                 f"{num_classes} classes")
            logger.info("EQL: lambda = %g; %d of %d categories are tail categories (f < lambda); "
                        "tail ratio TR(lambda) = %.2f%%", lambda_, int(self.threshold().sum()),
                        num_classes, 100.0 * self.tail_ratio())
        self.register_load_state_dict_pre_hook(_frequencies_from_checkpoint)

    config_node = "EQL"
    settings = {
        "LAMBDA": (1.76e-3, "lambda_", "frequency threshold lambda (eq. 7): categories with "
                                       "f_j < lambda are tail categories"),
        "EXCLUDING_FUNCTION": (True, "use_excluding_function",
                               "excluding function E(r) (eq. 7, Tab. 4); False: background "
                               "proposals skip tail categories too"),
    }

    @classmethod
    def from_config(cls, cfg, num_classes, train_datasets):
        # only what the metadata already holds: building for inference reads no JSON
        return dict(super().from_config(cfg, num_classes, train_datasets),
                    freq=category_frequencies(train_datasets, num_classes, required=False),
                    train_datasets=train_datasets)

    def head_loss(self, logits, labels, avg_factor, verified):
        return self(logits[:, : self.num_classes], labels, verified, avg_factor=avg_factor)


def _frequencies_from_checkpoint(module, state_dict, prefix, local_metadata, strict,
                                 missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook of :class:`EQL`: settle where ``freq`` comes from.

    - Built with the training data's frequencies: those stay (training derives them from the
      data). A checkpoint without them (saved before they were stored) or with other values
      gets a warning; its entry is replaced by the data's.
    - Built without them: a checkpoint's finite [C] values in [0, 1] are taken; otherwise the
      model still predicts (inference never reads them) and training will refuse.

    `state_dict` is load_state_dict's own copy, so editing it changes nothing of the caller's.
    """
    key = prefix + "freq"
    saved = state_dict.get(key)
    current = module.freq
    valid = (isinstance(saved, torch.Tensor) and saved.shape == current.shape
             and bool(torch.isfinite(saved).all()) and bool(((saved >= 0) & (saved <= 1)).all()))
    if module.known:
        if not valid:
            logger.warning("%s: the checkpoint has no EQL category frequencies (%s); keeping "
                           "those of DATASETS.TRAIN %s", key,
                           "a model saved without an EQL loss" if saved is None else
                           "its entry is not C finite values in [0, 1]",
                           list(module.train_datasets))
        elif not torch.equal(saved.to(current), current):
            logger.warning("%s: the checkpoint's EQL category frequencies differ from those of "
                           "DATASETS.TRAIN %s for %d of %d categories; training uses the data's",
                           key, list(module.train_datasets),
                           int((saved.to(current) != current).sum()), current.numel())
        state_dict[key] = current.detach().clone()
    elif valid:
        module.known = True
    else:
        logger.warning("%s: neither the checkpoint nor DATASETS.TRAIN %s's metadata give EQL's "
                       "category frequencies; the model predicts as usual but cannot train",
                       key, list(module.train_datasets))
        if saved is not None:
            # an invalid entry (for instance the NaN of a model saved without frequencies)
            # must not overwrite the buffer's NaN with something that looks like data
            state_dict[key] = current.detach().clone()


@CLS_LOSS_REGISTRY.register()
class EQLv2(EQLv2Loss, ClassificationLoss):
    """EQLv2 (``MODEL.CLS_LOSS.EQLV2.GAMMA / MU / ALPHA``) with its objectness column (column
    C) and the image-level verified mask; statistics logged as ``eqlv2/*``."""

    inputs = ("verified",)
    statistics_name = "eqlv2"

    def __init__(self, num_classes: int, gamma: float = 12.0, mu: float = 0.8,
                 alpha: float = 4.0, objectness_prior: float = 0.0, test_objectness: bool = True):
        super().__init__(num_classes, gamma, mu, alpha)
        if not 0.0 <= objectness_prior < 1.0:
            raise ValueError("MODEL.CLS_LOSS.EQLV2.OBJECTNESS_PRIOR must be in [0, 1), got "
                             f"{objectness_prior}")
        self.objectness_prior = float(objectness_prior)
        self.test_objectness = bool(test_objectness)
        logger.info("EQLv2: gamma = %g, mu = %g, alpha = %g, %d categories", gamma, mu, alpha,
                    num_classes)

    config_node = "EQLV2"
    settings = {
        "GAMMA": (12.0, "gamma", "steepness gamma of the gradient-ratio -> negative-weight map"),
        "MU": (0.8, "mu", "centre mu of that mapping"),
        "ALPHA": (4.0, "alpha", "positive up-weighting alpha"),
        "OBJECTNESS_PRIOR": (0.0, "objectness_prior",
                             "initial probability of the objectness (background) column; 0: "
                             "the expected share of background proposals, 1 - "
                             "ROI_HEADS.POSITIVE_FRACTION (the authors' code: the class prior)"),
        "TEST_OBJECTNESS": (True, "test_objectness",
                            "detection scores sigmoid(z_j) (1 - sigmoid(z_C)), as the authors; "
                            "False: sigmoid(z_j) alone (to see what the objectness factor does)"),
    }

    def scores(self, logits):
        if self.test_objectness:
            return super().scores(logits)
        check_logits(logits, self.num_classes + 1, "C+1")
        return torch.sigmoid(logits[:, :-1])

    def init_bias(self, bias, prior_prob, background_fraction):
        super().init_bias(bias, prior_prob, background_fraction)
        # The objectness target is 1 on background proposals, which make up about
        # background_fraction of a sampled batch; start the column there, unless a prior is set.
        p = self.objectness_prior or background_fraction
        nn.init.constant_(bias[self.num_classes:], math.log(p / (1.0 - p)))

    def head_loss(self, logits, labels, avg_factor, verified):
        return self(logits, labels, verified, avg_factor=avg_factor)

    def statistics(self):
        return {"gradient_ratio": self.gradient_ratio, "negative_weight": self.negative_weight}
