"""Test-time augmentation (horizontal flip, several scales) for R-CNN and dense detectors.

R-CNN models use detectron2's :class:`GeneralizedRCNNWithTTA` (boxes merged by the ROI
heads' NMS, masks averaged over the augmented views). Dense one-stage detectors (RetinaNet,
EFLRetinaNet, ATSS: detectron2 ``DenseDetector`` subclasses) use
:class:`DenseDetectorWithTTA`, which runs the same :class:`DatasetMapperTTA` views through
the model and merges their boxes with the model's own per-class NMS and detection cap.
"""

import copy

import numpy as np
import torch
from detectron2.data.detection_utils import read_image
from detectron2.layers import batched_nms
from detectron2.modeling import GeneralizedRCNN, GeneralizedRCNNWithTTA
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.test_time_augmentation import DatasetMapperTTA
from detectron2.structures import Boxes, Instances
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DenseDetectorWithTTA", "build_tta_model"]


class DenseDetectorWithTTA(nn.Module):
    """A DenseDetector with test-time augmentation; same call interface as the model.

    Every view's detections are mapped back to the original image (inverse of the view's
    resize and flip), pooled, and reduced by per-class NMS at the model's
    ``test_nms_thresh`` to its ``max_detections_per_image`` best.
    """

    def __init__(self, cfg, model, tta_mapper=None, batch_size=3):
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not isinstance(model, DenseDetector):
            raise TypeError(f"DenseDetectorWithTTA needs a DenseDetector, got {type(model).__name__}")
        for attr in ("test_nms_thresh", "max_detections_per_image"):
            if not hasattr(model, attr):
                raise TypeError(f"{type(model).__name__} has no '{attr}', which TTA merging uses")
        self.model = model
        self.tta_mapper = tta_mapper or DatasetMapperTTA(cfg)
        self.batch_size = batch_size

    def __call__(self, batched_inputs):
        return [{"instances": self._inference_one_image(self._with_image(x))} for x in batched_inputs]

    def _with_image(self, dataset_dict):
        ret = copy.copy(dataset_dict)
        if "image" not in ret:
            image = read_image(ret.pop("file_name"), self.model.input_format)
            ret["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        ret.setdefault("height", ret["image"].shape[1])
        ret.setdefault("width", ret["image"].shape[2])
        return ret

    def _inference_one_image(self, input):
        views = self.tta_mapper(input)
        tfms = [v.pop("transforms") for v in views]
        for v in views:  # keep each view's detections in its own coordinates
            v["height"], v["width"] = v["image"].shape[1:3]
        outputs = []
        for start in range(0, len(views), self.batch_size):
            outputs.extend(self.model(views[start:start + self.batch_size]))
        boxes, scores, classes = [], [], []
        for out, tfm in zip(outputs, tfms):
            inst = out["instances"]
            b = tfm.inverse().apply_box(inst.pred_boxes.tensor.cpu().numpy())
            boxes.append(torch.as_tensor(b, dtype=torch.float32))
            scores.append(inst.scores.cpu())
            classes.append(inst.pred_classes.cpu())
        boxes, scores, classes = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
        keep = batched_nms(boxes, scores, classes, self.model.test_nms_thresh)
        keep = keep[: self.model.max_detections_per_image]
        image_size = (input["height"], input["width"])
        merged = Boxes(boxes[keep])
        merged.clip(image_size)
        return Instances(image_size, pred_boxes=merged, scores=scores[keep],
                         pred_classes=classes[keep])


def build_tta_model(cfg, model):
    """Wrap `model` (a GeneralizedRCNN or DenseDetector) for TTA with cfg.TEST.AUG views."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    if isinstance(inner, GeneralizedRCNN):
        return GeneralizedRCNNWithTTA(cfg, inner)
    if isinstance(inner, DenseDetector):
        return DenseDetectorWithTTA(cfg, inner)
    raise TypeError(f"No test-time augmentation for {type(inner).__name__} "
                    "(R-CNN and dense one-stage detectors are supported)")
