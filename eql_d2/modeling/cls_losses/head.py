"""How every head runs its classification loss: one call for two-stage and dense heads."""

import logging
from typing import Optional, Sequence

import torch

from ..regime import RegimeIndicators
from ..stats_logging import logging_due, put_group_means

__all__ = ["head_classification_loss"]

logger = logging.getLogger(__name__)


def head_classification_loss(criterion, logits: torch.Tensor, labels: torch.Tensor,
                             avg_factor, *, regime: Optional[RegimeIndicators] = None,
                             observed_logits: Optional[torch.Tensor] = None,
                             class_groups: Optional[Sequence[str]] = None,
                             log_period: int = 0, **available) -> torch.Tensor:
    """``criterion.head_loss(logits, labels, avg_factor, **inputs)`` with the bookkeeping
    every head does around it.

    Args:
        criterion: a registered classification loss (see :mod:`.base`).
        logits, labels, avg_factor: as for ``head_loss``.
        regime: regime indicators to update from this loss (None: none kept).
        observed_logits: the logits the indicators observe when ``logits`` had entries
            taken out of the loss (default: ``logits``).
        class_groups: C LVIS groups ("r", "c", "f") of the training set; the loss's
            :meth:`statistics` are logged by group every ``log_period`` iterations
            (``MODEL.CLS_LOSS.LOG_PERIOD``) when known.
        available: the optional inputs the head can give (``verified``, ``quality``); the
            loss receives exactly those it declares in ``criterion.inputs``.
    """
    training = criterion.training and torch.is_grad_enabled()
    if criterion.training:
        criterion.check_trainable()
    missing = [name for name in criterion.inputs if name not in available]
    if missing:
        raise ValueError(f"{type(criterion).__name__} takes {missing}, which this head does "
                         "not give")
    inputs = {name: available[name] for name in criterion.inputs}
    loss = criterion.head_loss(logits, labels, avg_factor, **inputs)
    if regime is not None:
        regime.observe(loss, logits if observed_logits is None else observed_logits, labels)
    name = criterion.statistics_name
    if name and training and log_period > 0:
        if class_groups is None:
            # said once per loss, when training starts: a model built for inference has no
            # groups and needs none
            if not getattr(criterion, "_warned_no_groups", False):
                criterion._warned_no_groups = True
                logger.warning("MODEL.CLS_LOSS.LOG_PERIOD = %d, but the training set has no "
                               "class_frequency (r/c/f) in its metadata: %s's statistics are "
                               "not logged by group", log_period, type(criterion).__name__)
        elif logging_due(log_period):
            for key, values in criterion.statistics().items():
                put_group_means(f"{name}/{key}", values, class_groups, log_period)
    return loss
