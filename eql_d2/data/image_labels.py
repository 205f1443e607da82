"""LVIS image-level labels of a training image, as contiguous class indices.

LVIS is federated: besides its boxes, each image lists categories verified absent
(``neg_category_ids``) and categories whose instances are not all annotated
(``not_exhaustive_category_ids``). detectron2's ``load_lvis_json`` keeps both in the dataset
dicts, with LVIS's 1-based category ids; :class:`~eql_d2.data.ImageLabelDatasetMapper`
turns them into fields of the image's ground truth.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["ImageLabels", "read_image_labels", "image_label_masks"]

LVIS_KEYS = ("neg_category_ids", "not_exhaustive_category_ids")


@dataclass
class ImageLabels:
    """Image-level category sets of one image, as int64 class-index tensors [K].

    The positive set is not stored: it is the set of annotated classes, which the ROI heads
    read from the image's ground-truth instances.
    """

    negative: torch.Tensor
    not_exhaustive: torch.Tensor


def _to_indices(ids, key, image, num_classes, to_index) -> torch.Tensor:
    out = []
    for cid in ids:
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise ValueError(f"image {image}: {key} must hold integer category ids, "
                             f"got {cid!r}")
        try:
            j = to_index(cid)
        except KeyError:
            raise ValueError(f"image {image}: {key} has category id {cid}, which the "
                             "dataset's thing_dataset_id_to_contiguous_id does not map") from None
        if not 0 <= j < num_classes:
            raise ValueError(f"image {image}: {key} has category id {cid}, outside the "
                             f"{num_classes} classes (LVIS ids are 1..{num_classes})")
        out.append(j)
    return torch.tensor(out, dtype=torch.int64)


def read_image_labels(batched_inputs: List[dict], num_classes: int,
                      id_map: Optional[Dict[int, int]] = None) -> List[ImageLabels]:
    """:class:`ImageLabels` of each model input (a dict from detectron2's DatasetMapper).

    A missing key is an empty set, so datasets without LVIS's image-level fields train as
    if every image listed none. ``id_map`` is the dataset's
    ``thing_dataset_id_to_contiguous_id`` when it has one; otherwise class index = id - 1,
    as in detectron2's ``load_lvis_json``.
    """
    to_index: Callable[[int], int] = (lambda cid: id_map[cid]) if id_map else (lambda cid: cid - 1)
    labels = []
    for x in batched_inputs:
        image = x.get("file_name", x.get("image_id", "?"))
        sets = {}
        for key in LVIS_KEYS:
            ids = x.get(key) or []
            if not isinstance(ids, (list, tuple)):
                raise ValueError(f"image {image}: {key} must be a list of category ids, "
                                 f"got {type(ids).__name__}")
            sets[key] = _to_indices(ids, key, image, num_classes, to_index)
        labels.append(ImageLabels(negative=sets["neg_category_ids"],
                                  not_exhaustive=sets["not_exhaustive_category_ids"]))
    return labels


def image_label_masks(dataset_dict: dict, num_classes: int,
                      id_map: Optional[Dict[int, int]] = None):
    """(verified [C] bool, not_exhaustive [C] bool) of one dataset dict.

    verified: the image's positive categories (those of its annotations, whose
    ``category_id`` detectron2's loader already made contiguous) and its
    ``neg_category_ids``; not_exhaustive: its ``not_exhaustive_category_ids``.
    """
    labels = read_image_labels([dataset_dict], num_classes, id_map)[0]
    verified = torch.zeros(num_classes, dtype=torch.bool)
    positives = [a["category_id"] for a in dataset_dict.get("annotations", ())
                 if not a.get("iscrowd", 0)]
    verified[torch.as_tensor(positives, dtype=torch.int64)] = True
    verified[labels.negative] = True
    not_exhaustive = torch.zeros(num_classes, dtype=torch.bool)
    not_exhaustive[labels.not_exhaustive] = True
    return verified, not_exhaustive
