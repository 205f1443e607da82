"""The registry of classification losses that eql_d2's heads train with.

A registered loss is an ``nn.Module`` (usually a loss of :mod:`eql_d2.losses` plus
:class:`ClassificationLoss`) that declares what heads need to know, so heads never branch on
loss names:

- ``heads``: which heads accept it: ``"two_stage"`` (the EQL box predictor of Faster / Mask /
  Cascade R-CNN) and / or ``"dense"`` (ATSS, RetinaNet, FCOS);
- ``extra_columns``: logit columns after the C class columns in a two-stage predictor
  (1: detectron2's background column, used or not; 2: Seesaw's objectness pair); dense
  heads give C columns;
- ``uses_verified``: takes the image-level ``verified`` mask [N, C] (LVIS positive and
  verified-negative categories); ``uses_quality``: takes the IoU quality of positives;
- :meth:`ClassificationLoss.classifier` and :meth:`ClassificationLoss.init_bias`: the
  two-stage classifier layer and its initial bias;
- :meth:`ClassificationLoss.head_loss`: the loss, one call convention for every entry;
- :meth:`ClassificationLoss.scores`: inference probabilities [N, C];
- :meth:`ClassificationLoss.statistics`: per-category tensors logged by r/c/f group;
- :meth:`ClassificationLoss.from_config`: its settings, from its own config node.

A new loss is one file that registers a class, plus its config node (see README, "Adding a
loss"). The config names it by registry name (case and ``_`` do not matter; the names
earlier versions used, such as ``softmax`` and ``sigmoid``, keep working) in
``MODEL.EQL.LOSS`` (two-stage heads) or ``MODEL.EFL.LOSS`` (dense heads).
"""

import math
from typing import Dict, Optional, Tuple

import torch
from detectron2.utils.registry import Registry
from torch import nn

__all__ = ["CLS_LOSS_REGISTRY", "ClassificationLoss", "build_cls_loss", "resolve_loss_name",
           "losses_for_head"]

CLS_LOSS_REGISTRY = Registry("CLS_LOSS")
CLS_LOSS_REGISTRY.__doc__ = """Classification losses of eql_d2's heads (ClassificationLoss
subclasses), named in MODEL.EQL.LOSS (two-stage) and MODEL.EFL.LOSS (dense)."""

HEADS = ("two_stage", "dense")

# Names of earlier versions that differ from a registry name by more than case and "_".
_ALIASES = {"softmax": "SoftmaxCE", "sigmoid": "SigmoidCE"}


class ClassificationLoss:
    """Mixin declaring what a head needs from its classification loss (see module doc)."""

    heads: Tuple[str, ...] = ("two_stage",)
    extra_columns: int = 1
    uses_verified: bool = False
    uses_quality: bool = False
    # prefix of the logged group means of :meth:`statistics` (None: nothing logged)
    statistics_name: Optional[str] = None

    @classmethod
    def from_config(cls, cfg, num_classes: int, train_datasets: Tuple[str, ...]) -> dict:
        """Keyword arguments of ``__init__`` from the config (default: ``num_classes``)."""
        return {"num_classes": num_classes}

    def classifier(self, in_features: int, out_features: int) -> nn.Module:
        """The two-stage classification layer (default: detectron2's linear layer)."""
        layer = nn.Linear(in_features, out_features)
        nn.init.normal_(layer.weight, std=0.01)
        nn.init.constant_(layer.bias, 0.0)
        return layer

    def init_bias(self, bias: torch.Tensor, prior_prob: float,
                  background_fraction: float) -> None:
        """Initialise a two-stage classifier bias [C + extra_columns] in place. Default:
        sigmoid-type, every category starts at probability ``prior_prob``."""
        nn.init.constant_(bias[: self.num_classes], -math.log((1 - prior_prob) / prior_prob))

    def head_loss(self, logits: torch.Tensor, labels: torch.Tensor, *,
                  verified: Optional[torch.Tensor] = None, normalizer=None,
                  quality: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss of logits for labels, one convention for every entry.

        Two-stage heads: logits [N, C + extra_columns], labels [N] in 0..C (C: background),
        normalizer None (the loss averages over its rows), verified [N, C] bool or None.
        Dense heads: logits [N, C], labels [N] in {-1 ignored, 0..C-1, C background},
        normalizer > 0 (the loss is a sum divided by it), quality [N] or None.
        """
        raise NotImplementedError(f"{type(self).__name__} must define head_loss")

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities [N, C] of the C categories from the head's logits."""
        return torch.sigmoid(logits[:, : self.num_classes])

    def statistics(self) -> Dict[str, torch.Tensor]:
        """Per-category tensors [C] logged as group means (``<statistics_name>/<key>/r``)."""
        return {}

    def check_trainable(self) -> None:
        """Raise, before any compute, if the loss lacks something training needs."""


def _normalized(name: str) -> str:
    return name.lower().replace("_", "")


def resolve_loss_name(name: str) -> str:
    """The registry name that `name` (any case, ``_``-insensitive, or an earlier alias) means."""
    wanted = _normalized(_ALIASES.get(name.lower(), name))
    for registered, _ in CLS_LOSS_REGISTRY:
        if _normalized(registered) == wanted:
            return registered
    raise KeyError(name)


def losses_for_head(head: str):
    """Registry names of the losses a head accepts, sorted."""
    return sorted(name for name, cls in CLS_LOSS_REGISTRY if head in cls.heads)


def build_cls_loss(cfg, key: str, num_classes: int, head: str) -> nn.Module:
    """The registered loss named by config key `key` (e.g. ``"MODEL.EQL.LOSS"``) for a head.

    Raises ValueError naming the key when the name is unknown or the loss does not work with
    this kind of head.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    node = cfg
    for part in key.split("."):
        node = node[part]
    name = node
    try:
        registered = resolve_loss_name(name)
    except KeyError:
        raise ValueError(f"{key} {name!r} is not a registered classification loss; "
                         f"{head} heads take: {', '.join(losses_for_head(head))}") from None
    cls = CLS_LOSS_REGISTRY.get(registered)
    if head not in cls.heads:
        raise ValueError(f"{key} {name!r} ({registered}) does not work with {head} heads; they "
                         f"take: {', '.join(losses_for_head(head))}")
    if head == "dense" and cls.uses_verified:
        raise ValueError(f"{registered} needs image-level labels, which dense heads do not give")
    return cls(**cls.from_config(cfg, num_classes, tuple(cfg.DATASETS.TRAIN)))
