"""Equalized focal losses (Li et al., CVPR 2022) for dense heads."""

from ...losses import EqualizedFocalLoss, EqualizedQualityFocalLoss
from .base import CLS_LOSS_REGISTRY, ClassificationLoss

__all__ = ["EFL", "EQFL"]


# the settings of EFL (eq. 3-4); EQFL has all but ALPHA
_EFL_SETTINGS = {
    "GAMMA_B": (2.0, "gamma_b", "gamma_b, base focusing factor (eq. 3)"),
    "SCALE": (8.0, "scale", "s of eq. 3, upper limit of the category-specific focusing term "
                            "(0: the baseline loss)"),
    "FOCUSING_FACTOR": (True, "use_focusing_factor", "focusing factor (Tab. 3 'FF'); False: "
                                                     "exponent gamma_b for every category"),
    "WEIGHTING_FACTOR": (True, "use_weighting_factor", "weighting factor (Tab. 3 'WF'); False: "
                                                       "weight 1 instead of gamma^j / gamma_b"),
    "ALPHA": (0.25, "alpha", "alpha_t balance of positives and negatives"),
}


class _EqualizedFocal(ClassificationLoss):
    heads = ("dense",)
    extra_columns = 0
    statistics_name = "efl"

    def statistics(self):
        return {"gradient_ratio": self.gradient_ratio, "focusing_factor": self.focusing_factor}


@CLS_LOSS_REGISTRY.register()
class EFL(EqualizedFocalLoss, _EqualizedFocal):
    """Equalized focal loss, eq. 4 (``MODEL.CLS_LOSS.EFL.GAMMA_B``, ``SCALE``, ``ALPHA``,
    ``FOCUSING_FACTOR``, ``WEIGHTING_FACTOR``)."""

    config_node = "EFL"
    settings = _EFL_SETTINGS

    def head_loss(self, logits, labels, avg_factor):
        return self(logits, labels, avg_factor=avg_factor)


@CLS_LOSS_REGISTRY.register()
class EQFL(EqualizedQualityFocalLoss, _EqualizedFocal):
    """Equalized quality focal loss, eq. 5 (``MODEL.CLS_LOSS.EQFL.GAMMA_B``, ``SCALE``,
    ``FOCUSING_FACTOR``, ``WEIGHTING_FACTOR``)."""

    inputs = ("quality",)
    config_node = "EQFL"
    settings = {k: v for k, v in _EFL_SETTINGS.items() if k != "ALPHA"}

    def head_loss(self, logits, labels, avg_factor, quality):
        return self(logits, labels, quality, avg_factor=avg_factor)
