"""Softmax equalization loss (SEQL): Tan et al., "Equalization Loss for Long-Tailed Object
Recognition", CVPR 2020, section 3.3, eq. 9-11."""

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (check_avg_factor, check_class_vector, check_finite_logits,
                      check_labels, check_logits, check_scalar)
from ._fused import average

__all__ = ["SoftmaxEQLLoss"]


class SoftmaxEQLLoss(nn.Module):
    """Softmax equalization loss for classification, eq. 9-11 of Tan et al. (CVPR 2020).

    For sample i with label c:

        L_i = -log p~_c,   p~_c = exp(z_c) / sum_k w~_k exp(z_k)          (eq. 9-10)
        w~_k = 1 - beta_ik T_lambda(f_k) (1 - y_k)                           (eq. 11)

    beta_ik ~ Bernoulli(gamma), drawn independently per (sample, class) at every call (in
    training and in eval mode alike: the loss is defined with the draw). w~ is 0 or 1, so
    a dropped tail class is removed from the softmax denominator; the label's own class
    is never dropped. The loss is sum_i L_i / avg_factor (None: N, the mean over
    samples); gamma = 0 is softmax cross-entropy exactly. The draws use ``generator`` when
    given (its device is used for drawing, then the mask is moved to the logits' device),
    else the global RNG; only the tail columns are drawn. The tail is found once, from
    ``freq`` at construction.

    Args:
        freq: [C] image-level frequency f_k of each class, in [0, 1] (non-persistent
            buffer, as in :class:`~eql_d2.losses.EQLLoss`).
        lambda_: threshold lambda >= 0 (the paper uses 3e-3 on CIFAR-100-LT and 4.3e-4 on
            ImageNet-LT).
        gamma: probability gamma in [0, 1] of beta = 1 (the paper uses 0.9 to 0.95).
        generator: optional ``torch.Generator`` for the beta draws.

    Shapes: ``forward(logits [N, C], labels [N] int in 0..C-1, avg_factor=None)`` returns a
    0-dim loss (0 for N = 0).
    """

    def __init__(self, freq: Union[torch.Tensor, Sequence[float]], lambda_: float,
                 gamma: float, generator: Optional[torch.Generator] = None):
        super().__init__()
        freq = check_class_vector("freq", freq, low=0.0, high=1.0)
        self.lambda_ = check_scalar("lambda_", lambda_, low=0.0)
        self.gamma = check_scalar("gamma", gamma, low=0.0, high=1.0)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, "
                             f"got {type(generator).__name__}")
        self.generator = generator
        self.num_classes = freq.numel()
        self.register_buffer("freq", freq.float(), persistent=False)
        # The tail columns, found once: per call, nonzero would read the mask back from
        # the device (a synchronisation). freq is fixed at construction.
        self.register_buffer("tail", torch.nonzero(self.freq < self.lambda_).flatten(),
                             persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                avg_factor: Union[None, float, torch.Tensor] = None) -> torch.Tensor:
        c = self.num_classes
        check_logits(logits, c)
        check_labels(labels, logits, 0, c - 1)
        check_finite_logits(logits)  # the -inf of dropped classes must be ours alone
        avg_factor = check_avg_factor(avg_factor, logits)
        n = logits.shape[0]
        if n == 0:
            return logits.sum() * 0.0
        tail = self.tail
        if self.gamma == 0 or tail.numel() == 0:
            return average(F.cross_entropy(logits, labels, reduction="sum"), avg_factor, n)
        draw_device = self.generator.device if self.generator is not None else logits.device
        beta = torch.rand(n, tail.numel(), generator=self.generator,
                          device=draw_device) < self.gamma
        # A generator on another device draws there; the copy is the caller's choice.
        beta = beta.to(logits.device)
        tail = tail.to(logits.device)
        # w~ = 0 exactly where beta = 1 on a tail class that is not the label.
        drop = beta & (labels[:, None] != tail[None, :])
        mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        mask[:, tail] = drop
        total = F.cross_entropy(logits.masked_fill(mask, float("-inf")), labels, reduction="sum")
        return average(total, avg_factor, n)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, lambda_={self.lambda_}, gamma={self.gamma}"
