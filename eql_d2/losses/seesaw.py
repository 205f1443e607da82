"""Seesaw loss: Wang et al., "Seesaw Loss for Long-Tailed Instance Segmentation", CVPR 2021
(sigma-hat, S_ij = M_ij C_ij, the mitigation and compensation factors), with the objectness
branch of the authors' released implementation (mmdetection's ``SeesawLoss``). Equation
numbers are not cited: the paper's text was not at hand to check them."""

import math
from typing import Union

import torch
import torch.nn.functional as F

from ..utils.comm import all_reduce_
from ..utils.statistics import RestartableStatistics
from ._checks import (check_avg_factor, check_finite_logits, check_labels, check_logits,
                      check_num_classes, check_scalar)
from ._fused import average, compute_dtype

__all__ = ["SeesawLoss"]


class SeesawLoss(RestartableStatistics):
    """Seesaw loss with an objectness branch (Wang et al., CVPR 2021).

    Logits have C + 2 columns: C class logits, then two objectness logits [fg, bg]. For a
    sample of foreground class i (z = its C class logits, sigma = softmax(z), detached):

        L_cls = -log sigma~_i,
        sigma~_i = exp(z_i) / (sum_{j != i} S_ij exp(z_j) + exp(z_i))
        S_ij = M_ij C_ij
        M_ij = (N_j / N_i)^p  if N_j < N_i, else 1                 mitigation factor
        C_ij = (sigma_j / max(sigma_i, eps))^q  if > 1, else 1     compensation factor

    i.e. softmax cross-entropy on z_j + log S_ij (j != i). N_j is the cumulative number of
    training samples of class j (buffer ``cum_samples``), clamped to >= 1 so a class not
    seen yet divides nothing by zero; S_ij is a constant for the gradient. The objectness
    term is a 2-way softmax cross-entropy, target fg for foreground samples and bg for
    background ones:

        L = (1 / avg_factor) [ sum_{fg rows} L_cls + sum_{all rows} L_obj ]

    Both terms have weight 1 and the same divisor, by default N, the number of rows
    (foreground and background samples), as in mmdetection's ``SeesawLoss`` under its bbox
    head (``avg_factor`` = number of sampled RoIs), the authors' code.
    ``eps`` (default 1e-2, mmdetection's) bounds the compensation factor when sigma_i is
    tiny. With DDP each worker divides by its own avg_factor; the average of the workers'
    gradients is that of the global batch when those are equal (as with full RoI batches).

    Counts: in training mode with grad enabled, each forward first adds the batch's
    foreground label counts, summed over the default process group (``all_reduce``), to
    ``cum_samples``; the factors of that step then use the counts including the current
    batch (as the authors' code does), so every worker computes the same M_ij as one
    process given the whole global batch (mmdetection counts each GPU's samples only).
    Every worker must run the same number of training forwards. In eval mode or without
    grad the stored counts are used unchanged.
    The counts are an int64 buffer (exact beyond float32's 2^24), saved in checkpoints; a
    state_dict without them loads with a ``UserWarning`` and the counts restart from zero.

    What the loss expects from the head (not part of this module): as published, the
    C + 2 logits come from a normalized linear layer, z = tau <w / |w|, x / |x|> + b with
    temperature tau = 20 (mmdetection's ``NormedLinear``: weights N(0, 0.01), bias 0).
    Scores (:meth:`scores`): softmax over the C class columns times the fg probability of
    the objectness softmax, [N, C]; background is 1 - objectness fg and is not returned.

    Args:
        num_classes: C, the number of foreground classes.
        p: mitigation exponent p >= 0 (default 0.8); 0 disables mitigation.
        q: compensation exponent q >= 0 (default 2.0); 0 disables compensation.
        eps: lower bound of sigma_i in the compensation factor, in (0, 1] (default 1e-2).

    Shapes: ``forward(logits [N, C+2], labels [N] int in 0..C, C = background,
    avg_factor=None)`` returns a 0-dim loss (None: avg_factor = N; 0 for N = 0).
    ``scores(logits [N, C+2])`` returns [N, C].
    """

    def __init__(self, num_classes: int, p: float = 0.8, q: float = 2.0, eps: float = 1e-2):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.p = check_scalar("p", p, low=0.0)
        self.q = check_scalar("q", q, low=0.0)
        self.eps = check_scalar("eps", eps, low=0.0, low_open=True, high=1.0)
        self.register_buffer("cum_samples", torch.zeros(num_classes, dtype=torch.int64))

    _STAT_NAMES = ("cum_samples",)

    def _accumulate(self, labels: torch.Tensor) -> None:
        """Add the foreground label counts of ``labels`` (summed over workers)."""
        c = self.num_classes
        # index_add_ into C + 1 bins, background last, then dropped: no boolean indexing,
        # which would wait for the device to know the foreground count.
        step = torch.zeros(c + 1, dtype=torch.int64, device=self.cum_samples.device)
        step.index_add_(0, labels.to(step.device), torch.ones_like(labels, dtype=torch.int64,
                                                                   device=step.device))
        step = step[:c].contiguous()
        all_reduce_(step)
        self.cum_samples.add_(step)

    def seesaw_log_factors(self, class_logits: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
        """log S_ij [N, C] (detached) for class logits [N, C] and labels [N] in 0..C-1.

        log M_ij = p min(0, log N_j - log N_i), log C_ij = q max(0, log sigma_j -
        log max(sigma_i, eps)); both are 0 at j = i, so the label's own logit is untouched.
        Computed in log space from log_softmax, so a tiny sigma_j does not underflow.
        """
        z = class_logits.detach()
        col = labels[:, None]
        # In place on fresh [N, C] temporaries: none of them is part of the autograd graph.
        if self.q > 0:
            log_s = F.log_softmax(z, dim=1)
            log_self = log_s.gather(1, col).clamp_(min=math.log(self.eps))
            log_s.sub_(log_self).clamp_(min=0.0).mul_(self.q)
        else:
            log_s = torch.zeros_like(z)
        if self.p > 0:
            log_n = self.cum_samples.clamp(min=1).to(z.dtype).log()
            mitigation = (log_n[None, :] - log_n[labels][:, None]).clamp_(max=0.0)
            log_s.add_(mitigation, alpha=self.p)
        return log_s

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                avg_factor: Union[None, float, torch.Tensor] = None) -> torch.Tensor:
        c = self.num_classes
        check_logits(logits, c + 2, "C+2")
        check_labels(labels, logits, 0, c)
        check_finite_logits(logits)
        avg_factor = check_avg_factor(avg_factor, logits)
        if self.training and torch.is_grad_enabled():
            self._accumulate(labels)
        n = logits.shape[0]
        if n == 0:
            return logits.sum() * 0.0
        z = logits.to(compute_dtype(logits))
        class_logits, obj_logits = z[:, :c], z[:, c:]
        fg = labels < c
        # Background rows get class 0 as a stand-in and are multiplied by 0 below: the class
        # term is computed on every row, since selecting the foreground rows would wait for
        # the device to count them.
        cls_labels = torch.where(fg, labels, torch.zeros_like(labels))
        # z_j + log S_ij, added into the detached factors' buffer (add keeps nothing for
        # backward, so the buffer may be reused).
        adjusted = self.seesaw_log_factors(class_logits, cls_labels).add_(class_logits)
        cls = F.cross_entropy(adjusted, cls_labels, reduction="none")
        cls = torch.where(fg, cls, torch.zeros_like(cls)).sum()
        obj = F.cross_entropy(obj_logits, (~fg).long(), reduction="sum")
        return average(cls + obj, avg_factor, n)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(z[:, :C])_j * softmax(z[:, C:])_fg, [N, C], from logits [N, C+2]."""
        c = self.num_classes
        check_logits(logits, c + 2, "C+2")
        return F.softmax(logits[:, :c], dim=1) * F.softmax(logits[:, c:], dim=1)[:, :1]

    def _restart_warning(self, absent):
        return (f"{type(self).__name__}: the state_dict has no {', '.join(absent)}; the "
                "cumulative class counts restart from zero, as for a fresh model.")

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, p={self.p}, q={self.q}, eps={self.eps}"
