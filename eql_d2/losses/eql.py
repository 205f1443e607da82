"""Equalization loss (EQL): Tan et al., "Equalization Loss for Long-Tailed Object
Recognition", CVPR 2020, eq. 6-8."""

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ._checks import (check_avg_factor, check_class_vector, check_labels, check_logits,
                      check_scalar, check_switch, check_verified)
from ._fused import sigmoid_bce_loss

__all__ = ["EQLLoss", "tail_ratio"]


def tail_ratio(freq: Union[torch.Tensor, Sequence[float]], lambda_: float) -> float:
    """Tail ratio TR(lambda), eq. 8: the share of image-level class occurrences that belong
    to tail classes (f_j < lambda).

    TR = sum_j T_lambda(f_j) N_j / sum_j N_j, with N_j the number of images containing
    class j. Since f_j = N_j / (number of images), the image count cancels and only the
    frequencies are needed.

    Args:
        freq: [C] image-level frequency of each class, in [0, 1].
        lambda_: frequency threshold, >= 0.
    Returns:
        TR as a fraction in [0, 1] (the paper reports it in %).
    """
    f = check_class_vector("freq", freq, low=0.0, high=1.0).double()
    lam = check_scalar("lambda_", lambda_, low=0.0)
    total = f.sum()
    if total <= 0:
        raise ValueError("freq must have a positive sum to define a tail ratio")
    return float((f * (f < lam)).sum() / total)


class EQLLoss(nn.Module):
    """Sigmoid equalization loss, eq. 6-7 of Tan et al. (CVPR 2020).

    For sample i with label c_i (c_i = C for background) and y_ij = [c_i == j]:

        L = (1 / avg_factor) sum_i sum_j w_ij BCE(z_ij, y_ij),
        w_ij = 1 - E(r_i) T_lambda(f_j) (1 - y_ij)                     (eq. 7)

    E(r_i) = 1 for a foreground sample, 0 for background; T_lambda(f) = 1 if f < lambda.
    Foreground samples thus send no discouraging gradient to tail classes. Without the
    excluding function (Tab. 4 of the paper) E(r_i) = 1 for every sample, so background
    samples send none either. With ``verified`` (section 4.2), a class in the sample
    image's positive or verified-negative category set keeps w_ij = 1 (LVIS image-level
    labels), on foreground and background samples alike.

    Args:
        freq: [C] image-level frequency f_j of each class (images with class j / images),
            in [0, 1]. Kept as a buffer, so it follows ``.to(device)`` and is saved in
            state_dict: a trained model carries the frequencies it was trained with.
        lambda_: threshold lambda >= 0 (default 1.76e-3, the paper's lambda_c covering
            LVIS v0.5 rare and common classes). lambda_ = 0 gives plain sigmoid CE.
        use_compile: run the fused kernel through torch.compile (True/False); None reads
            ``EQL_D2_COMPILE_LOSSES`` and otherwise compiles on CUDA only.
        use_excluding_function: E(r) of eq. 7 (True, default); False takes E(r) = 1 for
            background samples too.

    Shapes: ``forward(logits [N, C], labels [N] int in 0..C, verified [N, C] bool or None,
    avg_factor=None)`` returns a 0-dim loss: the weighted sum divided by ``avg_factor`` > 0
    (float or one-element tensor; None: N, the mean over rows; 0 for N = 0).
    """

    def __init__(self, freq: Union[torch.Tensor, Sequence[float]], lambda_: float = 1.76e-3,
                 use_compile: Optional[bool] = None, use_excluding_function: bool = True):
        super().__init__()
        freq = check_class_vector("freq", freq, low=0.0, high=1.0)
        self.lambda_ = check_scalar("lambda_", lambda_, low=0.0)
        self.num_classes = freq.numel()
        self.use_compile = use_compile
        self.use_excluding_function = check_switch("use_excluding_function",
                                                   use_excluding_function)
        self.register_buffer("freq", freq.float())

    def threshold(self) -> torch.Tensor:
        """T_lambda(f_j) [C], bool: True for tail classes (f_j < lambda)."""
        return self.freq < self.lambda_

    def tail_ratio(self, lambda_: Optional[float] = None) -> float:
        """TR(lambda) of eq. 8 for this loss's frequencies (default: its own lambda)."""
        return tail_ratio(self.freq, self.lambda_ if lambda_ is None else lambda_)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                verified: Optional[torch.Tensor] = None,
                avg_factor: Union[None, float, torch.Tensor] = None) -> torch.Tensor:
        c = self.num_classes
        check_logits(logits, c)
        check_labels(labels, logits, 0, c)
        if verified is not None:
            check_verified(verified, logits, c)
        avg_factor = check_avg_factor(avg_factor, logits)
        ones = torch.ones_like(self.freq)
        # Negatives in foreground rows lose their weight on tail classes; background rows
        # keep weight 1 everywhere (E(r) = 0), or are weighted like foreground rows (no
        # excluding function: no per-row weights).
        bg_weight = ones if self.use_excluding_function else None
        loss, _ = sigmoid_bce_loss(logits, labels, verified, ones,
                                   ones - self.threshold().to(ones.dtype), bg_weight, c,
                                   avg_factor, want_stats=False,
                                   use_compile=self.use_compile)
        return loss

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, lambda_={self.lambda_}, "
                f"use_excluding_function={self.use_excluding_function}")
