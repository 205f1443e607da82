"""Accumulated per-class gradient statistics of the gradient-guided losses (EQLv2, EFL, EQFL)."""

import warnings
from typing import List, Tuple

import torch
from torch import nn

__all__ = ["GradientStatistics", "RestartableStatistics"]


def _all_reduce_sum(t: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """Sum (or average) ``t`` over the default process group, when one is initialized
    (in place)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if mean:
            t /= dist.get_world_size()
    return t


class RestartableStatistics(nn.Module):
    """A module whose statistics buffers (names in ``_STAT_NAMES``) describe one training run.

    Loading a state_dict that lacks any of them (a checkpoint written before they existed,
    or by another loss) does not fail: all of them restart from zero, as for a fresh model
    (part of a set would mix statistics of two runs), and a ``UserWarning`` from
    :meth:`_restart_warning` names the missing keys.
    """

    _STAT_NAMES: Tuple[str, ...] = ()

    def reset_statistics(self) -> None:
        """Forget the accumulated statistics (back to the state before the first step)."""
        for name in self._STAT_NAMES:
            getattr(self, name).zero_()

    def _restart_warning(self, absent: List[str]) -> str:
        return (f"{type(self).__name__}: the state_dict has no {', '.join(absent)}; the "
                "statistics restart from zero.")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        absent = [prefix + n for n in self._STAT_NAMES if prefix + n not in state_dict]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if absent:
            for key in absent:
                if key in missing_keys:
                    missing_keys.remove(key)
            self.reset_statistics()
            warnings.warn(self._restart_warning(absent), UserWarning, stacklevel=2)


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
    include the loss's normalizer set ``_STATS_MEAN_OVER_WORKERS``: DDP applies the mean of
    the workers' gradients, and with a normalizer averaged over workers that mean, not the
    sum, equals one worker's gradient on the whole batch.

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
        _all_reduce_sum(step, mean=self._STATS_MEAN_OVER_WORKERS)
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
