"""The baselines the long-tail losses are compared with: softmax and sigmoid cross-entropy,
focal loss, quality focal loss."""

import torch

from ...losses import FocalLoss, QualityFocalLoss, SoftmaxCELoss
from .base import CLS_LOSS_REGISTRY, ClassificationLoss

__all__ = ["SoftmaxCE", "SigmoidCE", "Focal", "QFL"]


@CLS_LOSS_REGISTRY.register()
class SoftmaxCE(SoftmaxCELoss, ClassificationLoss):
    """Softmax cross-entropy: over C + 1 columns in two-stage heads (column C: background),
    over the C columns in the image classifier."""

    heads = ("two_stage", "classification")

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def init_bias(self, bias, prior_prob, background_fraction):
        pass  # detectron2's softmax classifier starts at bias 0

    def head_loss(self, logits, labels, avg_factor):
        return self(logits, labels, avg_factor=avg_factor)

    def scores(self, logits):
        return torch.softmax(logits, dim=1)[:, : self.num_classes]


@CLS_LOSS_REGISTRY.register()
class SigmoidCE(FocalLoss, ClassificationLoss):
    """Sigmoid cross-entropy over the C class columns, in both kinds of heads.

    Two-stage heads: the background label C is a negative for every category (column C
    unused, as with detectron2's ``USE_SIGMOID_CE``); dense heads: rows labelled -1 are
    ignored. It is the focal loss with gamma 0 and no alpha, a sum divided by ``avg_factor``.
    """

    heads = ("two_stage", "dense")

    def __init__(self, num_classes: int):
        super().__init__(gamma=0.0, alpha=None)
        self.num_classes = num_classes

    def head_loss(self, logits, labels, avg_factor):
        return self(logits[:, : self.num_classes], labels, avg_factor=avg_factor)


@CLS_LOSS_REGISTRY.register()
class Focal(FocalLoss, ClassificationLoss):
    """Sigmoid focal loss (``MODEL.CLS_LOSS.FOCAL.GAMMA``, ``ALPHA``); dense heads, the
    image classifier (labels 0..C-1: one positive column per image, as Cui et al. (CVPR
    2019) train it on CIFAR-LT) and two-stage heads, whose classifier then has exactly the C
    class columns (background: a negative of every category, EQL Tab. 5's focal row) and
    whose sum is divided by the sampled proposals rather than the positives."""

    heads = ("two_stage", "dense", "classification")
    extra_columns = 0

    def __init__(self, num_classes: int, gamma: float = 2.0, alpha=0.25):
        super().__init__(gamma=gamma, alpha=alpha)
        self.num_classes = num_classes

    config_node = "FOCAL"
    settings = {"GAMMA": (2.0, "gamma", "focusing parameter gamma of (1 - p_t)^gamma"),
                "ALPHA": (0.25, "alpha", "alpha_t balance of positives and negatives")}

    def head_loss(self, logits, labels, avg_factor):
        return self(logits, labels, avg_factor=avg_factor)


@CLS_LOSS_REGISTRY.register()
class QFL(QualityFocalLoss, ClassificationLoss):
    """Quality focal loss (``MODEL.CLS_LOSS.QFL.BETA``); dense heads, IoU quality targets."""

    heads = ("dense",)
    extra_columns = 0
    inputs = ("quality",)

    def __init__(self, num_classes: int, beta: float = 2.0):
        super().__init__(beta=beta)
        self.num_classes = num_classes

    config_node = "QFL"
    settings = {"BETA": (2.0, "beta", "exponent beta of the modulating factor |y - sigma|^beta")}

    def head_loss(self, logits, labels, avg_factor, quality):
        return self(logits, labels, quality, avg_factor=avg_factor)
