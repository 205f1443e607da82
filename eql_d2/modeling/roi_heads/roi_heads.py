"""StandardROIHeads with the EQL box predictor and LVIS image-level category exclusion."""

from typing import List

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Instances

from .fast_rcnn import EQLFastRCNNOutputLayers, check_box_head_keys

__all__ = ["EQLROIHeads", "attach_image_labels", "image_label_args"]


def image_label_args(cfg) -> dict:
    """The EQL heads' image-level label switches, from ``MODEL.EQL``."""
    return {"use_image_level_labels": cfg.MODEL.EQL.USE_IMAGE_LEVEL_LABELS,
            "ignore_not_exhaustive": cfg.MODEL.EQL.IGNORE_NOT_EXHAUSTIVE}


def attach_image_labels(proposals: List[Instances], targets: List[Instances], num_classes: int,
                        use_verified: bool, ignore_not_exhaustive: bool) -> None:
    """Give labelled proposals the image-level masks their loss reads (in place).

    The image's ``gt_verified`` / ``gt_not_exhaustive`` rows (added to the ground truth by
    :class:`~eql_d2.data.ImageLabelDatasetMapper`; every row the image's vector) become

    - ``gt_verified`` [R, C]: kept when ``use_verified``, dropped otherwise;
    - ``gt_ignored`` [R, C] (``ignore_not_exhaustive``): the not-exhaustive categories on
      background proposals, which are then not negatives there.

    An image whose ground truth lacks the fields (no instances) gets all-False masks. A
    batch where images with instances lack them was not mapped for this: an error says so.
    """
    c = num_classes
    needed = use_verified or ignore_not_exhaustive
    for props, target in zip(proposals, targets):
        have = target.has("gt_verified") and target.has("gt_not_exhaustive")
        if needed and not have and len(target) > 0:
            raise RuntimeError(
                "MODEL.EQL.USE_IMAGE_LEVEL_LABELS / IGNORE_NOT_EXHAUSTIVE need each training "
                "image's LVIS image-level labels on its ground truth (fields gt_verified, "
                "gt_not_exhaustive), which eql_d2.data.ImageLabelDatasetMapper adds and "
                "eql_d2's Trainer uses; map the data with it, or turn both keys off")
        device = props.gt_classes.device
        row = (lambda name: target.get(name)[0].to(device)) if have else (
            lambda name: torch.zeros(c, dtype=torch.bool, device=device))
        n = len(props)
        if props.has("gt_verified"):  # copied from the matched boxes by the sampling
            props.remove("gt_verified")
        if props.has("gt_not_exhaustive"):
            props.remove("gt_not_exhaustive")
        if use_verified:
            # a view: the [R, C] mask is only materialised when the batch is concatenated
            props.gt_verified = row("gt_verified").expand(n, c)
        if ignore_not_exhaustive:
            background = props.gt_classes == c
            props.gt_ignored = background[:, None] & row("gt_not_exhaustive")[None, :]


@ROI_HEADS_REGISTRY.register()
class EQLROIHeads(StandardROIHeads):
    """Box (and mask) heads of Faster / Mask R-CNN with :class:`EQLFastRCNNOutputLayers`.

    In training, each sampled proposal gets the image-level masks its loss needs
    (:func:`attach_image_labels`): ``gt_verified`` [R, C] (EQL / EQLv2 with
    ``use_image_level_labels``), the image's positive categories and its verified negatives
    (``neg_category_ids``); ``gt_ignored`` [R, C] (``ignore_not_exhaustive``), the image's
    ``not_exhaustive_category_ids`` on background proposals. They travel with the data:
    :class:`~eql_d2.data.ImageLabelDatasetMapper` puts them on the ground truth, so a plain
    ``GeneralizedRCNN`` carries them here.
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

    @classmethod
    def from_config(cls, cfg, input_shape):
        return dict(super().from_config(cfg, input_shape), **image_label_args(cfg))

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        # The pooler and box head are StandardROIHeads' own; only the predictor differs.
        check_box_head_keys(cfg)
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = EQLFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret

    @property
    def needs_image_labels(self) -> bool:
        """Whether training reads the image-level verified / not-exhaustive sets."""
        return ((self.use_image_level_labels and self.box_predictor.uses_verified)
                or self.ignore_not_exhaustive)

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: List[Instances],
                                   targets: List[Instances]) -> List[Instances]:
        sampled = super().label_and_sample_proposals(proposals, targets)
        attach_image_labels(sampled, targets, self.num_classes,
                            self.use_image_level_labels and self.box_predictor.uses_verified,
                            self.ignore_not_exhaustive)
        return sampled
