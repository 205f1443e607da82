"""Category frequencies of the training data, read from dataset metadata.

Only training reads them from the data: a trained EQL model keeps its frequencies in its
checkpoint (``EQLLoss.freq``), so building a model for inference passes ``required=False``
and gets None where the training sets' metadata was never loaded.
"""

import torch
from detectron2.data import MetadataCatalog

__all__ = ["category_frequencies", "frequency_groups"]


def _class_index(meta):
    """LVIS category id -> contiguous class index, as detectron2's ``load_lvis_json`` maps it."""
    mapping = meta.get("thing_dataset_id_to_contiguous_id")
    if mapping is not None:
        return lambda cid: mapping[cid]
    return lambda cid: cid - 1


def _missing_counts(name):
    """Names of the count keys absent from `name`'s metadata (empty: all present).

    Reads the MetadataCatalog only; nothing is loaded, so an unregistered name, or one
    whose JSON is not on disk, simply has no counts.
    """
    meta = MetadataCatalog.get(name)
    return [k for k in ("class_image_count", "num_train_images") if meta.get(k) is None]


def category_frequencies(dataset_names, num_classes, *, required=True):
    """Image-level frequency f_j of each category over the training datasets, [C] float.

    f_j = (training images containing category j) / (training images), from each dataset's
    ``class_image_count`` and ``num_train_images`` metadata (filled by
    :func:`eql_d2.data.load_category_metadata`, which :func:`eql_d2.engine.prepare_datasets`
    runs for training before the model is built). Several datasets are pooled: their counts
    and image numbers add up.

    Args:
        dataset_names: DATASETS.TRAIN.
        num_classes: C.
        required: when False, return None instead of raising if DATASETS.TRAIN is empty or
            some dataset's counts are not in its metadata (inference: the frequencies then
            come from the checkpoint). Counts that are present but inconsistent raise either way.
    """
    if not dataset_names:
        if not required:
            return None
        raise ValueError("DATASETS.TRAIN is empty: category frequencies come from the "
                         "training datasets")
    missing = {name: _missing_counts(name) for name in dataset_names}
    if any(missing.values()):
        if not required:
            return None
        name, keys = next((n, k) for n, k in missing.items() if k)
        raise ValueError(
            f"Dataset '{name}' (DATASETS.TRAIN) has no {' / '.join(keys)} in its metadata, so "
            "EQL cannot compute category frequencies. Register it with "
            "eql_d2.data.register_lvis_format and call "
            f"eql_d2.data.load_category_metadata('{name}') before building the model "
            "(eql_d2.engine.prepare_datasets does, and train_net.py runs it)")
    counts = torch.zeros(num_classes, dtype=torch.float64)
    num_images = 0
    for name in dataset_names:
        meta = MetadataCatalog.get(name)
        image_count, n = meta.class_image_count, meta.num_train_images
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


def frequency_groups(dataset_name, num_classes, *, required=True):
    """LVIS group ("r", "c" or "f") of each category of `dataset_name`, from its metadata.

    With ``required=False`` a dataset whose ``class_frequency`` is not in its metadata (not
    loaded, as for inference) gives None; the groups only label logged training statistics.
    """
    groups = MetadataCatalog.get(dataset_name).get("class_frequency")
    if groups is None:
        if not required:
            return None
        raise ValueError(
            f"Dataset '{dataset_name}' has no class_frequency (r/c/f) in its metadata; call "
            f"eql_d2.data.load_category_metadata('{dataset_name}') before building the model")
    if len(groups) != num_classes:
        raise ValueError(f"Dataset '{dataset_name}' has class_frequency for {len(groups)} "
                         f"categories, but MODEL.ROI_HEADS.NUM_CLASSES = {num_classes}")
    return list(groups)
