"""Equalized focal losses (Li et al., CVPR 2022) for dense heads."""

from detectron2.config import CfgNode as CN

from ...losses import EqualizedFocalLoss, EqualizedQualityFocalLoss
from .base import CLS_LOSS_REGISTRY, ClassificationLoss

__all__ = ["EFL", "EQFL"]


def _equalized_focal_node(with_alpha: bool) -> CN:
    node = CN()
    # gamma_b, base focusing factor (eq. 3)
    node.GAMMA_B = 2.0
    # s of eq. 3, upper limit of the category-specific focusing term (0: the baseline loss)
    node.SCALE = 8.0
    # focusing factor (Tab. 3 "FF"); False: exponent gamma_b for every category
    node.FOCUSING_FACTOR = True
    # weighting factor (Tab. 3 "WF"); False: weight 1 instead of gamma^j / gamma_b
    node.WEIGHTING_FACTOR = True
    if with_alpha:
        # alpha_t balance of positives / negatives
        node.ALPHA = 0.25
    return node


class _EqualizedFocal(ClassificationLoss):
    heads = ("dense",)
    extra_columns = 0
    statistics_name = "efl"

    @classmethod
    def _settings(cls, node, num_classes):
        return {"num_classes": num_classes, "gamma_b": node.GAMMA_B, "scale": node.SCALE,
                "use_focusing_factor": node.FOCUSING_FACTOR,
                "use_weighting_factor": node.WEIGHTING_FACTOR}

    def statistics(self):
        return {"gradient_ratio": self.gradient_ratio, "focusing_factor": self.focusing_factor}


@CLS_LOSS_REGISTRY.register()
class EFL(EqualizedFocalLoss, _EqualizedFocal):
    """Equalized focal loss, eq. 4 (``MODEL.CLS_LOSS.EFL.GAMMA_B``, ``SCALE``, ``ALPHA``,
    ``FOCUSING_FACTOR``, ``WEIGHTING_FACTOR``)."""

    @classmethod
    def add_config(cls, node):
        node.EFL = _equalized_focal_node(with_alpha=True)

    @classmethod
    def from_config(cls, cfg, num_classes, train_datasets):
        node = cfg.MODEL.CLS_LOSS.EFL
        return dict(cls._settings(node, num_classes), alpha=node.ALPHA)

    def head_loss(self, logits, labels, avg_factor):
        return self(logits, labels, avg_factor=avg_factor)


@CLS_LOSS_REGISTRY.register()
class EQFL(EqualizedQualityFocalLoss, _EqualizedFocal):
    """Equalized quality focal loss, eq. 5 (``MODEL.CLS_LOSS.EQFL.GAMMA_B``, ``SCALE``,
    ``FOCUSING_FACTOR``, ``WEIGHTING_FACTOR``)."""

    inputs = ("quality",)

    @classmethod
    def add_config(cls, node):
        node.EQFL = _equalized_focal_node(with_alpha=False)

    @classmethod
    def from_config(cls, cfg, num_classes, train_datasets):
        return cls._settings(cfg.MODEL.CLS_LOSS.EQFL, num_classes)

    def head_loss(self, logits, labels, avg_factor, quality):
        return self(logits, labels, quality, avg_factor=avg_factor)
