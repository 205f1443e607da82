"""ROI heads with the EQL box predictor and LVIS image-level labels: the mixin both the
standard and the cascade heads share, and the standard heads."""

from typing import List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Instances

from ..cls_losses import cls_loss_class
from .fast_rcnn import EQLFastRCNNOutputLayers, check_box_head_keys

__all__ = ["ImageLabelHeads", "EQLROIHeads", "attach_image_labels", "needs_image_labels"]


def needs_image_labels(cfg) -> bool:
    """Whether training the model of `cfg` reads LVIS image-level labels: ROI heads with
    :class:`ImageLabelHeads` whose loss takes the verified mask (``MODEL.IMAGE_LABELS.VERIFIED``)
    or that ignore not-exhaustive categories (``IGNORE_NOT_EXHAUSTIVE``)."""
    # R-CNNs and their subclasses (a DecoupledRCNN second stage trains the same heads)
    if not issubclass(META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE), GeneralizedRCNN):
        return False
    heads = ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME)
    if not issubclass(heads, ImageLabelHeads):
        return False
    labels = cfg.MODEL.IMAGE_LABELS
    takes_verified = "verified" in cls_loss_class(cfg, "two_stage").inputs
    return (labels.VERIFIED and takes_verified) or labels.IGNORE_NOT_EXHAUSTIVE


def attach_image_labels(proposals: List[Instances], targets: List[Instances]) -> None:
    """Give each image's sampled proposals its image-level labels (in place).

    The ground truth's ``image_labels`` (:class:`~eql_d2.data.image_labels.ImageLabels`, set
    by :class:`~eql_d2.data.ImageLabelDatasetMapper`) hold the image's vectors once; each
    proposal gets an index to them, not an [R, C] copy. Images whose ground truth has no
    ``image_labels`` leave their proposals without them.
    """
    for props, target in zip(proposals, targets):
        if target.has("image_labels"):
            props.image_labels = target.image_labels.with_rows(len(props))


class ImageLabelHeads:
    """Mixin for detectron2 ROI heads whose box predictors are
    :class:`EQLFastRCNNOutputLayers`: their sampled proposals carry the images' LVIS
    image-level labels to the predictor (``image_labels``), at every cascade stage."""

    def _check_predictors(self, predictors):
        for k, predictor in enumerate(predictors):
            if not isinstance(predictor, EQLFastRCNNOutputLayers):
                raise ValueError(f"{type(self).__name__} needs EQLFastRCNNOutputLayers box "
                                 f"predictors, got {type(predictor).__name__} (stage {k})")

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        # detectron2's poolers, box heads (and cascade matchers); each predictor becomes the
        # EQL one, keeping that stage's box transform
        check_box_head_keys(cfg)
        ret = super()._init_box_head(cfg, input_shape)
        if "box_predictors" in ret:  # cascade: one per stage
            ret["box_predictors"] = [
                EQLFastRCNNOutputLayers(cfg, head.output_shape,
                                        box2box_transform=predictor.box2box_transform)
                for head, predictor in zip(ret["box_heads"], ret["box_predictors"])]
        else:
            ret["box_predictor"] = EQLFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: List[Instances],
                                   targets: List[Instances]) -> List[Instances]:
        sampled = super().label_and_sample_proposals(proposals, targets)
        attach_image_labels(sampled, targets)
        return sampled


@ROI_HEADS_REGISTRY.register()
class EQLROIHeads(ImageLabelHeads, StandardROIHeads):
    """Box (and mask) heads of Faster / Mask R-CNN with :class:`EQLFastRCNNOutputLayers`,
    whose classification loss is ``MODEL.CLS_LOSS.NAME``; in training each sampled proposal
    carries its image's LVIS image-level labels (``MODEL.IMAGE_LABELS``)."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._check_predictors([self.box_predictor])
