"""DatasetMapper that puts each training image's LVIS image-level labels on its ground truth."""

from detectron2.config import configurable
from detectron2.data import DatasetMapper, MetadataCatalog

from .image_labels import ImageLabels, image_label_masks

__all__ = ["ImageLabelDatasetMapper"]


class ImageLabelDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper; in training, the image's ``instances`` also get the field
    ``image_labels``, an :class:`~eql_d2.data.image_labels.ImageLabels` holding the image's

    - ``verified`` [C] bool: its positive categories and its verified negatives
      (``neg_category_ids``), the set EQL / EQLv2 keep at full weight (EQL paper, sec. 4.2);
    - ``not_exhaustive`` [C] bool: its ``not_exhaustive_category_ids``.

    The vectors are stored once per image, also for an image without instances, whose
    background proposals then still see its verified negatives and not-exhaustive
    categories. The EQL ROI heads give them to their sampled proposals
    (:class:`~eql_d2.modeling.roi_heads.ImageLabelHeads`).
    """

    @configurable
    def __init__(self, is_train: bool = True, *, num_classes: int, category_id_map=None,
                 **kwargs):
        """
        Args:
            num_classes: C, foreground categories of the model.
            category_id_map: the training set's ``thing_dataset_id_to_contiguous_id``, or
                None when class index = LVIS id - 1 (LVIS and LVIS-format datasets).
            is_train, kwargs: as for ``DatasetMapper``.
        """
        super().__init__(is_train, **kwargs)
        self.num_classes = int(num_classes)
        self.category_id_map = dict(category_id_map) if category_id_map else None

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, num_classes=None):
        ret = super().from_config(cfg, is_train)
        maps = [MetadataCatalog.get(name).get("thing_dataset_id_to_contiguous_id")
                for name in cfg.DATASETS.TRAIN]
        if any(m != maps[0] for m in maps[1:]):
            raise ValueError(f"DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)} map category ids to "
                             "classes differently (thing_dataset_id_to_contiguous_id)")
        ret["num_classes"] = num_classes
        ret["category_id_map"] = maps[0] if maps else None
        return ret

    def __call__(self, dataset_dict):
        if not self.is_train:
            return super().__call__(dataset_dict)
        # before the parent pops the annotations
        verified, not_exhaustive = image_label_masks(dataset_dict, self.num_classes,
                                                     self.category_id_map)
        out = super().__call__(dataset_dict)
        instances = out.get("instances")
        if instances is None:  # no "annotations" key: not a detection training dict
            return out
        num_rows = len(instances) if instances.get_fields() else 0
        instances.image_labels = ImageLabels.for_image(verified, not_exhaustive, num_rows)
        return out
