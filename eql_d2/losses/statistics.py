"""Accumulated per-class gradient statistics of the gradient-guided losses (EQLv2, EFL, EQFL)."""

import torch

from ..utils.comm import all_reduce_
from ..utils.statistics import RestartableStatistics

__all__ = ["GradientStatistics"]


class GradientStatistics(RestartableStatistics):
    """Base class holding ``pos_grad`` and ``neg_grad``, float32 buffers [C].

    ``pos_grad[j]`` / ``neg_grad[j]``: sum, over every training step so far and over every
    worker, of the gradient magnitudes the loss sent to class j's logit from samples that
    are positive / negative for class j. Subclasses define what the gradient is.

    Statistics change only in :meth:`_accumulate`, which subclasses call once per forward
    in training mode with gradients enabled. Each call sums that step's statistics over the
    default process group (``all_reduce``, SUM) before adding them, so every worker holds the
    same buffers, equal to those of one worker seeing the whole global batch. Every worker
    must therefore run the same number of training forwards. Subclasses whose statistics
    include the loss's 1 / avg_factor set ``_STATS_MEAN_OVER_WORKERS``: DDP applies the mean
    of the workers' gradients, and with an avg_factor averaged over workers that mean, not
    the sum, equals one worker's gradient on the whole batch.

    A subclass (here :class:`~eql_d2.losses.EQLv2Loss` and the EFL family; elsewhere any
    loss with per-class gradient statistics) calls :meth:`_accumulate` with each training
    step's [2, C] sums and derives its weights from :meth:`_raw_ratio`.

    Loading a state_dict that lacks the buffers (a checkpoint from an older model or another
    loss) does not fail (:class:`RestartableStatistics`): the statistics restart from zero,
    as for a fresh model. The statistics describe one training run, so a run started from
    such weights collects its own.
    """

    _STAT_NAMES = ("pos_grad", "neg_grad")
    _STATS_MEAN_OVER_WORKERS = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("pos_grad", torch.zeros(num_classes))
        self.register_buffer("neg_grad", torch.zeros(num_classes))

    def _updating_statistics(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def _accumulate(self, step_stats: torch.Tensor) -> None:
        """Add one step's statistics, step_stats [2, C] (row 0 positives, row 1 negatives)."""
        step = step_stats.to(device=self.pos_grad.device, dtype=self.pos_grad.dtype).contiguous()
        all_reduce_(step, mean=self._STATS_MEAN_OVER_WORKERS)
        self.pos_grad.add_(step[0])
        self.neg_grad.add_(step[1])

    def _raw_ratio(self) -> torch.Tensor:
        """pos_grad / neg_grad [C]; +inf where neg_grad is 0 (no negative gradient seen yet).

        +inf is the limit that makes every gradient-guided weight neutral (EQLv2 weights 1,
        EFL ratio clamped to 1), so a class without statistics is trained like the baseline.
        """
        pos, neg = self.pos_grad, self.neg_grad
        return torch.where(neg > 0, pos / neg.clamp_min(torch.finfo(neg.dtype).tiny),
                           torch.full_like(pos, float("inf")))

    def _restart_warning(self, absent):
        return (f"{type(self).__name__}: the state_dict has no {', '.join(absent)}; the "
                "gradient statistics restart from zero (the loss starts again as its "
                "baseline and re-learns the ratios).")
