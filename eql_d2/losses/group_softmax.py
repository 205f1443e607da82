"""Balanced group softmax (BAGS): Li et al., "Overcoming Classifier Imbalance for Long-tail
Object Detection with Balanced Group Softmax", CVPR 2020, sec. 3.3, with the "others"
sampling and the test-time calibration of the authors' code (FishYuLi/BalancedGroupSoftmax,
``GSBBoxHeadWith0``). Equation numbers are not cited: the paper's text was not at hand."""

import bisect
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (check_avg_factor, check_finite_logits, check_labels, check_logits,
                      check_num_classes, check_scalar)
from ._fused import average, compute_dtype

__all__ = ["BalancedGroupSoftmaxLoss", "group_by_count", "BAGS_GROUP_EDGES"]

# The paper's bins of training instances per category: (0, 10), [10, 100), [100, 1000),
# [1000, inf) -> groups 1..4; group 0 holds the background.
BAGS_GROUP_EDGES = (10, 100, 1000)


def group_by_count(counts: Union[torch.Tensor, Sequence[float]],
                   edges: Sequence[float] = BAGS_GROUP_EDGES) -> torch.Tensor:
    """Group 1..len(edges) + 1 of each category [C] int64: group n holds the counts in
    [edges[n - 2], edges[n - 1]) (group 1 every count below edges[0], zero included)."""
    edges = [float(e) for e in edges]
    if any(b <= a for a, b in zip(edges, edges[1:])) or any(e <= 0 for e in edges):
        raise ValueError(f"group edges must be positive and increasing, got {edges}")
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.dim() != 1 or bool((counts < 0).any()):
        raise ValueError("counts must be a 1-D tensor [C] of non-negative numbers")
    return torch.tensor([1 + bisect.bisect_right(edges, float(n)) for n in counts],
                        dtype=torch.int64)


class BalancedGroupSoftmaxLoss(nn.Module):
    """Balanced group softmax over C + 2 + G logit columns:

    - columns 0..C-1: the categories, each in one of the groups 1..G (``groups``);
    - columns C, C + 1: group 0, [background, foreground ("others" of group 0)];
    - column C + 1 + n: the "others" entry of group n = 1..G.

    Training: a softmax cross-entropy within each group. In group 0 every sample is a target
    (background, or foreground for any category). In group n a sample of a category of group
    n has that category as target, every other sample (background or another group's
    category) has "others"; the loss of group n is taken over its positives and a uniform
    draw without replacement of floor(``others_sample_ratio`` x positives) of its "others"
    samples (all of them if fewer; none when the group has no positive), and divided by
    their number (at least 1). Group 0's term is divided by ``avg_factor``; the loss is the
    sum of the G + 1 terms. ``others_sample_ratio`` <= 0 keeps every "others" sample.
    The draw uses torch's global RNG on the logits' device (seeded per iteration by the
    trainer, so it is reproduced on resume).

    Inference (:meth:`scores`): p_j = p^0_fg * softmax_{g(j)}(z)_j, the probability of
    category j within its group times the foreground probability of group 0 (the group's
    "others" probability is not returned); the background probability is p^0_bg.

    Args:
        groups: [C] group 1..G of each category (e.g. :func:`group_by_count` of the training
            counts), kept in a buffer so that a checkpoint holds them.
        num_groups: G (>= the largest entry of ``groups``; empty groups are allowed: a group
            with no category has only its "others" column and a zero loss).
        others_sample_ratio: "others" samples drawn per positive in groups 1..G (authors: 8).

    Shapes: ``forward(logits [N, C+2+G], labels [N] int in 0..C, C = background,
    avg_factor=None)`` returns a 0-dim loss (None: avg_factor = N); ``scores(logits)``
    returns [N, C].
    """

    def __init__(self, groups: Union[torch.Tensor, Sequence[int]], num_groups: int,
                 others_sample_ratio: float = 8.0):
        super().__init__()
        self.num_groups = check_num_classes(num_groups)
        groups = torch.as_tensor(groups)
        if groups.dim() != 1 or groups.numel() == 0 or groups.is_floating_point():
            raise ValueError(f"groups must be a non-empty 1-D integer tensor [C], got "
                             f"{tuple(groups.shape)} {groups.dtype}")
        if bool((groups < 1).any()) or bool((groups > self.num_groups).any()):
            raise ValueError(f"groups must be in 1..{self.num_groups}, got values in "
                             f"[{int(groups.min())}, {int(groups.max())}]")
        self.num_classes = groups.numel()
        self.others_sample_ratio = check_scalar("others_sample_ratio", others_sample_ratio)
        self.register_buffer("groups", groups.to(torch.int64).clone())
        self._refresh()

    @property
    def width(self) -> int:
        """C + 2 + G logit columns."""
        return self.num_classes + 2 + self.num_groups

    def _refresh(self) -> None:
        """Index tables of the current ``groups`` (after building and loading): ``_order``
        [C + G], the columns of groups 1..G one after another (its "others" column, then its
        categories in order), their (start, length) in ``_slices``, and ``_position`` [C], the
        index of each category within its group's columns."""
        groups = self.groups.tolist()
        if min(groups) < 1 or max(groups) > self.num_groups:
            raise ValueError(f"groups must be in 1..{self.num_groups}, got values in "
                             f"[{min(groups)}, {max(groups)}]")
        order, position, self._slices = [], [0] * self.num_classes, []
        for n in range(1, self.num_groups + 1):
            cats = [j for j, g in enumerate(groups) if g == n]
            self._slices.append((len(order), len(cats) + 1))
            order += [self.num_classes + 1 + n] + cats
            for k, j in enumerate(cats, start=1):
                position[j] = k
        device = self.groups.device
        self.register_buffer("_order", torch.tensor(order, device=device), persistent=False)
        self.register_buffer("_position", torch.tensor(position, device=device),
                             persistent=False)
        self.register_buffer("_categories", torch.tensor(
            [j for j in order if j < self.num_classes], device=device), persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    def _grouped(self, z: torch.Tensor):
        """The logits of groups 1..G, each [N, 1 + its categories] ("others" first)."""
        zg = z.index_select(1, self._order)
        return [zg.narrow(1, start, length) for start, length in self._slices]

    def group_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Target [N, G + 1] within each group, as an index into the group's columns (group
        0: 0 background, 1 foreground; group n: 0 "others", k >= 1 its k-th category)."""
        fg = labels < self.num_classes
        safe = torch.where(fg, labels, torch.zeros_like(labels))
        label_group = torch.where(fg, self.groups[safe], torch.zeros_like(labels))
        position = self._position[safe]
        targets = [fg.long()]
        for n in range(1, self.num_groups + 1):
            targets.append(torch.where(label_group == n, position, torch.zeros_like(labels)))
        return torch.stack(targets, dim=1)

    def sample_mask(self, targets: torch.Tensor) -> torch.Tensor:
        """Rows [N, G + 1] (bool) in each group's loss: all for group 0; for group n its
        positives and floor(ratio x positives) of its "others" rows, drawn uniformly."""
        n_rows = targets.shape[0]
        others = targets[:, 1:] == 0
        positives = ~others
        if self.others_sample_ratio <= 0:
            chosen = torch.ones_like(others)
        else:
            wanted = torch.floor(positives.sum(0).double() * self.others_sample_ratio)
            # a uniform draw without replacement: the rows of smallest random key
            keys = torch.rand(others.shape, device=targets.device)
            keys = keys.masked_fill(~others, 2.0)
            rank = keys.argsort(dim=0).argsort(dim=0)
            chosen = positives | (others & (rank < wanted[None, :]))
        return torch.cat([chosen.new_ones(n_rows, 1), chosen], dim=1)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                avg_factor: Optional[Union[float, torch.Tensor]] = None) -> torch.Tensor:
        c = self.num_classes
        check_logits(logits, self.width, "C+2+G")
        check_labels(labels, logits, 0, c)
        check_finite_logits(logits)
        avg_factor = check_avg_factor(avg_factor, logits)
        z = logits.to(compute_dtype(logits))
        targets = self.group_targets(labels)
        mask = self.sample_mask(targets)
        loss = average(F.cross_entropy(z[:, c:c + 2], targets[:, 0], reduction="sum"),
                       avg_factor, logits.shape[0])
        for n, zn in enumerate(self._grouped(z), start=1):
            per_row = F.cross_entropy(zn, targets[:, n], reduction="none")
            m = mask[:, n]
            loss = loss + torch.where(m, per_row, torch.zeros_like(per_row)).sum() / \
                m.sum().clamp(min=1).to(z.dtype)
        return loss

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """p^0_fg * softmax within the category's group, [N, C]."""
        c = self.num_classes
        check_logits(logits, self.width, "C+2+G")
        fg = F.softmax(logits[:, c:c + 2], dim=1)[:, 1:]
        probs = torch.cat([F.softmax(zn, dim=1)[:, 1:] for zn in self._grouped(logits)], dim=1)
        out = logits.new_zeros(logits.shape[0], c)
        out[:, self._categories] = probs
        return out * fg

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_groups={self.num_groups}, "
                f"others_sample_ratio={self.others_sample_ratio}")
