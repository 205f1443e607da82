"""The registry of classification losses that eql_d2's heads train with.

A registered loss is an ``nn.Module`` (usually a loss of :mod:`eql_d2.losses` plus
:class:`ClassificationLoss`) that declares what heads need to know, so heads never branch on
loss names:

- ``heads``: which heads accept it: ``"two_stage"`` (the box predictor of Faster / Mask /
  Cascade R-CNN), ``"dense"`` (ATSS, RetinaNet, FCOS) and / or ``"classification"`` (the
  linear classifier of :class:`~eql_d2.modeling.meta_arch.ImageClassifier`: one label per
  image, no background);
- ``extra_columns``: logit columns after the C class columns in a two-stage predictor
  (1: detectron2's background column, used or not; 2: Seesaw's objectness pair); dense
  heads and the image classifier give C columns;
- ``inputs``: the optional inputs it takes besides logits and labels: ``"verified"`` (the
  image-level mask [N, C] of LVIS positive and verified-negative categories) and / or
  ``"quality"`` (the IoU of each positive's predicted box with its ground truth);
- ``config_node`` and ``settings``: its own config node under ``MODEL.CLS_LOSS`` and the keys
  in it, each with its default, the ``__init__`` argument it sets and what it is
  (:meth:`ClassificationLoss.add_config` and :meth:`ClassificationLoss.from_config` use them;
  a loss whose arguments come from elsewhere too extends ``from_config``);
- :meth:`ClassificationLoss.classifier` and :meth:`ClassificationLoss.init_bias`: the
  two-stage classifier layer and its initial bias;
- :meth:`ClassificationLoss.head_loss`: the loss, one call convention for every head;
- :meth:`ClassificationLoss.scores`: inference probabilities [N, C];
- :meth:`ClassificationLoss.statistics`: per-category tensors logged by r/c/f group.

A new loss is one file that registers a class (see docs/GETTING_STARTED.md, "Adding a
loss"); the config names it by registry name in ``MODEL.CLS_LOSS.NAME`` (case and ``_`` do
not matter).
"""

import math
from typing import Any, Dict, Optional, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.utils.registry import Registry
from torch import nn

__all__ = ["CLS_LOSS_REGISTRY", "ClassificationLoss", "add_cls_loss_configs", "build_cls_loss",
           "cls_loss_class", "resolve_loss_name", "losses_for_head", "HEAD_DEFAULTS"]

CLS_LOSS_REGISTRY = Registry("CLS_LOSS")
CLS_LOSS_REGISTRY.__doc__ = """Classification losses of eql_d2's heads (ClassificationLoss
subclasses), named in MODEL.CLS_LOSS.NAME."""

HEADS = ("two_stage", "dense", "classification")
INPUTS = ("verified", "quality")

# MODEL.CLS_LOSS.NAME "" means the loss detectron2 trains each kind of head with.
HEAD_DEFAULTS = {"two_stage": "SoftmaxCE", "dense": "Focal", "classification": "SoftmaxCE"}


class ClassificationLoss:
    """Mixin declaring what a head needs from its classification loss (see module doc)."""

    heads: Tuple[str, ...] = ("two_stage",)
    extra_columns: int = 1
    inputs: Tuple[str, ...] = ()
    # prefix of the logged group means of :meth:`statistics` (None: nothing logged)
    statistics_name: Optional[str] = None
    # name of its node under MODEL.CLS_LOSS (None: the loss has no settings) and its keys:
    # {KEY: (default, __init__ argument, what it is)}
    config_node: Optional[str] = None
    settings: Dict[str, Tuple[Any, str, str]] = {}
    # A loss built from the training sets' metadata names what it reads there; ``known`` is
    # False while that has not arrived (built for inference and no checkpoint loaded yet),
    # and :meth:`check_trainable` then refuses to train. ``prepare_call`` loads the metadata.
    training_data: Optional[str] = None
    known: bool = True
    train_datasets: Tuple[str, ...] = ()
    prepare_call: str = "eql_d2.engine.prepare_datasets(cfg)"

    @classmethod
    def add_config(cls, node: CfgNode) -> None:
        """Add ``MODEL.CLS_LOSS.<config_node>`` with the defaults of :attr:`settings` to
        ``MODEL.CLS_LOSS`` (`node`)."""
        if cls.config_node:
            node[cls.config_node] = CfgNode({key: default for key, (default, _, _)
                                             in cls.settings.items()})

    @classmethod
    def from_config(cls, cfg, num_classes: int, train_datasets: Tuple[str, ...]) -> dict:
        """Keyword arguments of ``__init__``: ``num_classes`` and those of :attr:`settings`,
        from ``MODEL.CLS_LOSS.<config_node>``."""
        ret = {"num_classes": num_classes}
        if cls.config_node:
            node = cfg.MODEL.CLS_LOSS[cls.config_node]
            ret.update({arg: node[key] for key, (_, arg, _) in cls.settings.items()})
        return ret

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

    def head_loss(self, logits: torch.Tensor, labels: torch.Tensor, avg_factor,
                  **inputs) -> torch.Tensor:
        """The sum of the loss over entries divided by ``avg_factor``, for every head.

        Two-stage heads: logits [N, C + extra_columns], labels [N] in 0..C (C: background),
        avg_factor the number of sampled proposals. Dense heads: logits [N, C], labels [N] in
        {-1 ignored, 0..C-1, C background}, avg_factor the number of positives (averaged over
        workers, at least 1). Classification heads: logits [N, C], labels [N] in 0..C-1 (no
        background), avg_factor N, the images of this process's batch. ``inputs``: exactly
        the names in :attr:`inputs` —
        ``verified`` [N, C] bool or None (no image-level labels), ``quality`` [N] float.
        """
        raise NotImplementedError(f"{type(self).__name__} must define head_loss")

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities [N, C] of the C categories from the head's logits."""
        return torch.sigmoid(logits[:, : self.num_classes])

    def statistics(self) -> Dict[str, torch.Tensor]:
        """Per-category tensors [C] logged as group means (``<statistics_name>/<key>/r``)."""
        return {}

    def check_trainable(self) -> None:
        """Raise, before any compute, if the loss lacks something training needs: by default
        the :attr:`training_data` it is built from, while it has not arrived."""
        if not self.known:
            raise ValueError(
                f"MODEL.CLS_LOSS.NAME {type(self).__name__} cannot train this model: "
                f"{self.training_data} of DATASETS.TRAIN {list(self.train_datasets)} come from "
                "their metadata, which was not loaded when the model was built, and no loaded "
                f"checkpoint had them. Call {self.prepare_call} before building the model "
                "(train_net.py does)")


def _normalized(name: str) -> str:
    return name.lower().replace("_", "")


def resolve_loss_name(name: str) -> str:
    """The registry name that `name` (any case, ``_``-insensitive) means; KeyError if none."""
    wanted = _normalized(name)
    for registered, _ in CLS_LOSS_REGISTRY:
        if _normalized(registered) == wanted:
            return registered
    raise KeyError(name)


def losses_for_head(head: str):
    """Registry names of the losses a head accepts, sorted."""
    return sorted(name for name, cls in CLS_LOSS_REGISTRY if head in cls.heads)


def add_cls_loss_configs(node: CfgNode) -> None:
    """Let every registered loss add its settings to ``MODEL.CLS_LOSS`` (`node`)."""
    for name, cls in sorted(CLS_LOSS_REGISTRY, key=lambda item: item[0]):
        before = dict(node)
        cls.add_config(node)
        replaced = sorted(k for k, v in before.items() if node.get(k) is not v)
        if replaced:
            raise ValueError(f"{name}.add_config replaced MODEL.CLS_LOSS.{replaced[0]}, which "
                             "another loss or eql_d2 already defines; give it a node of its own")


def cls_loss_class(cfg, head: str):
    """The registered loss class named by ``MODEL.CLS_LOSS.NAME`` for a head (``"two_stage"``,
    ``"dense"`` or ``"classification"``; an empty name means :data:`HEAD_DEFAULTS`).

    Raises ValueError naming the key when the name is unknown or the loss does not work with
    this kind of head.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    name = cfg.MODEL.CLS_LOSS.NAME or HEAD_DEFAULTS[head]
    try:
        registered = resolve_loss_name(name)
    except KeyError:
        raise ValueError(f"MODEL.CLS_LOSS.NAME {name!r} is not a registered classification "
                         f"loss; {head} heads take: {', '.join(losses_for_head(head))}") from None
    cls = CLS_LOSS_REGISTRY.get(registered)
    if head not in cls.heads:
        raise ValueError(f"MODEL.CLS_LOSS.NAME {name!r} ({registered}) does not work with "
                         f"{head} heads; they take: {', '.join(losses_for_head(head))}")
    unknown = sorted(set(cls.inputs) - set(INPUTS))
    if unknown:
        raise ValueError(f"{registered} declares inputs {unknown}; heads give {list(INPUTS)}")
    if head == "dense" and "verified" in cls.inputs:
        raise ValueError(f"{registered} needs image-level labels, which dense heads do not give")
    if head == "classification" and cls.inputs:
        raise ValueError(f"{registered} takes {list(cls.inputs)}, which the image classifier "
                         "does not give (one label per image)")
    return cls


def build_cls_loss(cfg, num_classes: int, head: str) -> nn.Module:
    """The loss of :func:`cls_loss_class`, built with its settings from the config."""
    cls = cls_loss_class(cfg, head)
    train_datasets = tuple(cfg.DATASETS.TRAIN)
    loss = cls(**cls.from_config(cfg, num_classes, train_datasets))
    loss.train_datasets = train_datasets  # what check_trainable names
    return loss
