"""Baseline classification losses in the same style as the equalization losses.

Every loss returns the sum of its per-entry losses divided by ``avg_factor`` (a positive
float or one-element tensor; None: the number of rows N, i.e. the mean over rows).
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (check_avg_factor, check_finite_logits, check_labels, check_logits,
                      check_quality, check_scalar)
from ._fused import average, focal_family_loss, sigmoid_bce_loss

__all__ = ["FocalLoss", "QualityFocalLoss", "SigmoidCELoss", "SoftmaxCELoss"]

Number = Union[float, int, torch.Tensor]
AvgFactor = Optional[Number]


def _width(logits) -> int:
    """C of logits [N, C]; ValueError naming logits otherwise."""
    if isinstance(logits, torch.Tensor) and logits.dim() == 2:
        return logits.shape[1]
    got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    raise ValueError(f"logits must be a 2-D tensor [N, C], got {got}")


class SigmoidCELoss(nn.Module):
    """Sigmoid cross-entropy, eq. 3-4 of Tan et al. (CVPR 2020): EQL with lambda = 0.

        L = (1 / avg_factor) sum_i sum_j BCE(z_ij, [label_i == j])

    Shapes: ``forward(logits [N, C], labels [N] int in 0..C, C = background,
    avg_factor=None)`` returns a 0-dim loss (None: avg_factor = N; 0 for N = 0).
    ``use_compile`` as for :class:`~eql_d2.losses.EQLLoss`.
    """

    def __init__(self, use_compile: Optional[bool] = None):
        super().__init__()
        self.use_compile = use_compile

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                avg_factor: AvgFactor = None) -> torch.Tensor:
        c = _width(logits)
        check_logits(logits, c)
        check_labels(labels, logits, 0, c)
        avg_factor = check_avg_factor(avg_factor, logits)
        ones = torch.ones(c, device=logits.device)
        loss, _ = sigmoid_bce_loss(logits, labels, None, ones, ones, None, c, avg_factor,
                                   want_stats=False, use_compile=self.use_compile)
        return loss


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al., EFL paper eq. 1) summed and divided by avg_factor.

        L = (1 / avg_factor) sum_i sum_j -alpha_t (1 - p_t)^gamma log(p_t)

    over non-ignored samples; equal to ``torchvision.ops.sigmoid_focal_loss(z, onehot,
    alpha, gamma, reduction="sum") / avg_factor`` on those rows.

    Args:
        gamma: focusing parameter >= 0 (default 2).
        alpha: in [0, 1] (default 0.25), or None for alpha_t = 1.
        use_compile: as for :class:`~eql_d2.losses.EQLLoss`.

    Shapes: ``forward(logits [N, C], labels [N] int in {-1 ignore, 0..C-1, C background},
    avg_factor=None)`` returns a 0-dim loss (None: avg_factor = N, ignored rows included).
    """

    def __init__(self, gamma: float = 2.0, alpha: Optional[float] = 0.25,
                 use_compile: Optional[bool] = None):
        super().__init__()
        self.gamma = check_scalar("gamma", gamma, low=0.0)
        self.alpha = None if alpha is None else check_scalar("alpha", alpha, low=0.0, high=1.0)
        self.use_compile = use_compile

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                avg_factor: AvgFactor = None) -> torch.Tensor:
        c = _width(logits)
        check_logits(logits, c)
        check_labels(labels, logits, -1, c)
        avg_factor = check_avg_factor(avg_factor, logits)
        ones = torch.ones(c, device=logits.device)
        loss, _ = focal_family_loss(logits, labels, None, ones * self.gamma, ones, self.alpha,
                                    avg_factor, want_stats=False,
                                    use_compile=self.use_compile)
        return loss

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}"


class QualityFocalLoss(nn.Module):
    """Quality focal loss (Li et al., GFL, NeurIPS 2020) summed and divided by avg_factor:
    EQFL with s = 0.

        L = (1 / avg_factor) sum_i sum_j -|y' - p|^beta (y' log p + (1 - y') log(1 - p))

    with y' = quality_i for the labelled class and 0 otherwise.

    Shapes: ``forward(logits [N, C], labels [N] as for :class:`FocalLoss`, quality [N],
    avg_factor=None)`` returns a 0-dim loss (None: avg_factor = N); ``quality`` gets no
    gradient.
    """

    def __init__(self, beta: float = 2.0, use_compile: Optional[bool] = None):
        super().__init__()
        self.beta = check_scalar("beta", beta, low=0.0, low_open=True)
        self.use_compile = use_compile

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor,
                avg_factor: AvgFactor = None) -> torch.Tensor:
        c = _width(logits)
        check_logits(logits, c)
        check_labels(labels, logits, -1, c)
        check_quality(quality, labels, logits, c)
        avg_factor = check_avg_factor(avg_factor, logits)
        ones = torch.ones(c, device=logits.device)
        loss, _ = focal_family_loss(logits, labels, quality.detach(), ones * self.beta, ones,
                                    None, avg_factor, want_stats=False,
                                    use_compile=self.use_compile)
        return loss

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class SoftmaxCELoss(nn.Module):
    """Softmax cross-entropy, eq. 1-2 of Tan et al. (CVPR 2020), summed over samples and
    divided by avg_factor.

    Shapes: ``forward(logits [N, K], labels [N] int in 0..K-1, avg_factor=None)`` (K
    includes the background class when there is one) returns a 0-dim loss (None:
    avg_factor = N, the mean over samples; 0 for N = 0).
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                avg_factor: AvgFactor = None) -> torch.Tensor:
        k = _width(logits)
        check_logits(logits, k)
        check_labels(labels, logits, 0, k - 1)
        check_finite_logits(logits)
        avg_factor = check_avg_factor(avg_factor, logits)
        total = F.cross_entropy(logits, labels, reduction="sum")
        return average(total, avg_factor, logits.shape[0])
