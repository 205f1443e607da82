"""Class-balanced loss: Cui et al., "Class-Balanced Loss Based on Effective Number of
Samples", CVPR 2019 (eq. 3 the effective number, eq. 4-6 its softmax and sigmoid forms)."""

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (check_avg_factor, check_class_vector, check_finite_logits, check_labels,
                      check_logits, check_scalar, raise_if_nonfinite)
from ._fused import average, compute_dtype

__all__ = ["ClassBalancedLoss", "class_balanced_background_weight", "class_balanced_weights"]

FORMS = ("softmax", "sigmoid")


def class_balanced_weights(counts: Union[torch.Tensor, Sequence[float]],
                           beta: float) -> torch.Tensor:
    """Per-class weights [C] of Cui et al. (eq. 3 and sec. 4): the inverse of the effective
    number of samples E_n = (1 - beta^n) / (1 - beta), normalised so that they sum to C.

    counts: [C] training samples of each class (>= 0); a class with none is given the weight
    of a class with one (its E_n would be 0; it never occurs as a label in training anyway).
    beta in [0, 1): 0 gives equal weights, beta -> 1 inverse class frequency. Computed in
    float64, returned as float32.
    """
    weights = _inverse_effective_number(counts, beta)
    return (weights * (weights.numel() / weights.sum())).float()


def _inverse_effective_number(counts, beta):
    """1 / E_n = (1 - beta) / (1 - beta^n) of each class [C], float64 (n >= 1)."""
    beta = check_scalar("beta", beta, low=0.0, high=1.0)
    if beta == 1.0:
        raise ValueError("beta must be < 1 (beta -> 1 is inverse frequency weighting)")
    n = check_class_vector("counts", counts, low=0.0).double().clamp(min=1.0)
    return (1.0 - beta) / (1.0 - torch.pow(beta, n))


def class_balanced_background_weight(counts: Union[torch.Tensor, Sequence[float]],
                                     beta: float) -> float:
    """The weight of a detector's background as a class of unlimited samples beside the
    classes of :func:`class_balanced_weights`: its effective number is the limit
    1 / (1 - beta), and it takes the same normalisation, so it is (1 - beta) C / sum_j 1 / E_j.
    A frequent class's weight then approaches it from above, instead of falling far below
    the background's unweighted 1 (with beta = 0.999 and classes of 1 to 1000 images, the
    largest class weighs ~0.02 beside a background of 1)."""
    inverse = _inverse_effective_number(counts, beta)
    return float((1.0 - beta) * inverse.numel() / inverse.sum())


class ClassBalancedLoss(nn.Module):
    """Class-balanced softmax or sigmoid cross-entropy (Cui et al., CVPR 2019, eq. 4-5):
    each sample's loss is weighted by the class-balanced weight w_y of its label,

        softmax: L = (1 / avg_factor) sum_i w_{y_i} CE(z_i, y_i)
        sigmoid: L = (1 / avg_factor) sum_i w_{y_i} sum_j BCE(z_ij, [y_i == j])

    with w from :func:`class_balanced_weights` (sum_j w_j = C). The same module serves image
    classification (logits [N, C], labels 0..C-1) and detection heads, whose label C is the
    background: for a softmax its column is the last of C + 1, for a sigmoid it is a negative
    of every class column (logits [N, C]); its weight is ``background_weight`` (default 1,
    the weight every sample has without re-weighting: background is not a long-tailed class).

    Args:
        weights: [C] per-class weights (> 0), e.g. :func:`class_balanced_weights`; kept in a
            buffer, so that a checkpoint holds them.
        form: "softmax" or "sigmoid".
        background_weight: weight of samples labelled C (>= 0).
        gamma: sigmoid form only: the focal factor (1 - p_t)^gamma of each binary term (the
            class-balanced focal loss of the same paper, eq. 6 there); 0: cross-entropy.

    Shapes: ``forward(logits [N, K], labels [N] int, avg_factor=None)`` with K = C (labels in
    0..C-1; with the sigmoid form also C, background, and -1, ignored as in dense heads) or,
    softmax form only, K = C + 1 (labels in 0..C); returns a 0-dim loss (None: avg_factor =
    N; 0 for N = 0).
    """

    def __init__(self, weights: Union[torch.Tensor, Sequence[float]], form: str = "softmax",
                 background_weight: float = 1.0, gamma: float = 0.0):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        weights = check_class_vector("weights", weights, low=0.0)
        self.form = form
        self.num_classes = weights.numel()
        self.background_weight = check_scalar("background_weight", background_weight, low=0.0)
        self.gamma = check_scalar("gamma", gamma, low=0.0)
        if self.gamma and form != "sigmoid":
            raise ValueError(f"gamma = {gamma}: the focal factor goes with the sigmoid form only")
        self.register_buffer("weights", weights.float())

    def sample_weights(self, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """w_{y_i} [N] for labels in -1..C (C: background_weight, -1: 0)."""
        w = self.weights.to(dtype)
        table = torch.cat([w.new_zeros(1), w, w.new_full((1,), self.background_weight)])
        return table[labels + 1]

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                avg_factor: Optional[Union[float, torch.Tensor]] = None) -> torch.Tensor:
        c = self.num_classes
        if self.form == "softmax":
            width = logits.shape[1] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else c
            if width not in (c, c + 1):
                check_logits(logits, c + 1, "C+1 (or C without background)")
            check_logits(logits, width)
            check_labels(labels, logits, 0, width - 1)
            check_finite_logits(logits)
        else:
            check_logits(logits, c)
            check_labels(labels, logits, -1, c)
        avg_factor = check_avg_factor(avg_factor, logits)
        z = logits.to(compute_dtype(logits))
        w = self.sample_weights(labels, z.dtype)
        if self.form == "softmax":
            per_sample = F.cross_entropy(z, labels, reduction="none")
        else:
            # one-hot over C + 1 columns, the background's dropped: all zeros for label C (and
            # for the ignored -1, whose weight is 0)
            # (scatter, not one_hot, which checks the label range on the host)
            target = z.new_zeros(z.shape[0], c + 1).scatter_(
                1, labels.clamp(min=0)[:, None], 1.0)[:, :c]
            terms = F.binary_cross_entropy_with_logits(z, target, reduction="none")
            if self.gamma:
                p = torch.sigmoid(z)
                terms = terms * (p + target - 2 * p * target).pow(self.gamma)  # (1 - p_t)^gamma
            per_sample = terms.sum(1)
        loss = average((w * per_sample).sum(), avg_factor, logits.shape[0])
        if self.form == "sigmoid":
            raise_if_nonfinite(loss, logits)
        return loss

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, form={self.form!r}, "
                f"background_weight={self.background_weight}, gamma={self.gamma}")
