"""Cascade R-CNN heads whose every stage classifies with the EQL box predictor."""

from typing import List

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.modeling.sampling import subsample_labels
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage, get_event_storage

from .roi_heads import ImageLabelHeads, attach_image_labels

__all__ = ["EQLCascadeROIHeads", "TEST_SCORES"]

# MODEL.ROI_BOX_CASCADE_HEAD.TEST_SCORES: how the stages' classifications make the score
TEST_SCORES = ("mean_probs", "mean_logits", "stage1", "stage2", "stage3")


@ROI_HEADS_REGISTRY.register()
class EQLCascadeROIHeads(ImageLabelHeads, CascadeROIHeads):
    """detectron2's Cascade R-CNN heads (and mask head) with an
    :class:`~eql_d2.modeling.roi_heads.EQLFastRCNNOutputLayers` in every stage, as the EQL
    paper applies EQL to Cascade Mask R-CNN (Tan et al., CVPR 2020, Tab. 1).

    Each stage has its own classification loss module (``MODEL.CLS_LOSS.NAME``), so EQLv2's
    statistics are kept per stage (``box_predictor.<k>.cls_loss.pos_grad`` / ``neg_grad``)
    and logged under ``stage<k>/`` (the cascade's EventStorage name scope). The proposals of
    every stage carry the image-level labels.

    Inference scores (``test_scores``, ``MODEL.ROI_BOX_CASCADE_HEAD.TEST_SCORES``): the mean
    of the stages' probabilities ("mean_probs", detectron2's cascade), the loss's
    probabilities of the mean of the stages' logits ("mean_logits", mmdetection's cascade,
    which the EQLv2 authors' code base uses), or one stage's alone ("stage1".."stage3");
    boxes are always the last stage's.

    Training proposals of stages 2 and 3 (``sample_every_stage``,
    ``MODEL.ROI_BOX_CASCADE_HEAD.SAMPLE_EVERY_STAGE``): detectron2 classifies every box the
    previous stage regressed from its sampled proposals, so the later stages see mostly
    foreground; True samples them again as the first stage does (ground-truth boxes added,
    ``ROI_HEADS.BATCH_SIZE_PER_IMAGE`` with at most ``POSITIVE_FRACTION`` foreground), as
    mmdetection's cascade does with its per-stage samplers.
    """

    @configurable
    def __init__(self, *, test_scores: str = "mean_probs", sample_every_stage: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.sample_every_stage = sample_every_stage
        self._check_predictors(self.box_predictor)
        if test_scores not in TEST_SCORES[: 2 + self.num_cascade_stages]:
            raise ValueError(f"MODEL.ROI_BOX_CASCADE_HEAD.TEST_SCORES {test_scores!r} is not one "
                             f"of {', '.join(TEST_SCORES[: 2 + self.num_cascade_stages])}")
        self.test_scores = test_scores

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["test_scores"] = cfg.MODEL.ROI_BOX_CASCADE_HEAD.TEST_SCORES
        ret["sample_every_stage"] = cfg.MODEL.ROI_BOX_CASCADE_HEAD.SAMPLE_EVERY_STAGE
        return ret

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets) -> List[Instances]:
        if self.sample_every_stage:
            proposals = [
                Instances(p.image_size, proposal_boxes=Boxes.cat([p.proposal_boxes, t.gt_boxes]))
                for p, t in zip(proposals, targets)]
            storage = get_event_storage()
            # detectron2 logs the counts before sampling; the stage's are those it classifies
            with EventStorage(storage.iter):
                labelled = super()._match_and_label_boxes(proposals, stage, targets)
            labelled = [self._subsample(p) for p in labelled]
            for name in ("fg", "bg"):
                counts = [((p.gt_classes != self.num_classes) == (name == "fg")).sum().item()
                          for p in labelled]
                storage.put_scalar(f"stage{stage}/roi_head/num_{name}_samples",
                                   sum(counts) / len(counts))
        else:
            labelled = super()._match_and_label_boxes(proposals, stage, targets)
        attach_image_labels(labelled, targets)
        return labelled

    def _subsample(self, proposals: Instances) -> Instances:
        """At most BATCH_SIZE_PER_IMAGE of the labelled proposals, POSITIVE_FRACTION of them
        foreground (detectron2's first-stage rule)."""
        fg, bg = subsample_labels(proposals.gt_classes, self.batch_size_per_image,
                                  self.positive_fraction, self.num_classes)
        return proposals[torch.cat([fg, bg])]

    def _forward_box(self, features, proposals, targets=None):
        if self.training or self.test_scores == "mean_probs":
            return super()._forward_box(features, proposals, targets)
        features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in proposals]
        outputs = []  # (predictor, predictions, proposals) per stage
        for k, predictor in enumerate(self.box_predictor):
            if k > 0:
                proposals = self._create_proposals_from_boxes(boxes, image_sizes)
            predictions = self._run_stage(features, proposals, k)
            boxes = predictor.predict_boxes(predictions, proposals)
            outputs.append((predictor, predictions, proposals))
        last, last_predictions, last_proposals = outputs[-1]
        if self.test_scores == "mean_logits":
            logits = sum(p[1][0] for p in outputs) / len(outputs)
            scores = last.predict_probs((logits, None), last_proposals)
        else:
            predictor, predictions, stage_proposals = outputs[int(self.test_scores[-1]) - 1]
            scores = predictor.predict_probs(predictions, stage_proposals)
        instances, _ = fast_rcnn_inference(boxes, scores, image_sizes, last.test_score_thresh,
                                           last.test_nms_thresh, last.test_topk_per_image)
        return instances
