"""Class-balanced loss (Cui et al., CVPR 2019) for two-stage and dense heads, with per-class
counts from the training data."""

import logging

import torch
from detectron2.data import MetadataCatalog

from ...losses import ClassBalancedLoss, class_balanced_background_weight, class_balanced_weights
from ..category_frequency import category_frequencies
from .base import CLS_LOSS_REGISTRY, ClassificationLoss

__all__ = ["ClassBalanced", "category_image_counts", "data_or_checkpoint"]

logger = logging.getLogger(__name__)

# meta-architectures whose heads have no background column (C logits per anchor or point)
DENSE_ARCHITECTURES = ("ATSS", "EFLRetinaNet", "EFLFCOS", "PAA", "RetinaNet", "FCOS")


def category_image_counts(train_datasets, num_classes):
    """Training images of each category [C] float64, pooled over DATASETS.TRAIN, from the
    metadata :func:`~eql_d2.modeling.category_frequency.category_frequencies` reads (None
    where it is not loaded, as when a model is built for inference)."""
    freq = category_frequencies(train_datasets, num_classes, required=False)
    if freq is None:
        return None
    images = sum(int(MetadataCatalog.get(name).num_train_images) for name in train_datasets)
    # f_j = n_j / images in float32: exact integers again after rounding
    return torch.round(freq.double() * images)


def data_or_checkpoint(buffer, what):
    """A load_state_dict pre-hook for a loss buffer that comes from the training data when
    it was known at build time (``module.known``), else from the checkpoint: the data's
    values replace the checkpoint's (with a warning when they differ); unknown ones take a
    checkpoint entry of the buffer's shape."""

    def hook(module, state_dict, prefix, *args):
        key = prefix + buffer
        current, saved = getattr(module, buffer), state_dict.get(key)
        fits = isinstance(saved, torch.Tensor) and saved.shape == current.shape
        if module.known:
            if fits and not torch.equal(saved.to(current), current):
                logger.warning("%s: the checkpoint's %s differ from those of DATASETS.TRAIN; "
                               "training uses the data's", key, what)
            state_dict[key] = current.detach().clone()
        elif fits:
            module.known = True

    return hook


@CLS_LOSS_REGISTRY.register()
class ClassBalanced(ClassBalancedLoss, ClassificationLoss):
    """Class-balanced loss (``MODEL.CLS_LOSS.CLASS_BALANCED``): sigmoid form over the C class
    columns (two-stage heads, column C unused; dense heads; the image classifier),
    optionally with the focal factor, or softmax form over C + 1 columns (two-stage heads)
    or C columns (the image classifier, labels 0..C-1).

    The per-class counts n_j are the training images of each category (the metadata EQL's
    frequencies come from); the weights are a persistent buffer, so a model built for
    inference needs no training data, and one without data or checkpoint weights refuses to
    train.
    """

    heads = ("two_stage", "dense", "classification")
    training_data = "the per-class image counts (class_image_count)"
    config_node = "CLASS_BALANCED"
    settings = {
        "BETA": (0.999, "beta", "beta of the effective number (1 - beta^n) / (1 - beta) of a "
                                "category's n training images"),
        "FORM": ("sigmoid", "form", "sigmoid (two-stage heads: C class columns, column C "
                                    "unused; dense heads) or softmax (two-stage heads: C + 1 "
                                    "columns)"),
        "BACKGROUND_WEIGHT": (1.0, "background_weight", "weight of background samples"),
        "BACKGROUND_AS_CLASS": (False, "background_as_class",
                                "weigh background samples as a class of unlimited samples "
                                "(effective number 1 / (1 - beta), the classes' "
                                "normalisation) instead of BACKGROUND_WEIGHT"),
        "GAMMA": (0.0, "gamma", "sigmoid form: focal factor (1 - p_t)^gamma (0: "
                                "cross-entropy; the class-balanced focal loss)"),
    }

    def __init__(self, num_classes: int, counts=None, beta: float = 0.999,
                 form: str = "sigmoid", background_weight: float = 1.0, gamma: float = 0.0,
                 background_as_class: bool = False):
        self.known = counts is not None
        # without counts: placeholders, replaced by the checkpoint's weights
        weights = class_balanced_weights(counts, beta) if self.known else torch.ones(num_classes)
        if weights.numel() != num_classes:
            raise ValueError(f"counts have {weights.numel()} entries for {num_classes} classes")
        if background_as_class and background_weight != 1.0:
            raise ValueError(f"MODEL.CLS_LOSS.CLASS_BALANCED.BACKGROUND_WEIGHT = "
                             f"{background_weight} with BACKGROUND_AS_CLASS True: the "
                             "background's weight comes from the counts; set one of the two")
        if background_as_class and self.known:
            background_weight = class_balanced_background_weight(counts, beta)
        super().__init__(weights, form=form, background_weight=background_weight, gamma=gamma)
        self.beta = float(beta)
        self.register_load_state_dict_pre_hook(data_or_checkpoint("weights",
                                                                  "class-balanced weights"))
        if self.known:
            logger.info("ClassBalanced (%s): beta = %g, weights from %g (most images) to %g, "
                        "background %g", form, beta, float(self.weights.min()),
                        float(self.weights.max()), self.background_weight)

    @classmethod
    def from_config(cls, cfg, num_classes, train_datasets):
        ret = super().from_config(cfg, num_classes, train_datasets)
        if ret["form"] == "softmax" and cfg.MODEL.META_ARCHITECTURE in DENSE_ARCHITECTURES:
            raise ValueError(f"MODEL.CLS_LOSS.CLASS_BALANCED.FORM softmax needs a background "
                             f"column, which the dense heads of {cfg.MODEL.META_ARCHITECTURE} "
                             "do not have; set FORM sigmoid")
        return dict(ret, counts=category_image_counts(train_datasets, num_classes))

    def init_bias(self, bias, prior_prob, background_fraction):
        if self.form == "sigmoid":
            super().init_bias(bias, prior_prob, background_fraction)

    def head_loss(self, logits, labels, avg_factor):
        if self.form == "softmax":
            # C + 1 columns (two-stage: background last) or C (image classification)
            return self(logits, labels, avg_factor=avg_factor)
        return self(logits[:, : self.num_classes], labels, avg_factor=avg_factor)

    def scores(self, logits):
        if self.form == "softmax":
            return torch.softmax(logits, dim=1)[:, : self.num_classes]
        return torch.sigmoid(logits[:, : self.num_classes])
