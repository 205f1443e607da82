"""The baselines the long-tail losses are compared with: softmax and sigmoid cross-entropy,
focal loss, quality focal loss."""

import torch

from ...losses import FocalLoss, QualityFocalLoss, SigmoidCELoss, SoftmaxCELoss
from .base import CLS_LOSS_REGISTRY, ClassificationLoss

__all__ = ["SoftmaxCE", "SigmoidCE", "Focal", "QFL"]


@CLS_LOSS_REGISTRY.register()
class SoftmaxCE(SoftmaxCELoss, ClassificationLoss):
    """Softmax cross-entropy over C + 1 columns (column C: background); two-stage heads."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def init_bias(self, bias, prior_prob, background_fraction):
        pass  # detectron2's softmax classifier starts at bias 0

    def head_loss(self, logits, labels, **unused):
        return self(logits, labels)

    def scores(self, logits):
        return torch.softmax(logits, dim=1)[:, : self.num_classes]


@CLS_LOSS_REGISTRY.register()
class SigmoidCE(SigmoidCELoss, ClassificationLoss):
    """Sigmoid cross-entropy, in both kinds of heads.

    Two-stage: mean over rows of the C class columns (column C unused, as with detectron2's
    ``USE_SIGMOID_CE``). Dense: the sum over non-ignored rows divided by the head's
    normalizer, i.e. the focal loss with gamma 0 and no alpha.
    """

    heads = ("two_stage", "dense")

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.dense = FocalLoss(gamma=0.0, alpha=None)

    def head_loss(self, logits, labels, *, normalizer=None, **unused):
        if normalizer is None:
            return self(logits[:, : self.num_classes], labels)
        return self.dense(logits, labels, normalizer)


@CLS_LOSS_REGISTRY.register()
class Focal(FocalLoss, ClassificationLoss):
    """Focal loss (gamma = ``MODEL.EFL.GAMMA_B``, alpha = ``MODEL.EFL.ALPHA``); dense heads."""

    heads = ("dense",)
    extra_columns = 0

    def __init__(self, num_classes: int, gamma: float = 2.0, alpha=0.25):
        super().__init__(gamma=gamma, alpha=alpha)
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, num_classes, train_datasets):
        return {"num_classes": num_classes, "gamma": cfg.MODEL.EFL.GAMMA_B,
                "alpha": cfg.MODEL.EFL.ALPHA}

    def head_loss(self, logits, labels, *, normalizer=None, **unused):
        return self(logits, labels, normalizer)


@CLS_LOSS_REGISTRY.register()
class QFL(QualityFocalLoss, ClassificationLoss):
    """Quality focal loss (beta = ``MODEL.EFL.GAMMA_B``); dense heads, IoU quality targets."""

    heads = ("dense",)
    extra_columns = 0
    uses_quality = True

    def __init__(self, num_classes: int, beta: float = 2.0):
        super().__init__(beta=beta)
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, num_classes, train_datasets):
        return {"num_classes": num_classes, "beta": cfg.MODEL.EFL.GAMMA_B}

    def head_loss(self, logits, labels, *, normalizer=None, quality=None, **unused):
        return self(logits, labels, quality, normalizer)
