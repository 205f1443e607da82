"""Training statistics for EventStorage, read from the device only on logging iterations.

Reading a tensor on the GPU into a Python number waits for the device. These helpers let
a head log per-iteration quantities without doing so on every iteration: callers test
:func:`logging_due` before computing anything, and the values are read once, on the
iterations that are logged.
"""

from typing import Sequence

import torch
from detectron2.utils.events import get_event_storage

from ..utils.groups import group_means

__all__ = ["WRITER_PERIOD", "logging_due", "put_group_means", "put_scalar_periodically"]

# detectron2's DefaultTrainer writes metrics every 20 iterations (PeriodicWriter).
WRITER_PERIOD = 20


def logging_due(period: int) -> bool:
    """Whether this iteration logs statistics of period ``period`` (``storage.iter %
    period == 0``; never for period <= 0). Must run inside an EventStorage."""
    return period > 0 and get_event_storage().iter % period == 0


def put_group_means(name: str, values: torch.Tensor, class_frequency: Sequence[str],
                    period: int = 1) -> None:
    """Log the mean of `values` over rare / common / frequent categories.

    Args:
        name: scalar prefix; scalars are ``{name}/r``, ``{name}/c``, ``{name}/f``.
        values: tensor [C], one value per category (for example a gradient ratio).
        class_frequency: sequence of C LVIS groups ("r", "c", "f"), e.g. the dataset
            metadata's ``class_frequency``.
        period: log only on iterations that are multiples of it (0 or less: never).

    The scalars (``smoothing_hint=False``: the value of the logged iteration) reach
    ``metrics.json`` and TensorBoard through detectron2's writers. Groups without
    categories are skipped. On other iterations nothing is computed or read; callers
    whose ``values`` cost work to build should test :func:`logging_due` first. Must run
    inside an EventStorage.
    """
    if len(class_frequency) != values.numel():
        raise ValueError(
            f"class_frequency has {len(class_frequency)} entries but {name} has {values.numel()}"
        )
    if not logging_due(period):
        return
    # one read back, on logging iterations only
    means = group_means(values.float(), class_frequency)
    get_event_storage().put_scalars(
        smoothing_hint=False, **{f"{name}/{group}": mean for group, mean in means.items()})


def put_scalar_periodically(name: str, value: torch.Tensor,
                            period: int = WRITER_PERIOD) -> None:
    """Put the 0-dim tensor ``value`` as scalar ``name`` on the iterations where
    :func:`logging_due` (``period``, by default the writers' period); elsewhere it is not
    read.

    The scalar is that iteration's value (``smoothing_hint=False``), recorded at its own
    iteration: a writer's median over the last 20 entries would otherwise mix values that
    are ``period`` iterations apart.
    """
    if logging_due(period):
        get_event_storage().put_scalar(name, value.detach().float().cpu().item(),
                                       smoothing_hint=False)
