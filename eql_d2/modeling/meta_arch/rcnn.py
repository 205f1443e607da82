"""GeneralizedRCNN that hands each training image's LVIS image-level labels to its ROI heads."""

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from ..roi_heads.image_labels import read_image_labels

__all__ = ["ImageLabelRCNN"]


@META_ARCH_REGISTRY.register()
class ImageLabelRCNN(GeneralizedRCNN):
    """Faster / Mask R-CNN whose ROI heads see ``neg_category_ids`` and
    ``not_exhaustive_category_ids`` of every training image.

    detectron2's DatasetMapper keeps those LVIS fields in the model inputs, but
    GeneralizedRCNN passes only images, features, proposals and instances to its ROI heads.
    This subclass reads the fields (:func:`read_image_labels`) and runs the parent's
    forward inside the heads' ``image_level_labels`` context. Inference is unchanged.

    Args (besides GeneralizedRCNN's):
        category_id_map: the training dataset's ``thing_dataset_id_to_contiguous_id``, or
            None when class index = LVIS id - 1 (LVIS and every LVIS-format dataset).
    """

    @configurable
    def __init__(self, *, category_id_map=None, **kwargs):
        super().__init__(**kwargs)
        if not hasattr(self.roi_heads, "image_level_labels"):
            raise ValueError(
                "MODEL.META_ARCHITECTURE 'ImageLabelRCNN' needs ROI heads that take image-level "
                f"labels (MODEL.ROI_HEADS.NAME 'EQLROIHeads'), got {type(self.roi_heads).__name__}")
        self.category_id_map = dict(category_id_map) if category_id_map else None

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        maps = [MetadataCatalog.get(name).get("thing_dataset_id_to_contiguous_id")
                for name in cfg.DATASETS.TRAIN]
        if any(m != maps[0] for m in maps[1:]):
            raise ValueError(f"DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)} map category ids to "
                             "classes differently (thing_dataset_id_to_contiguous_id)")
        ret["category_id_map"] = maps[0] if maps else None
        return ret

    def forward(self, batched_inputs):
        if not self.training:
            return super().forward(batched_inputs)
        labels = read_image_labels(batched_inputs, self.roi_heads.num_classes,
                                   self.category_id_map)
        with self.roi_heads.image_level_labels(labels):
            return super().forward(batched_inputs)
