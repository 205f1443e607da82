"""Category frequencies of the training data, read from dataset metadata."""

import torch
from detectron2.data import MetadataCatalog

__all__ = ["category_frequencies", "frequency_groups"]


def _class_index(meta):
    """LVIS category id -> contiguous class index, as detectron2's ``load_lvis_json`` maps it."""
    mapping = meta.get("thing_dataset_id_to_contiguous_id")
    if mapping is not None:
        return lambda cid: mapping[cid]
    return lambda cid: cid - 1


def category_frequencies(dataset_names, num_classes):
    """Image-level frequency f_j of each category over the training datasets, [C] float.

    f_j = (training images containing category j) / (training images), from each dataset's
    ``class_image_count`` and ``num_train_images`` metadata (filled by
    :func:`eql_d2.data.load_category_metadata`, which ``train_net.py`` runs before building
    the model). Several datasets are pooled: their counts and image numbers add up.
    """
    if not dataset_names:
        raise ValueError("DATASETS.TRAIN is empty: category frequencies come from the "
                         "training datasets")
    counts = torch.zeros(num_classes, dtype=torch.float64)
    num_images = 0
    for name in dataset_names:
        meta = MetadataCatalog.get(name)
        image_count = meta.get("class_image_count")
        n = meta.get("num_train_images")
        if image_count is None or n is None:
            missing = [k for k, v in (("class_image_count", image_count),
                                      ("num_train_images", n)) if v is None]
            raise ValueError(
                f"Dataset '{name}' has no {' / '.join(missing)} in its metadata, so EQL cannot "
                "compute category frequencies. Register it with "
                "eql_d2.data.register_lvis_format and call "
                f"eql_d2.data.load_category_metadata('{name}') before building the model "
                "(train_net.py does)")
        if len(image_count) != num_classes:
            raise ValueError(
                f"Dataset '{name}' has class_image_count for {len(image_count)} categories, "
                f"but MODEL.ROI_HEADS.NUM_CLASSES = {num_classes}")
        if int(n) <= 0:
            raise ValueError(f"Dataset '{name}': num_train_images = {n}, must be positive")
        index = _class_index(meta)
        for entry in image_count:
            j = index(entry["id"])
            if not 0 <= j < num_classes:
                raise ValueError(f"Dataset '{name}': class_image_count has category id "
                                 f"{entry['id']} outside the {num_classes} classes")
            counts[j] += entry["image_count"]
        num_images += int(n)
    freq = counts / num_images
    if bool((freq > 1).any()):
        j = int(freq.argmax())
        raise ValueError(f"Datasets {list(dataset_names)}: category index {j} is in "
                         f"{int(counts[j])} of {num_images} training images (class_image_count "
                         "and num_train_images disagree)")
    return freq.float()


def frequency_groups(dataset_name, num_classes):
    """LVIS group ("r", "c" or "f") of each category of `dataset_name`, from its metadata."""
    groups = MetadataCatalog.get(dataset_name).get("class_frequency")
    if groups is None:
        raise ValueError(
            f"Dataset '{dataset_name}' has no class_frequency (r/c/f) in its metadata; call "
            f"eql_d2.data.load_category_metadata('{dataset_name}') before building the model")
    if len(groups) != num_classes:
        raise ValueError(f"Dataset '{dataset_name}' has class_frequency for {len(groups)} "
                         f"categories, but MODEL.ROI_HEADS.NUM_CLASSES = {num_classes}")
    return list(groups)
