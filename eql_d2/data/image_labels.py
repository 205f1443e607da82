"""LVIS image-level labels of training images, and the structure that carries them.

LVIS is federated: besides its boxes, each image lists categories verified absent
(``neg_category_ids``) and categories whose instances are not all annotated
(``not_exhaustive_category_ids``). detectron2's ``load_lvis_json`` keeps both in the dataset
dicts, with LVIS's 1-based category ids. :class:`~eql_d2.data.ImageLabelDatasetMapper`
turns them into an :class:`ImageLabels` field of the image's ground truth, and the ROI heads
hand the same per-image vectors to their sampled proposals.
"""

from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["ImageLabels", "image_label_masks"]

LVIS_KEYS = ("neg_category_ids", "not_exhaustive_category_ids")


class ImageLabels:
    """Per-image category masks, shared by the rows (instances or proposals) of the images.

    A field type for detectron2's ``Instances`` (like ``Boxes``): it has one entry per row,
    but stores the image-level vectors once per image, so labelling R proposals costs R
    indices, not an [R, C] mask.

    Attributes:
        verified: [K, C] bool, per image: its positive categories and its verified negatives
            (``neg_category_ids``), the set EQL / EQLv2 keep at full weight (EQL, sec. 4.2).
        not_exhaustive: [K, C] bool, per image: its ``not_exhaustive_category_ids``.
        image: [R] int64, the image (row of ``verified``) of each entry.

    A field named without the ``gt_`` prefix: detectron2's ROI heads copy ``gt_*`` fields of
    the ground truth to each sampled proposal, which these labels do not need.
    """

    def __init__(self, verified: torch.Tensor, not_exhaustive: torch.Tensor,
                 image: torch.Tensor):
        if verified.dim() != 2 or verified.shape != not_exhaustive.shape:
            raise ValueError(f"verified {tuple(verified.shape)} and not_exhaustive "
                             f"{tuple(not_exhaustive.shape)} must both be [K, C]")
        self.verified = verified
        self.not_exhaustive = not_exhaustive
        self.image = image

    @classmethod
    def for_image(cls, verified: torch.Tensor, not_exhaustive: torch.Tensor,
                  num_rows: int) -> "ImageLabels":
        """The labels of one image (vectors [C]) for its `num_rows` rows."""
        return cls(verified[None], not_exhaustive[None],
                   torch.zeros(num_rows, dtype=torch.int64, device=verified.device))

    def with_rows(self, num_rows: int) -> "ImageLabels":
        """The same images' labels for `num_rows` rows of the first image (the labels of one
        image's proposals, from those of its ground truth)."""
        return ImageLabels(self.verified[:1], self.not_exhaustive[:1],
                           torch.zeros(num_rows, dtype=torch.int64, device=self.image.device))

    def __len__(self) -> int:
        return self.image.shape[0]

    def __getitem__(self, item) -> "ImageLabels":
        return ImageLabels(self.verified, self.not_exhaustive, self.image[item])

    def to(self, *args, **kwargs) -> "ImageLabels":
        return ImageLabels(self.verified.to(*args, **kwargs),
                           self.not_exhaustive.to(*args, **kwargs),
                           self.image.to(*args, **kwargs))

    @property
    def device(self) -> torch.device:
        return self.image.device

    @classmethod
    def cat(cls, labels: List["ImageLabels"]) -> "ImageLabels":
        """Concatenate the rows of several :class:`ImageLabels` (images stay distinct)."""
        if not labels:
            raise ValueError("ImageLabels.cat needs at least one ImageLabels")
        offsets, total = [], 0
        for x in labels:
            offsets.append(total)
            total += x.verified.shape[0]
        return cls(torch.cat([x.verified for x in labels]),
                   torch.cat([x.not_exhaustive for x in labels]),
                   torch.cat([x.image + off for x, off in zip(labels, offsets)]))

    def verified_rows(self) -> torch.Tensor:
        """[R, C] bool: each row's image ``verified`` vector."""
        return self.verified[self.image]

    def not_exhaustive_rows(self) -> torch.Tensor:
        """[R, C] bool: each row's image ``not_exhaustive`` vector."""
        return self.not_exhaustive[self.image]

    def __repr__(self) -> str:
        return (f"ImageLabels(num_images={self.verified.shape[0]}, "
                f"num_classes={self.verified.shape[1]}, num_rows={len(self)})")


def _to_indices(ids, key, image, num_classes, id_map) -> List[int]:
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"image {image}: {key} must be a list of category ids, "
                         f"got {type(ids).__name__}")
    out = []
    for cid in ids:
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise ValueError(f"image {image}: {key} must hold integer category ids, "
                             f"got {cid!r}")
        if id_map:
            if cid not in id_map:
                raise ValueError(f"image {image}: {key} has category id {cid}, which the "
                                 "dataset's thing_dataset_id_to_contiguous_id does not map")
            j = id_map[cid]
        else:
            j = cid - 1
        if not 0 <= j < num_classes:
            raise ValueError(f"image {image}: {key} has category id {cid}, outside the "
                             f"{num_classes} classes (LVIS ids are 1..{num_classes})")
        out.append(j)
    return out


def image_label_masks(dataset_dict: dict, num_classes: int,
                      id_map: Optional[Dict[int, int]] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(verified [C] bool, not_exhaustive [C] bool) of one dataset dict.

    verified: the image's positive categories (those of its non-crowd annotations, whose
    ``category_id`` detectron2's loader already made contiguous) and its
    ``neg_category_ids``; not_exhaustive: its ``not_exhaustive_category_ids``. A missing
    key is an empty set. ``id_map`` is the dataset's ``thing_dataset_id_to_contiguous_id``
    when it has one; otherwise class index = id - 1, as in detectron2's ``load_lvis_json``.
    """
    image = dataset_dict.get("file_name", dataset_dict.get("image_id", "?"))
    sets = {key: _to_indices(dataset_dict.get(key) or [], key, image, num_classes, id_map)
            for key in LVIS_KEYS}
    verified = torch.zeros(num_classes, dtype=torch.bool)
    positives = [a["category_id"] for a in dataset_dict.get("annotations", ())
                 if not a.get("iscrowd", 0)]
    verified[torch.as_tensor(positives, dtype=torch.int64)] = True
    verified[torch.as_tensor(sets["neg_category_ids"], dtype=torch.int64)] = True
    not_exhaustive = torch.zeros(num_classes, dtype=torch.bool)
    not_exhaustive[torch.as_tensor(sets["not_exhaustive_category_ids"], dtype=torch.int64)] = True
    return verified, not_exhaustive
