"""Federated loss (Zhou et al., "Probabilistic two-stage detection", 2021) for two-stage heads."""

from ...losses import FederatedLoss
from ..category_frequency import category_frequencies
from .base import CLS_LOSS_REGISTRY, ClassificationLoss

__all__ = ["Federated"]


@CLS_LOSS_REGISTRY.register()
class Federated(FederatedLoss, ClassificationLoss):
    """Sigmoid cross-entropy on the batch's positive classes plus classes drawn by
    frequency^``FREQ_WEIGHT_POWER``, ``NUM_CLASSES_SAMPLED`` (``MODEL.CLS_LOSS.FEDERATED``)
    foreground classes in all (column C unused).

    The draw weights come from the training sets' metadata (image frequencies, which are
    proportional to the image counts of one training set; only ratios matter) of any
    LVIS-format dataset, else from the checkpoint (a persistent buffer).
    """

    config_node = "FEDERATED"
    settings = {
        "NUM_CLASSES_SAMPLED": (50, "num_classes_sampled", "foreground classes per iteration: "
                                "the batch's positives plus classes drawn by frequency"),
        "FREQ_WEIGHT_POWER": (0.5, "freq_weight_power", "draw weight of a class: its training "
                              "image frequency to this power"),
    }

    def __init__(self, num_classes: int, class_image_count=None, num_classes_sampled: int = 50,
                 freq_weight_power: float = 0.5):
        super().__init__(num_classes, class_image_count=class_image_count,
                         num_classes_sampled=num_classes_sampled,
                         freq_weight_power=freq_weight_power)

    @classmethod
    def from_config(cls, cfg, num_classes, train_datasets):
        return dict(super().from_config(cfg, num_classes, train_datasets),
                    class_image_count=category_frequencies(train_datasets, num_classes,
                                                           required=False))

    def head_loss(self, logits, labels, avg_factor):
        return self(logits, labels, avg_factor=avg_factor)
