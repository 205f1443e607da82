"""Equalization loss v2 (EQLv2): Tan et al., "Equalization Loss v2: A New Gradient Balance
Approach for Long-Tailed Object Detection", CVPR 2021."""

from typing import Optional, Union

import torch

from ._checks import (check_avg_factor, check_labels, check_logits, check_num_classes,
                      check_scalar, check_verified)
from ._fused import sigmoid_bce_loss
from .statistics import GradientStatistics

__all__ = ["EQLv2Loss"]


class EQLv2Loss(GradientStatistics):
    """Gradient-guided re-weighted sigmoid cross-entropy (EQLv2) with an objectness column.

    Logits have C + 1 columns: C classes and, last, a class-agnostic background
    (objectness) logit whose target is 1 for background samples. For sample i with label
    c_i (C = background) and y_ij = [c_i == j]:

        L = (1 / avg_factor) sum_i sum_{j <= C} w_ij BCE(z_ij, y_ij)
        w_ij = r_j if y_ij = 1, else q_j
        q_j = 1 / (1 + exp(-gamma (g_j - mu)))      negative weight
        r_j = 1 + alpha (1 - q_j)                    positive weight
        g_j = pos_grad_j / neg_grad_j                accumulated gradient ratio

    The objectness column always has weight 1 and no statistics. A verified negative
    (``verified[i, j]`` and y_ij = 0: class j is in the image's positive or verified
    negative set) has weight 1. The weights of a step come from the statistics before it.

    Statistics (buffers ``pos_grad``, ``neg_grad`` [C], see :class:`GradientStatistics`):
    after each forward in training mode with grad enabled, they add
    sum_i |dBCE/dz_ij| w_ij = sum_i |sigmoid(z_ij) - y_ij| w_ij over the positive and over
    the negative entries of each class (summed over workers). The 1 / avg_factor of the
    loss is not included, so the statistics do not depend on it. A class without negative
    statistics yet (neg_grad_j = 0, in particular before the first step) has
    q_j = r_j = 1, the g_j -> inf limit, so the first step is plain sigmoid cross-entropy.
    Logging: :attr:`gradient_ratio` (g, +inf where neg_grad = 0), :attr:`negative_weight`
    (q), :attr:`positive_weight` (r).

    Args:
        num_classes: C, the number of foreground classes.
        gamma: steepness gamma >= 0 of the mapping (default 12).
        mu: centre mu of the mapping (default 0.8).
        alpha: positive up-weighting alpha >= 0 (default 4).
        use_compile: as for :class:`~eql_d2.losses.EQLLoss`.

    Shapes: ``forward(logits [N, C+1], labels [N] int in 0..C, verified [N, C] bool or
    None, avg_factor=None)`` returns a 0-dim loss: the weighted sum divided by
    ``avg_factor`` > 0 (float or one-element tensor; None: N, the mean over rows; 0 for
    N = 0). ``scores(logits [N, C+1])`` returns [N, C].
    """

    def __init__(self, num_classes: int, gamma: float = 12.0, mu: float = 0.8,
                 alpha: float = 4.0, use_compile: Optional[bool] = None):
        super().__init__(check_num_classes(num_classes))
        self.gamma = check_scalar("gamma", gamma, low=0.0)
        self.mu = check_scalar("mu", mu)
        self.alpha = check_scalar("alpha", alpha, low=0.0)
        self.use_compile = use_compile

    @property
    def gradient_ratio(self) -> torch.Tensor:
        """g_j = pos_grad_j / neg_grad_j [C]; +inf where neg_grad_j = 0."""
        return self._raw_ratio()

    @property
    def negative_weight(self) -> torch.Tensor:
        """q_j [C], the weight of negative entries of class j in the next step."""
        g = self._raw_ratio()
        return torch.where(torch.isinf(g), torch.ones_like(g),
                           torch.sigmoid(self.gamma * (g - self.mu)))

    @property
    def positive_weight(self) -> torch.Tensor:
        """r_j = 1 + alpha (1 - q_j) [C], the weight of positive entries of class j."""
        return 1.0 + self.alpha * (1.0 - self.negative_weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                verified: Optional[torch.Tensor] = None,
                avg_factor: Union[None, float, torch.Tensor] = None) -> torch.Tensor:
        c = self.num_classes
        check_logits(logits, c + 1, "C+1")
        check_labels(labels, logits, 0, c)
        if verified is not None:
            check_verified(verified, logits, c)
        avg_factor = check_avg_factor(avg_factor, logits)
        one = self.pos_grad.new_ones(1)
        neg_w = torch.cat([self.negative_weight, one])
        pos_w = torch.cat([self.positive_weight, one])
        update = self._updating_statistics()
        loss, stats = sigmoid_bce_loss(logits, labels, verified, pos_w, neg_w, None, c,
                                       avg_factor, want_stats=update,
                                       use_compile=self.use_compile)
        if update:
            self._accumulate(stats[:, :c])
        return loss

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Detection scores sigmoid(z_ij) (1 - sigmoid(z_iC)), [N, C], from logits [N, C+1]."""
        check_logits(logits, self.num_classes + 1, "C+1")
        return torch.sigmoid(logits[:, :-1]) * torch.sigmoid(-logits[:, -1:])

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, gamma={self.gamma}, mu={self.mu}, "
                f"alpha={self.alpha}")
