"""Balanced group softmax (BAGS, Li et al., CVPR 2020) for two-stage heads."""

import logging

import torch
from torch import nn

from ...losses import BalancedGroupSoftmaxLoss, group_by_count
from .base import CLS_LOSS_REGISTRY, ClassificationLoss
from .class_balanced import category_image_counts, data_or_checkpoint

__all__ = ["BAGS", "GroupedLinear"]

logger = logging.getLogger(__name__)


class GroupedLinear(nn.Module):
    """The BAGS classifier: a linear layer (weights N(0, 0.01), bias 0) to the C + 2 + G
    group columns, whose parameters (``linear.weight``, ``linear.bias``) are named apart from
    a softmax classifier's, so that a first-stage checkpoint's classifier never loads into
    it by mistake (a second stage re-initialises it, ``MODEL.DECOUPLED.REINITIALIZE``)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.constant_(self.linear.bias, 0.0)

    @property
    def bias(self) -> torch.Tensor:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@CLS_LOSS_REGISTRY.register()
class BAGS(BalancedGroupSoftmaxLoss, ClassificationLoss):
    """Balanced group softmax (``MODEL.CLS_LOSS.BAGS``) over C + 2 + G columns: C
    categories, group 0's [background, foreground], and the "others" entry of each of the G
    groups; categories grouped by their training images at ``GROUP_EDGES``.

    The groups are a persistent buffer: from the training sets' metadata when it is loaded,
    else from the checkpoint (a model built for inference needs no training data).
    """

    training_data = "the category groups (by class_image_count)"
    config_node = "BAGS"
    settings = {
        "GROUP_EDGES": ((10, 100, 1000), "group_edges", "categories with fewer training images "
                        "than the first edge form group 1, then one group per interval [e_k, "
                        "e_k+1) (the paper's instance bins)"),
        "OTHERS_SAMPLE_RATIO": (8.0, "others_sample_ratio", "'others' samples per positive "
                                "in each group's loss (<= 0: every one)"),
    }

    def __init__(self, num_classes: int, counts=None, group_edges=(10, 100, 1000),
                 others_sample_ratio: float = 8.0):
        num_groups = len(group_edges) + 1
        self.known = counts is not None
        groups = (group_by_count(counts, group_edges) if self.known
                  else torch.ones(num_classes, dtype=torch.int64))
        if groups.numel() != num_classes:
            raise ValueError(f"counts have {groups.numel()} entries for {num_classes} classes")
        super().__init__(groups, num_groups, others_sample_ratio=others_sample_ratio)
        self.extra_columns = 2 + num_groups
        self.register_load_state_dict_pre_hook(data_or_checkpoint("groups", "BAGS groups"))
        if self.known:
            sizes = torch.bincount(self.groups, minlength=num_groups + 1)[1:].tolist()
            logger.info("BAGS: categories per group (edges %s): %s", list(group_edges), sizes)

    @classmethod
    def from_config(cls, cfg, num_classes, train_datasets):
        return dict(super().from_config(cfg, num_classes, train_datasets),
                    counts=category_image_counts(train_datasets, num_classes))

    def classifier(self, in_features, out_features):
        return GroupedLinear(in_features, out_features)

    def init_bias(self, bias, prior_prob, background_fraction):
        pass  # a softmax classifier starts at bias 0, as detectron2's

    def head_loss(self, logits, labels, avg_factor):
        return self(logits, labels, avg_factor=avg_factor)
