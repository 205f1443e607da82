"""Cascade R-CNN heads whose every stage classifies with the EQL box predictor."""

from typing import List

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads
from detectron2.structures import Instances

from .roi_heads import ImageLabelHeads, attach_image_labels

__all__ = ["EQLCascadeROIHeads"]


@ROI_HEADS_REGISTRY.register()
class EQLCascadeROIHeads(ImageLabelHeads, CascadeROIHeads):
    """detectron2's Cascade R-CNN heads (and mask head) with an
    :class:`~eql_d2.modeling.roi_heads.EQLFastRCNNOutputLayers` in every stage, as the EQL
    paper applies EQL to Cascade Mask R-CNN (Tan et al., CVPR 2020, Tab. 1).

    Each stage has its own classification loss module (``MODEL.CLS_LOSS.NAME``), so EQLv2's
    statistics are kept per stage (``box_predictor.<k>.cls_loss.pos_grad`` / ``neg_grad``)
    and logged under ``stage<k>/`` (the cascade's EventStorage name scope). The proposals of
    every stage carry the image-level labels. Inference averages the stages' class
    probabilities, as detectron2's cascade does.
    """

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._check_predictors(self.box_predictor)

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets) -> List[Instances]:
        labelled = super()._match_and_label_boxes(proposals, stage, targets)
        attach_image_labels(labelled, targets)
        return labelled
