"""StandardROIHeads with the EQL box predictor and LVIS image-level category exclusion."""

import contextlib
from typing import List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Instances

from .fast_rcnn import EQLFastRCNNOutputLayers
from .image_labels import ImageLabels

__all__ = ["EQLROIHeads"]


@ROI_HEADS_REGISTRY.register()
class EQLROIHeads(StandardROIHeads):
    """Box (and mask) heads of Faster / Mask R-CNN with :class:`EQLFastRCNNOutputLayers`.

    In training, each sampled proposal gets the image-level masks its loss needs:

    - ``gt_verified`` [R, C] (EQL / EQLv2 with ``use_image_level_labels``): True for the
      image's positive categories (its annotated classes) and its verified negatives
      (``neg_category_ids``);
    - ``gt_ignored`` [R, C] (``ignore_not_exhaustive``): True on background proposals for
      the image's ``not_exhaustive_category_ids``, which are then not negatives there.

    The negative and not-exhaustive sets come from the meta-architecture through
    :meth:`image_level_labels` (``ImageLabelRCNN`` does it); the heads raise if they need
    them and none were given.
    """

    @configurable
    def __init__(self, *, use_image_level_labels: bool = True,
                 ignore_not_exhaustive: bool = False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(self.box_predictor, EQLFastRCNNOutputLayers):
            raise ValueError("EQLROIHeads needs an EQLFastRCNNOutputLayers box predictor, got "
                             f"{type(self.box_predictor).__name__}")
        self.use_image_level_labels = bool(use_image_level_labels)
        self.ignore_not_exhaustive = bool(ignore_not_exhaustive)
        self._image_labels: Optional[List[ImageLabels]] = None

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["use_image_level_labels"] = cfg.MODEL.EQL.USE_IMAGE_LEVEL_LABELS
        ret["ignore_not_exhaustive"] = cfg.MODEL.EQL.IGNORE_NOT_EXHAUSTIVE
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        # The pooler and box head are StandardROIHeads' own; only the predictor differs.
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = EQLFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret

    @property
    def needs_image_labels(self) -> bool:
        """Whether training reads the image-level negative / not-exhaustive sets."""
        return ((self.use_image_level_labels and self.box_predictor.uses_verified)
                or self.ignore_not_exhaustive)

    @contextlib.contextmanager
    def image_level_labels(self, labels: List[ImageLabels]):
        """Within this context, training forwards use `labels` (one per image, batch order).

        GeneralizedRCNN calls its ROI heads with a fixed signature, so the meta-architecture
        hands the labels over around its forward instead of through the call.
        """
        if self._image_labels is not None:
            raise RuntimeError("EQLROIHeads.image_level_labels contexts cannot be nested")
        self._image_labels = list(labels)
        try:
            yield self
        finally:
            self._image_labels = None

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: List[Instances],
                                   targets: List[Instances]) -> List[Instances]:
        sampled = super().label_and_sample_proposals(proposals, targets)
        if not self.needs_image_labels:
            return sampled
        labels = self._image_labels
        if labels is None:
            raise RuntimeError(
                "MODEL.EQL.USE_IMAGE_LEVEL_LABELS / IGNORE_NOT_EXHAUSTIVE need each image's LVIS "
                "labels, but the ROI heads received none: set MODEL.META_ARCHITECTURE "
                "'ImageLabelRCNN' (or turn both keys off)")
        if len(labels) != len(sampled):
            raise ValueError(f"got image-level labels for {len(labels)} images but "
                             f"{len(sampled)} images of proposals")
        c = self.num_classes
        for props, target, image in zip(sampled, targets, labels):
            device = props.gt_classes.device
            if self.use_image_level_labels and self.box_predictor.uses_verified:
                verified = torch.zeros(c, dtype=torch.bool, device=device)
                verified[target.gt_classes.to(device)] = True
                verified[image.negative.to(device)] = True
                # A view: the [R, C] mask is only materialised when the batch is concatenated.
                props.gt_verified = verified.expand(len(props), c)
            if self.ignore_not_exhaustive:
                columns = torch.zeros(c, dtype=torch.bool, device=device)
                columns[image.not_exhaustive.to(device)] = True
                background = props.gt_classes == c
                props.gt_ignored = background[:, None] & columns[None, :]
        return sampled
