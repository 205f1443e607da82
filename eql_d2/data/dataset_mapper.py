"""DatasetMapper that puts each training image's LVIS image-level labels on its ground truth."""

from detectron2.config import configurable
from detectron2.data import DatasetMapper, MetadataCatalog

from .image_labels import image_label_masks

__all__ = ["ImageLabelDatasetMapper", "IMAGE_LABEL_FIELDS"]

# Instances fields added in training; ROI heads find them on matched proposals.
IMAGE_LABEL_FIELDS = ("gt_verified", "gt_not_exhaustive")


class ImageLabelDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper; in training, the image's ``instances`` also get

    - ``gt_verified`` [N, C] bool: the image's positive categories and its verified negatives
      (``neg_category_ids``), the set EQL / EQLv2 keep at full weight (EQL paper, sec. 4.2);
    - ``gt_not_exhaustive`` [N, C] bool: its ``not_exhaustive_category_ids``.

    Every row holds the same image-level vector (an expanded view, no copy). Fields named
    ``gt_*`` follow the ground truth: detectron2's ROI heads copy them to each sampled
    proposal from its matched box, so the image-level labels reach the box predictor with
    the proposals, through a plain ``GeneralizedRCNN``. An image without instances has no
    rows, hence no labels; it has no foreground proposals either, and its background
    proposals are then treated as on an image that lists no negative or not-exhaustive
    categories.
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
        if instances is not None:
            n = len(instances)
            instances.gt_verified = verified.expand(n, self.num_classes)
            instances.gt_not_exhaustive = not_exhaustive.expand(n, self.num_classes)
        return out
