"""Cascade R-CNN heads whose every stage classifies with the EQL box predictor."""

from typing import List

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads
from detectron2.structures import Instances

from .fast_rcnn import EQLFastRCNNOutputLayers, check_box_head_keys
from .roi_heads import attach_image_labels, image_label_args

__all__ = ["EQLCascadeROIHeads"]


@ROI_HEADS_REGISTRY.register()
class EQLCascadeROIHeads(CascadeROIHeads):
    """detectron2's Cascade R-CNN heads (and mask head) with an
    :class:`EQLFastRCNNOutputLayers` in every stage, as the EQL paper applies EQL to Cascade
    Mask R-CNN (Tan et al., CVPR 2020, Tab. 1).

    Each stage has its own classification loss module (``MODEL.EQL.LOSS``), so EQLv2's
    statistics are kept per stage (``box_predictor.<k>.cls_loss.pos_grad`` / ``neg_grad``)
    and logged under ``stage<k>/`` (the cascade's EventStorage name scope). The proposals of every stage get the image-level
    masks of :class:`~eql_d2.modeling.roi_heads.EQLROIHeads` (``MODEL.EQL.USE_IMAGE_LEVEL_LABELS``,
    ``IGNORE_NOT_EXHAUSTIVE``). Inference averages the stages' class probabilities, as
    detectron2's cascade does.
    """

    @configurable
    def __init__(self, *, use_image_level_labels: bool = True,
                 ignore_not_exhaustive: bool = False, **kwargs):
        super().__init__(**kwargs)
        for k, predictor in enumerate(self.box_predictor):
            if not isinstance(predictor, EQLFastRCNNOutputLayers):
                raise ValueError("EQLCascadeROIHeads needs EQLFastRCNNOutputLayers box "
                                 f"predictors, got {type(predictor).__name__} in stage {k}")
        self.use_image_level_labels = bool(use_image_level_labels)
        self.ignore_not_exhaustive = bool(ignore_not_exhaustive)

    @classmethod
    def from_config(cls, cfg, input_shape):
        return dict(super().from_config(cfg, input_shape), **image_label_args(cfg))

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        # The cascade's poolers, heads and matchers; each stage's predictor becomes the EQL
        # one with that stage's box transform.
        check_box_head_keys(cfg)
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictors"] = [
            EQLFastRCNNOutputLayers(cfg, head.output_shape,
                                    box2box_transform=predictor.box2box_transform)
            for head, predictor in zip(ret["box_heads"], ret["box_predictors"])]
        return ret

    def _attach(self, proposals, targets):
        uses_verified = self.box_predictor[0].uses_verified
        attach_image_labels(proposals, targets, self.num_classes,
                            self.use_image_level_labels and uses_verified,
                            self.ignore_not_exhaustive)
        return proposals

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: List[Instances],
                                   targets: List[Instances]) -> List[Instances]:
        return self._attach(super().label_and_sample_proposals(proposals, targets), targets)

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets):
        return self._attach(super()._match_and_label_boxes(proposals, stage, targets), targets)
