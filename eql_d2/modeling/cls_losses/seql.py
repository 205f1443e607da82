"""Softmax equalization loss (Tan et al., CVPR 2020, eq. 9-11) for the image classifier."""

import logging

import torch

from ...losses import SoftmaxEQLLoss
from ..category_frequency import category_frequencies
from .base import CLS_LOSS_REGISTRY, ClassificationLoss

__all__ = ["SEQL"]

logger = logging.getLogger(__name__)


@CLS_LOSS_REGISTRY.register()
class SEQL(SoftmaxEQLLoss, ClassificationLoss):
    """SEQL (``MODEL.CLS_LOSS.SEQL.GAMMA``, ``LAMBDA``): softmax cross-entropy whose
    denominator drops each tail class (f_k < lambda) that is not the label with
    probability gamma, per image and class; image classifier only.

    The class frequencies f_k = n_k / N come from the training sets' metadata
    (``class_image_count``, ``num_train_images``). Inference never reads them (scores are
    the plain softmax), so a model built without training data has none and refuses to
    train.
    """

    heads = ("classification",)
    extra_columns = 0
    training_data = "the class frequencies (class_image_count, num_train_images)"
    prepare_call = "eql_d2.data.classification.prepare_classification_datasets(cfg)"

    def __init__(self, num_classes: int, freq=None, lambda_: float = 3.0e-3,
                 gamma: float = 0.95, train_datasets=()):
        super().__init__(torch.zeros(num_classes) if freq is None else freq, lambda_, gamma)
        if self.num_classes != num_classes:
            raise ValueError(f"class frequencies have {self.num_classes} entries, but the "
                             f"classifier has {num_classes} classes")
        self.train_datasets = tuple(train_datasets)
        self.known = freq is not None
        if self.known:
            logger.info("SEQL: lambda = %g, gamma = %g; %d of %d classes are tail classes "
                        "(f < lambda)", lambda_, gamma, self.tail.numel(), num_classes)

    config_node = "SEQL"
    # CIFAR-100-LT's values (Tab. 7-8); ImageNet-LT's: LAMBDA 4.3e-4, GAMMA 0.9 (Tab. 9-10)
    settings = {
        "LAMBDA": (3.0e-3, "lambda_", "frequency threshold lambda (eq. 11): classes with "
                                      "f_k < lambda are tail classes"),
        "GAMMA": (0.95, "gamma", "probability gamma that beta = 1 (eq. 11), i.e. that a tail "
                                 "class other than the label leaves an image's softmax "
                                 "denominator; 0: softmax cross-entropy"),
    }

    @classmethod
    def from_config(cls, cfg, num_classes, train_datasets):
        return dict(super().from_config(cfg, num_classes, train_datasets),
                    freq=category_frequencies(train_datasets, num_classes, required=False),
                    train_datasets=train_datasets)

    def init_bias(self, bias, prior_prob, background_fraction):
        pass  # a softmax classifier starts at bias 0

    def head_loss(self, logits, labels, avg_factor):
        return self(logits, labels, avg_factor=avg_factor)

    def scores(self, logits):
        return torch.softmax(logits, dim=1)
