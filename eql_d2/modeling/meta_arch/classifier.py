"""Image classification as a detectron2 meta-architecture: the long-tailed classification
benchmarks of EQL (sec. 6) trained by the same trainer, hooks and checkpoints as the
detectors."""

from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from torch import nn

from ..cls_losses import build_cls_loss, head_classification_loss

__all__ = ["ImageClassifier"]


@META_ARCH_REGISTRY.register()
class ImageClassifier(nn.Module):
    """image -> backbone -> global average pooling -> linear classifier [C] -> loss.

    Inputs: a list of dicts with ``"image"`` (uint8 or float [3, H, W], the same size across
    a batch) and, for training, ``"label"`` (int in 0..C-1), as
    :class:`~eql_d2.data.classification.ClassificationDatasetMapper` makes them.
    Training returns ``{"loss_cls": ...}``, the loss of ``MODEL.CLS_LOSS.NAME`` (a loss
    registered for "classification" heads) averaged over this process's images; inference
    returns one ``{"scores": [C]}`` per image, the loss's probabilities.
    """

    @configurable
    def __init__(self, *, backbone: Backbone, in_feature: str, num_classes: int,
                 criterion: nn.Module, pixel_mean, pixel_std):
        super().__init__()
        if in_feature not in backbone.output_shape():
            raise ValueError(f"MODEL.CLASSIFIER.IN_FEATURE {in_feature!r} is not an output "
                             f"of the backbone ({sorted(backbone.output_shape())})")
        self.backbone = backbone
        self.in_feature = in_feature
        self.num_classes = num_classes
        self.criterion = criterion
        self.fc = nn.Linear(backbone.output_shape()[in_feature].channels, num_classes)
        # softmax-type losses start at bias 0, sigmoid-type ones at probability 1 / C
        criterion.init_bias(self.fc.bias.data, 1.0 / num_classes, 0.0)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        num_classes = cfg.MODEL.CLASSIFIER.NUM_CLASSES
        return {
            "backbone": build_backbone(cfg),
            "in_feature": cfg.MODEL.CLASSIFIER.IN_FEATURE,
            "num_classes": num_classes,
            "criterion": build_cls_loss(cfg, num_classes, "classification"),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> torch.Tensor:
        shapes = {tuple(x["image"].shape) for x in batched_inputs}
        if len(shapes) != 1:
            raise ValueError(f"ImageClassifier: images of one batch must have one size, got "
                             f"{sorted(shapes)}; crop or resize them in the mapper")
        images = torch.stack([x["image"] for x in batched_inputs]).to(self.device)
        return (images.float() - self.pixel_mean) / self.pixel_std

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Classifier logits [N, C] of normalized images [N, 3, H, W]."""
        features = self.backbone(images)[self.in_feature]
        return self.fc(F.adaptive_avg_pool2d(features, 1).flatten(1))

    def forward(self, batched_inputs: List[Dict]):
        logits = self.logits(self.preprocess_image(batched_inputs))
        if not self.training:
            return [{"scores": s} for s in self.criterion.scores(logits)]
        labels = torch.as_tensor([x["label"] for x in batched_inputs], dtype=torch.long,
                                 device=self.device)
        return {"loss_cls": head_classification_loss(self.criterion, logits, labels,
                                                     float(len(batched_inputs)))}
