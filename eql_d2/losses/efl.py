"""Equalized focal loss (EFL) and equalized quality focal loss (EQFL): Li et al.,
"Equalized Focal Loss for Dense Long-Tailed Object Detection", CVPR 2022, eq. 2-6."""

from typing import Optional, Union

import torch

from ._checks import (check_avg_factor, check_labels, check_logits, check_num_classes,
                      check_quality, check_scalar, check_switch)
from ._fused import focal_family_loss
from .statistics import GradientStatistics

__all__ = ["EqualizedFocalLoss", "EqualizedQualityFocalLoss"]

Number = Union[float, int, torch.Tensor]


class _EqualizedFocalBase(GradientStatistics):
    """Focusing/weighting factors from accumulated gradients, shared by EFL and EQFL."""

    _STATS_MEAN_OVER_WORKERS = True  # the statistics include 1 / avg_factor

    def __init__(self, num_classes: int, gamma_b: float, scale: float,
                 use_compile: Optional[bool], use_focusing_factor: bool,
                 use_weighting_factor: bool):
        super().__init__(check_num_classes(num_classes))
        self.gamma_b = check_scalar("gamma_b", gamma_b, low=0.0, low_open=True)
        self.scale = check_scalar("scale", scale, low=0.0)
        self.use_compile = use_compile
        self.use_focusing_factor = check_switch("use_focusing_factor", use_focusing_factor)
        self.use_weighting_factor = check_switch("use_weighting_factor", use_weighting_factor)

    @property
    def gradient_ratio(self) -> torch.Tensor:
        """g^j = clamp(pos_grad_j / neg_grad_j, 0, 1) [C]; 1 where neg_grad_j = 0."""
        return self._raw_ratio().clamp(0.0, 1.0)

    def _category_gamma(self) -> torch.Tensor:
        """gamma^j = gamma_b + s (1 - g^j) [C] (eq. 3), whichever factors are applied."""
        return self.gamma_b + self.scale * (1.0 - self.gradient_ratio)

    @property
    def focusing_factor(self) -> torch.Tensor:
        """Exponent the next step applies [C]: gamma^j of eq. 3, or gamma_b for every
        category with the focusing factor off."""
        if not self.use_focusing_factor:
            return torch.full_like(self.pos_grad, self.gamma_b)
        return self._category_gamma()

    @property
    def weighting_factor(self) -> torch.Tensor:
        """Weight the next step applies [C]: gamma^j / gamma_b with gamma^j of eq. 3 (also
        when the exponent is gamma_b), or 1 with the weighting factor off."""
        if not self.use_weighting_factor:
            return torch.ones_like(self.pos_grad)
        return self._category_gamma() / self.gamma_b

    def _loss(self, logits, labels, quality, avg_factor, alpha):
        c = self.num_classes
        check_logits(logits, c)
        check_labels(labels, logits, -1, c)
        if quality is not None:
            check_quality(quality, labels, logits, c)
            quality = quality.detach()
        avg_factor = check_avg_factor(avg_factor, logits)
        # both factors come from the statistics before this step
        gamma, weight = self.focusing_factor, self.weighting_factor
        update = self._updating_statistics()
        loss, stats = focal_family_loss(logits, labels, quality, gamma, weight, alpha,
                                        avg_factor, want_stats=update,
                                        use_compile=self.use_compile)
        if update:
            self._accumulate(stats)
        return loss

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, gamma_b={self.gamma_b}, scale={self.scale}, "
                f"use_focusing_factor={self.use_focusing_factor}, "
                f"use_weighting_factor={self.use_weighting_factor}")


class EqualizedFocalLoss(_EqualizedFocalBase):
    """Equalized focal loss, eq. 4 of Li et al. (CVPR 2022).

    For each non-ignored sample i and class j, with y = [label_i == j], p = sigmoid(z_ij),
    p_t = p if y else 1 - p and alpha_t = alpha if y else 1 - alpha:

        L = (1 / avg_factor) sum_i sum_j -alpha_t (gamma^j / gamma_b)
                                          (1 - p_t)^(gamma^j) log(p_t)       (eq. 4)
        gamma^j = gamma_b + s (1 - g^j)                                      (eq. 3)
        g^j = clamp(pos_grad_j / neg_grad_j, 0, 1)

    gamma^j is the focusing factor, gamma^j / gamma_b the weighting factor; both come from
    the statistics accumulated before this step and are constants for the gradient. The
    gradient w.r.t. z_ij is eq. 6 times alpha_t / avg_factor.

    Components (Tab. 3 of the paper, "WF" and "FF"): without the focusing factor the
    exponent is gamma_b for every category, so the weighting factor alone reweights a focal
    loss; without the weighting factor gamma^j / gamma_b is replaced by 1. With both off
    the loss is the focal loss with gamma = gamma_b, and the statistics still accumulate.

    Statistics (buffers ``pos_grad``, ``neg_grad`` [C], see :class:`GradientStatistics`):
    after each forward in training mode with grad enabled, they add the magnitude of that
    gradient (eq. 6 x alpha_t / avg_factor, with the factors applied), summed over the
    positive and over the negative entries of each class and over workers. g^j starts at 1
    (no statistics: neg_grad_j = 0), so the first step is the focal loss. A loss weight
    applied by the caller outside this module is not part of the statistics; as a constant
    it cancels in g^j. With DDP and an avg_factor averaged over workers (as the dense
    detectors here use: the number of positives), each step's sums are averaged over
    workers, as DDP averages gradients, so they equal those of one process given the whole
    batch.

    Logging: :attr:`gradient_ratio` (g^j), :attr:`focusing_factor` (the exponent applied:
    gamma^j, or gamma_b with the focusing factor off), :attr:`weighting_factor` (the weight
    applied: gamma^j / gamma_b, or 1 with the weighting factor off), each a tensor [C] for
    the next step.

    Args:
        num_classes: C.
        gamma_b: base focusing factor gamma_b > 0 (default 2).
        scale: s >= 0 (default 8); s = 0 gives the focal loss.
        alpha: alpha in [0, 1] (default 0.25), or None for alpha_t = 1.
        use_compile: as for :class:`~eql_d2.losses.EQLLoss`.
        use_focusing_factor: exponent gamma^j (True, default) or gamma_b for every category.
        use_weighting_factor: weight gamma^j / gamma_b (True, default) or 1.

    Shapes: ``forward(logits [N, C], labels [N] int in {-1 ignore, 0..C-1, C background},
    avg_factor=None)`` returns a 0-dim loss: the sum of the element losses (0 on ignored
    rows) divided by ``avg_factor`` > 0 (float or one-element tensor; None: N, the number
    of rows, ignored ones included; 1 for N = 0).
    """

    def __init__(self, num_classes: int, gamma_b: float = 2.0, scale: float = 8.0,
                 alpha: Optional[float] = 0.25, use_compile: Optional[bool] = None,
                 use_focusing_factor: bool = True, use_weighting_factor: bool = True):
        super().__init__(num_classes, gamma_b, scale, use_compile, use_focusing_factor,
                         use_weighting_factor)
        self.alpha = None if alpha is None else check_scalar("alpha", alpha, low=0.0, high=1.0)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                avg_factor: Optional[Number] = None) -> torch.Tensor:
        return self._loss(logits, labels, None, avg_factor, self.alpha)


class EqualizedQualityFocalLoss(_EqualizedFocalBase):
    """Equalized quality focal loss, eq. 5 of Li et al. (CVPR 2022, appendix A).

    For each non-ignored sample i and class j, with p = sigmoid(z_ij) and soft target
    y' = quality_i if label_i == j else 0:

        L = (1 / avg_factor) sum_i sum_j -(gamma^j / gamma_b) |y' - p|^(gamma^j)
                                  (y' log p + (1 - y') log(1 - p))            (eq. 5)

    with the focusing factor gamma^j and the weighting factor gamma^j / gamma_b of
    :class:`EqualizedFocalLoss` (same statistics: |dL/dz| summed over the entries with
    label_i == j, the positives, and over the others; same switches). s = 0, or both
    factors off, gives the quality focal loss with beta = gamma_b. For gamma_b < 1 the
    true derivative is infinite where p equals a fractional target; the gradient there is
    taken as 0.

    Args: as :class:`EqualizedFocalLoss`, without alpha.

    Shapes: ``forward(logits [N, C], labels [N] as for EFL, quality [N] float (IoU in
    [0, 1] on foreground rows, ignored elsewhere), avg_factor=None)`` returns a 0-dim
    loss: the sum of the element losses divided by ``avg_factor`` (as for EFL; None: N).
    ``quality`` is a target: no gradient flows to it.
    """

    def __init__(self, num_classes: int, gamma_b: float = 2.0, scale: float = 8.0,
                 use_compile: Optional[bool] = None, use_focusing_factor: bool = True,
                 use_weighting_factor: bool = True):
        super().__init__(num_classes, gamma_b, scale, use_compile, use_focusing_factor,
                         use_weighting_factor)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor,
                avg_factor: Optional[Number] = None) -> torch.Tensor:
        return self._loss(logits, labels, quality, avg_factor, None)
