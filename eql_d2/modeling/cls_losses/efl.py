"""Equalized focal losses (Li et al., CVPR 2022) for dense heads."""

from ...losses import EqualizedFocalLoss, EqualizedQualityFocalLoss
from .base import CLS_LOSS_REGISTRY, ClassificationLoss

__all__ = ["EFL", "EQFL"]


class _EqualizedFocal(ClassificationLoss):
    heads = ("dense",)
    extra_columns = 0
    statistics_name = "efl"

    @classmethod
    def from_config(cls, cfg, num_classes, train_datasets):
        e = cfg.MODEL.EFL
        return {"num_classes": num_classes, "gamma_b": e.GAMMA_B, "scale": e.SCALE,
                "use_focusing_factor": e.FOCUSING_FACTOR,
                "use_weighting_factor": e.WEIGHTING_FACTOR}

    def statistics(self):
        return {"gradient_ratio": self.gradient_ratio, "focusing_factor": self.focusing_factor}


@CLS_LOSS_REGISTRY.register()
class EFL(EqualizedFocalLoss, _EqualizedFocal):
    """Equalized focal loss, eq. 4 (``MODEL.EFL.GAMMA_B``, ``SCALE``, ``ALPHA``,
    ``FOCUSING_FACTOR``, ``WEIGHTING_FACTOR``)."""

    @classmethod
    def from_config(cls, cfg, num_classes, train_datasets):
        ret = super().from_config(cfg, num_classes, train_datasets)
        return dict(ret, alpha=cfg.MODEL.EFL.ALPHA)

    def head_loss(self, logits, labels, *, normalizer=None, **unused):
        return self(logits, labels, normalizer)


@CLS_LOSS_REGISTRY.register()
class EQFL(EqualizedQualityFocalLoss, _EqualizedFocal):
    """Equalized quality focal loss, eq. 5 (``MODEL.EFL.GAMMA_B``, ``SCALE``,
    ``FOCUSING_FACTOR``, ``WEIGHTING_FACTOR``)."""

    uses_quality = True

    def head_loss(self, logits, labels, *, normalizer=None, quality=None, **unused):
        return self(logits, labels, quality, normalizer)
