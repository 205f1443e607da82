"""Per-frequency-group summaries of per-category loss statistics for EventStorage."""

import torch
from detectron2.utils.events import get_event_storage

__all__ = ["put_group_means"]


def put_group_means(name, values, class_frequency, period=1):
    """Log the mean of `values` over rare / common / frequent categories.

    Args:
        name: scalar prefix; scalars are ``{name}/r``, ``{name}/c``, ``{name}/f``.
        values: tensor [C], one value per category (for example a gradient ratio).
        class_frequency: sequence of C LVIS groups ("r", "c", "f"), e.g. the dataset
            metadata's ``class_frequency``.
        period: log only on iterations that are multiples of it (0 or less: never).

    The scalars reach ``metrics.json`` and TensorBoard through detectron2's writers.
    Groups without categories are skipped. Must run inside an EventStorage.
    """
    if len(class_frequency) != values.numel():
        raise ValueError(
            f"class_frequency has {len(class_frequency)} entries but {name} has {values.numel()}"
        )
    storage = get_event_storage()
    if period <= 0 or storage.iter % period != 0:
        return
    values = values.detach().float().cpu()
    groups = {}
    for group in ("r", "c", "f"):
        mask = torch.tensor([g == group for g in class_frequency], dtype=torch.bool)
        if mask.any():
            groups[f"{name}/{group}"] = values[mask].mean().item()
    storage.put_scalars(smoothing_hint=False, **groups)
