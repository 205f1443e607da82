"""Seesaw loss (Wang et al., CVPR 2021) for two-stage heads, with its normalized linear
classifier and objectness branch as published."""

import torch
import torch.nn.functional as F
from torch import nn

from ...losses import SeesawLoss
from .base import CLS_LOSS_REGISTRY, ClassificationLoss

__all__ = ["Seesaw", "NormedLinear"]


class NormedLinear(nn.Linear):
    """Cosine classifier: z = tau <w / |w|, x / |x|> + b (weights N(0, 0.01), bias 0)."""

    def __init__(self, in_features: int, out_features: int, tau: float = 20.0,
                 eps: float = 1e-6):
        super().__init__(in_features, out_features)
        self.tau = float(tau)
        self.eps = float(eps)
        nn.init.normal_(self.weight, std=0.01)
        nn.init.constant_(self.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight / (self.weight.norm(dim=1, keepdim=True) + self.eps)
        x = x / (x.norm(dim=1, keepdim=True) + self.eps)
        return F.linear(x, w, self.bias) * self.tau

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau}"


@CLS_LOSS_REGISTRY.register()
class Seesaw(SeesawLoss, ClassificationLoss):
    """Seesaw loss over C + 2 columns (C classes, then the objectness pair [fg, bg]) from a
    :class:`NormedLinear` classifier (``MODEL.CLS_LOSS.SEESAW.P / Q / EPS / TAU``). Cumulative class
    counts (``cum_samples``) are summed over workers and saved in checkpoints."""

    extra_columns = 2

    def __init__(self, num_classes: int, p: float = 0.8, q: float = 2.0, eps: float = 1e-2,
                 tau: float = 20.0):
        super().__init__(num_classes, p=p, q=q, eps=eps)
        self.tau = float(tau)

    config_node = "SEESAW"
    settings = {
        "P": (0.8, "p", "mitigation exponent p of M_ij = (N_j / N_i)^p (0: no mitigation)"),
        "Q": (2.0, "q", "compensation exponent q of C_ij = (sigma_j / sigma_i)^q "
                        "(0: no compensation)"),
        "EPS": (0.01, "eps", "lower bound of sigma_i in the compensation factor"),
        "TAU": (20.0, "tau", "temperature tau of the normalized linear (cosine) classifier"),
    }

    def classifier(self, in_features, out_features):
        return NormedLinear(in_features, out_features, tau=self.tau)

    def init_bias(self, bias, prior_prob, background_fraction):
        pass  # NormedLinear starts at bias 0, as published

    def head_loss(self, logits, labels, avg_factor):
        return self(logits, labels, avg_factor=avg_factor)
