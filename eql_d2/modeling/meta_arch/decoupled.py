"""The second stage of decoupled training (Kang et al., ICLR 2020: cRT, LWS; Li et al., CVPR
2020: BAGS): an R-CNN started from a first-stage checkpoint with everything frozen except
the modules named in ``MODEL.DECOUPLED.TRAINABLE``."""

import logging
from typing import Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from torch import nn
from torch.nn import functional as F

__all__ = ["DecoupledRCNN", "LWSLinear", "freeze_except"]

logger = logging.getLogger(__name__)

# A second-stage model's state holds this buffer; a checkpoint without it is a first stage's.
STAGE_KEY = "decoupled_stage"


class LWSLinear(nn.Linear):
    """Learnable weight scaling (Kang et al., ICLR 2020, sec. 4): z = (s * W) x + b with a
    per-output scale s [out_features, 1], initialised to 1 (``weight_scale``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.weight_scale = nn.Parameter(torch.ones(out_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.weight_scale, self.bias)


def _covered(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze_except(model: nn.Module, trainable: Sequence[str], key: str) -> None:
    """Set ``requires_grad`` of every parameter of `model` to whether it is in one of the
    `trainable` modules or parameters (dotted names), and turn every BatchNorm layer left
    without a trainable parameter into a FrozenBatchNorm2d (its running statistics then
    stay those of the checkpoint). `key` names the config key in errors."""
    if not trainable:
        raise ValueError(f"{key} is empty: nothing would train")
    names = [n for n, _ in model.named_parameters()]
    for entry in trainable:
        if not any(_covered(n, [entry]) for n in names):
            near = [n for n in names if entry.split(".")[-1] in n][:5]
            raise ValueError(f"{key}: {entry!r} is no module or parameter of the model"
                             + (f" (parameters with a similar name: {near})" if near else ""))
    for name, p in model.named_parameters():
        p.requires_grad_(_covered(name, trainable))
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (nn.BatchNorm2d, nn.SyncBatchNorm)) and not any(
                    p.requires_grad for p in child.parameters()):
                setattr(module, child_name, FrozenBatchNorm2d.convert_frozen_batchnorm(child))


@META_ARCH_REGISTRY.register()
class DecoupledRCNN(GeneralizedRCNN):
    """detectron2's GeneralizedRCNN for a second training stage (``MODEL.DECOUPLED``).

    - Only the modules or parameters in ``TRAINABLE`` train; every other parameter is frozen
      (``requires_grad`` False, so the optimizer never holds it) and BatchNorm layers without
      a trainable parameter become FrozenBatchNorm2d. GroupNorm has no running statistics:
      freezing its parameters freezes it.
    - ``WEIGHT_SCALING``: every ``cls_score`` linear layer under ``roi_heads`` becomes an
      :class:`LWSLinear` (LWS: train ``...cls_score.weight_scale`` alone).
    - Loading ``MODEL.WEIGHTS`` of a first-stage model (a checkpoint without the
      ``decoupled_stage`` entry that every second-stage model saves): the modules in
      ``REINITIALIZE`` keep their initialisation (cRT re-initialises the classifier; BAGS's
      classifier has another layout), and what the first stage does not have (the LWS scales)
      starts at its initial value. A second-stage checkpoint (``--resume``, evaluation) loads
      whole.
    """

    @configurable
    def __init__(self, *, trainable: Sequence[str], reinitialize: Sequence[str] = (),
                 weight_scaling: bool = False, **kwargs):
        """
        Args:
            trainable: dotted names of the modules or parameters that train.
            reinitialize: dotted names of modules not loaded from a first-stage checkpoint.
            weight_scaling: replace the classifiers by :class:`LWSLinear`.
            kwargs: the arguments of GeneralizedRCNN.
        """
        super().__init__(**kwargs)
        # keys a first-stage checkpoint does not have: they start at their initial value
        self._new_keys = {STAGE_KEY}
        if weight_scaling:
            self._scale_classifiers()
        modules = dict(self.named_modules())
        for entry in reinitialize:
            if entry not in modules:
                raise ValueError(f"MODEL.DECOUPLED.REINITIALIZE: {entry!r} is no module of the "
                                 "model")
        self.trainable = tuple(trainable)
        self.reinitialize = tuple(reinitialize)
        freeze_except(self, self.trainable, "MODEL.DECOUPLED.TRAINABLE")
        self.register_buffer(STAGE_KEY, torch.tensor(2))
        self._weights_loaded = False
        self.register_load_state_dict_pre_hook(self._from_first_stage)
        logger.info("Decoupled second stage: training %s (%d parameters), the rest frozen",
                    list(self.trainable),
                    sum(p.numel() for p in self.parameters() if p.requires_grad))

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        node = cfg.MODEL.DECOUPLED
        ret.update(trainable=tuple(node.TRAINABLE), reinitialize=tuple(node.REINITIALIZE),
                   weight_scaling=node.WEIGHT_SCALING)
        return ret

    def forward(self, batched_inputs):
        if self.training and not self._weights_loaded:
            raise ValueError("DecoupledRCNN trains a second stage, but no weights were loaded: "
                             "set MODEL.WEIGHTS to the first stage's model_final.pth")
        return super().forward(batched_inputs)

    def _scale_classifiers(self):
        found = False
        for name, module in list(self.roi_heads.named_modules()):
            for child_name, child in list(module.named_children()):
                if child_name == "cls_score":
                    if type(child) is not nn.Linear:
                        raise ValueError(f"MODEL.DECOUPLED.WEIGHT_SCALING: roi_heads.{name}."
                                         f"cls_score is a {type(child).__name__}; learnable "
                                         "weight scaling needs a linear classifier")
                    lws = LWSLinear(child.in_features, child.out_features).to(child.weight)
                    lws.load_state_dict(child.state_dict(), strict=False)
                    setattr(module, child_name, lws)
                    self._new_keys.add(".".join(filter(None, ("roi_heads", name, child_name,
                                                               "weight_scale"))))
                    found = True
        if not found:
            raise ValueError("MODEL.DECOUPLED.WEIGHT_SCALING: the ROI heads have no cls_score")

    def _from_first_stage(self, module, state_dict, prefix, *args):
        """load_state_dict pre-hook: a first-stage checkpoint (no ``decoupled_stage``) gives
        everything but the modules to re-initialise and what it does not have."""
        self._weights_loaded = True
        if prefix + STAGE_KEY in state_dict:
            return
        own = self.state_dict()
        fresh = [k for k in own if _covered(k, self.reinitialize)]
        for k in list(state_dict):
            if k.startswith(prefix) and _covered(k[len(prefix):], self.reinitialize):
                del state_dict[k]
        for k in fresh + sorted(self._new_keys):
            state_dict[prefix + k] = own[k].detach().clone()
        logger.info("Second stage from first-stage weights: %s keep their initialisation; "
                    "new in this stage: %s", list(self.reinitialize) or "no module",
                    sorted(self._new_keys - {STAGE_KEY}) or "nothing")
