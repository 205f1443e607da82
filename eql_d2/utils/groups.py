"""LVIS frequency groups: rare (1-10 training images), common (11-100), frequent (> 100)."""

import functools
from typing import Dict, Sequence, Tuple

import torch

__all__ = ["GROUPS", "GROUP_NAMES", "check_groups", "group_indices", "group_means"]

GROUPS = ("r", "c", "f")
GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}


def check_groups(class_frequency: Sequence[str], num_classes: int = None,
                 what: str = "class_frequency") -> Tuple[str, ...]:
    """`class_frequency` as a tuple after checking each entry is "r", "c" or "f" (and that
    there are `num_classes` of them when given); ValueError naming `what` otherwise."""
    groups = tuple(class_frequency)
    unknown = sorted({g for g in groups if g not in GROUPS})
    if unknown:
        raise ValueError(f"{what} entries must be 'r', 'c' or 'f', got {unknown}")
    if num_classes is not None and len(groups) != num_classes:
        raise ValueError(f"{what} has {len(groups)} entries for {num_classes} categories")
    return groups


@functools.lru_cache(maxsize=32)
def _indices(groups: Tuple[str, ...]) -> Tuple[Tuple[str, torch.Tensor], ...]:
    check_groups(groups)
    out = []
    for group in GROUPS:
        idx = torch.tensor([i for i, g in enumerate(groups) if g == group], dtype=torch.long)
        if idx.numel():
            out.append((group, idx))
    return tuple(out)


def group_indices(class_frequency: Sequence[str]) -> Dict[str, torch.Tensor]:
    """{group: category indices [C_g]} for each group that has categories, in r, c, f order
    (computed once per grouping)."""
    return dict(_indices(tuple(class_frequency)))


def group_means(values: torch.Tensor, class_frequency: Sequence[str]) -> Dict[str, float]:
    """{group: mean of `values` [C] over its categories} for each group with categories.

    Means are taken in the values' floating dtype (integers: float32); `values` is read
    from its device once."""
    if values.numel() != len(class_frequency):
        raise ValueError(f"class_frequency has {len(class_frequency)} entries but the values "
                         f"have {values.numel()}")
    values = values.detach().cpu()
    if not values.is_floating_point():
        values = values.float()
    return {g: values[idx].mean().item() for g, idx in _indices(tuple(class_frequency))}
