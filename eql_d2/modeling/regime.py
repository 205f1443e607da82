"""Regime indicators: how imbalanced each category's training is, measured the same way for
every classification loss.

The EQLv2 and EFL papers describe the long-tailed regime by two per-category quantities:
the ratio of positive to negative samples a category sees (EFL, Fig. 2) and the accumulated
gradient ratio g^j = (sum of |dL/dz_j| over positives) / (sum over negatives), which EQLv2
and EFL use to reweight and which stays far below 1 for LVIS's rare categories. The
gradient-guided losses keep g^j for their own use; the baselines (softmax, sigmoid, focal)
do not. :class:`RegimeIndicators` accumulates both quantities from the gradient that the
head's classification loss actually sends to its logits, whatever the loss, so that a
baseline run shows the regime it trains in and runs with different losses compare.
"""

import torch

from ..utils.comm import all_reduce_, world_size
from ..utils.statistics import RestartableStatistics

__all__ = ["RegimeIndicators"]

# Under float16 logits the gradient of a loss w.r.t. them is float16 too, whose smallest
# subnormal is 6e-8: the negatives of a rare category (focal: ~p^3 each) would be flushed to
# zero. The gradient is taken at this scale and divided out in float64. Gradients of the
# heads' losses are at most ~1, so 2^12 cannot overflow float16 (max 65504).
_FP16_SCALE = 2.0 ** 12


class RegimeIndicators(RestartableStatistics):
    """Per-category counts of positive / negative samples and sums of gradient magnitudes.

    Buffers, float64 [C], all summed over training steps (saved in checkpoints):

    - ``pos_count[j]``, ``neg_count[j]``: samples (anchors or proposals) that are positive /
      negative for category j: rows with label j, and rows with any other non-ignored label;
    - ``pos_grad[j]``, ``neg_grad[j]``: sum of |dL/dz_ij| over those positive / negative rows,
      where L is the classification loss the head trains with (after its normalizer, before
      any loss weight) and z_ij the logit of category j. Entries the loss excludes (EQL's
      tail weights, ignored or unverified entries) contribute their actual gradient, 0.

    :attr:`gradient_ratio` = pos_grad / neg_grad is the raw (unclamped) g^j of the EQLv2 and
    EFL papers; for EQLv2 and EFL it matches their own statistics up to a constant factor.

    With several processes each step's sums are combined over workers before they are added:
    counts are summed; gradient sums are averaged, because DDP applies the mean of the
    workers' gradients (so they equal one process's on the whole batch when the loss is
    normalized over the global batch, as the dense heads do, or when each worker has the
    same number of rows, as the two-stage heads do). Every worker must call :meth:`observe`
    on the same training steps.
    """

    _STAT_NAMES = ("pos_count", "neg_count", "pos_grad", "neg_grad")

    def __init__(self, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        for name in self._STAT_NAMES:
            self.register_buffer(name, torch.zeros(num_classes, dtype=torch.float64))

    @property
    def gradient_ratio(self) -> torch.Tensor:
        """Raw g^j = pos_grad / neg_grad [C]; +inf where no negative gradient was seen."""
        neg = self.neg_grad
        return torch.where(neg > 0, self.pos_grad / neg.clamp_min(1e-300),
                           torch.full_like(neg, float("inf")))

    def observe(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one training step.

        Args:
            loss: the 0-dim classification loss computed from ``logits``.
            logits: [N, K] with K >= C; columns past C (a background or objectness column)
                are not categories and are not observed.
            labels: [N] int: -1 ignored, 0..C-1 the category, >= C background.

        Costs one extra backward pass through the loss alone (not the network), which keeps
        the graph for the training backward. Does nothing outside training mode, without
        autograd, or when ``logits`` does not require a gradient.
        """
        if not (self.training and torch.is_grad_enabled() and logits.requires_grad):
            return
        c = self.num_classes
        if logits.dim() != 2 or logits.shape[1] < c or labels.shape != logits.shape[:1]:
            raise ValueError(f"RegimeIndicators({c}): logits {tuple(logits.shape)} and labels "
                             f"{tuple(labels.shape)} must be [N, K >= {c}] and [N]")
        scale = _FP16_SCALE if logits.dtype == torch.float16 else 1.0
        (grad,) = torch.autograd.grad(loss, logits, grad_outputs=torch.full_like(loss, scale),
                                      retain_graph=True, allow_unused=True)
        if grad is None:
            return
        # float16 -> float32; not in place: a loss's backward may return a saved tensor
        grad = grad.detach()[:, :c].to(torch.promote_types(grad.dtype, torch.float32)).abs()
        if scale != 1.0:
            grad /= scale
        labels = labels.detach()
        valid = labels >= 0
        fg = valid & (labels < c)
        cls = labels.clamp(0, c - 1)
        f64 = torch.float64
        pos_count = torch.zeros(c, dtype=f64, device=grad.device)
        pos_count.index_add_(0, cls, fg.to(f64))
        neg_count = valid.sum().to(f64) - pos_count
        # each row's gradient at its own label, 0 for background and ignored rows
        own = grad.gather(1, cls[:, None]).squeeze(1).to(f64) * fg.to(f64)
        pos_grad = torch.zeros(c, dtype=f64, device=grad.device)
        pos_grad.index_add_(0, cls, own)
        # summed in float64: a rare category's negatives (~1e-9 each) next to its positives
        neg_grad = grad.masked_fill(~valid[:, None], 0.0).sum(dim=0, dtype=f64) - pos_grad
        step = all_reduce_(torch.stack([pos_count, neg_count, pos_grad, neg_grad]))
        step[2:] /= world_size()
        self.pos_count.add_(step[0])
        self.neg_count.add_(step[1])
        self.pos_grad.add_(step[2].clamp_min(0.0))
        self.neg_grad.add_(step[3].clamp_min(0.0))

    def snapshot(self) -> dict:
        """The four buffers as lists of floats (one read from the device)."""
        values = torch.stack([getattr(self, n) for n in self._STAT_NAMES]).cpu().tolist()
        return dict(zip(self._STAT_NAMES, values))

    def _restart_warning(self, absent):
        return (f"the checkpoint has no regime indicators ({', '.join(absent)}), written "
                "before they existed: they restart from zero")
