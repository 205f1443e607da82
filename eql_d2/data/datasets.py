"""LVIS-format datasets for detectron2: validated loading, category metadata, Synthetic-LT.

Any LVIS-format JSON registered with :func:`register_lvis_format` is loaded by detectron2's
own ``load_lvis_json`` after a validation pass that names the file and field at fault, and
its metadata carries what long-tailed training needs:

- ``thing_classes``: category names in contiguous-id order;
- ``class_image_count``: ``[{"id": k, "image_count": n}, ...]`` as detectron2's LVIS v1
  metadata spells it (so ``get_fed_loss_cls_weights`` works on it);
- ``class_frequency``: LVIS group of each category, ``"r"``, ``"c"`` or ``"f"``;
- ``num_train_images``: number of images of the split the counts come from.

The embedded default, Synthetic-LT (:mod:`eql_d2.data.synthetic`), is registered as
``synthetic_lt_train``, ``synthetic_lt_val`` (exhaustive) and ``synthetic_lt_val_fed`` (the
same images, federated as LVIS val). It is generated on first use into
``$EQL_D2_SYNTHETIC_ROOT`` if set, else ``$DETECTRON2_DATASETS/synthetic_lt`` (detectron2's
default ``datasets/``). Its large-vocabulary preset is registered the same way as
``synthetic_lvis_{train,val,val_fed}``, in ``$EQL_D2_SYNTHETIC_LVIS_ROOT`` or
``$DETECTRON2_DATASETS/synthetic_lvis``.
"""

import json
import logging
import os
import threading

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis import load_lvis_json

from . import synthetic

logger = logging.getLogger(__name__)

__all__ = [
    "register_lvis_format",
    "load_lvis_format",
    "read_lvis_categories",
    "synthetic_lt_root",
    "ensure_synthetic_lt",
    "register_synthetic_lt",
    "load_category_metadata",
]

SYNTHETIC_LT_SPLITS = {"synthetic_lt_train": "train", "synthetic_lt_val": "val",
                       "synthetic_lt_val_fed": "val_fed"}


def _read_json(json_file):
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"LVIS-format annotation file not found: {json_file}")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{json_file}: top level must be an object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{json_file}: missing or malformed '{key}' (must be a list)")
    return data


def _check_categories(json_file, categories):
    ids = sorted(c.get("id") for c in categories)
    if ids != list(range(1, len(categories) + 1)):
        bad = [i for i, expected in zip(ids, range(1, len(ids) + 1)) if i != expected][:5]
        raise ValueError(
            f"{json_file}: category ids must be contiguous 1..{len(categories)} "
            f"(LVIS convention; detectron2 maps id k to class k-1), got {ids[:3]}...{ids[-3:]}, "
            f"first out of place: {bad}"
        )
    for c in categories:
        if "name" not in c:
            raise ValueError(f"{json_file}: category id {c['id']} has no 'name'")


def read_lvis_categories(json_file):
    """Validated category metadata of an LVIS-format JSON (reads the whole file once)."""
    data = _read_json(json_file)
    cats = sorted(data["categories"], key=lambda c: c.get("id", -1))
    _check_categories(json_file, cats)
    num_images = len(data["images"])
    if all("image_count" in c for c in cats):
        counts = [int(c["image_count"]) for c in cats]
    else:  # count images per category from the annotations themselves
        per_cat = [set() for _ in cats]
        for a in data["annotations"]:
            per_cat[a["category_id"] - 1].add(a["image_id"])
        counts = [len(s) for s in per_cat]
    freq = [c.get("frequency") or synthetic.frequency_group(n) for c, n in zip(cats, counts)]
    return {
        "thing_classes": [c["name"] for c in cats],
        "class_image_count": [{"id": c["id"], "image_count": n} for c, n in zip(cats, counts)],
        "class_frequency": freq,
        "num_train_images": num_images,
    }


def _check_annotations(json_file, data, num_classes):
    image_ids = {img.get("id") for img in data["images"]}
    for img in data["images"]:
        for key in ("id", "height", "width"):
            if key not in img:
                raise ValueError(f"{json_file}: image {img.get('id', '?')} has no '{key}'")
        if "coco_url" not in img:
            raise ValueError(
                f"{json_file}: image {img['id']} has no 'coco_url'; detectron2's LVIS loader "
                "reads <image_root><folder>/<file> from its last two parts"
            )
    for a in data["annotations"]:
        if a.get("image_id") not in image_ids:
            raise ValueError(f"{json_file}: annotation {a.get('id')} refers to unknown image_id {a.get('image_id')}")
        cid = a.get("category_id")
        if not isinstance(cid, int) or not 1 <= cid <= num_classes:
            raise ValueError(f"{json_file}: annotation {a.get('id')} has category_id {cid} outside 1..{num_classes}")
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise ValueError(f"{json_file}: annotation {a.get('id')} has malformed bbox {bbox!r}")


def load_lvis_format(json_file, image_root, dataset_name=None):
    """Validate an LVIS-format JSON, then load it with detectron2's ``load_lvis_json``.

    Dataset dicts keep ``neg_category_ids`` and ``not_exhaustive_category_ids`` (LVIS,
    1-based ids), which the EQL heads use for image-level category exclusion.
    """
    data = _read_json(json_file)
    _check_categories(json_file, data["categories"])
    _check_annotations(json_file, data, len(data["categories"]))
    del data
    root = image_root if image_root.endswith(os.sep) else image_root + os.sep
    dicts = load_lvis_json(json_file, root)
    if dataset_name is not None:
        load_category_metadata(dataset_name)
    return dicts


def register_lvis_format(name, json_file, image_root, **extra_metadata):
    """Register an LVIS-format dataset (evaluated with LVISEvaluator) under `name`."""
    DatasetCatalog.register(name, lambda: load_lvis_format(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="lvis", **extra_metadata
    )


_category_lock = threading.Lock()


def load_category_metadata(dataset_name):
    """Fill `thing_classes`, `class_image_count`, `class_frequency` of a registered dataset.

    Reads them from the dataset's own JSON (for Synthetic-LT, generating it first). When a
    class_image_count registered earlier (detectron2's built-in LVIS tables) disagrees with
    the JSON, the JSON's counts replace it, with a warning. For built-in LVIS names whose JSON
    is not on disk, the built-in metadata is kept.
    Returns the dataset's Metadata.
    """
    meta = MetadataCatalog.get(dataset_name)
    with _category_lock:
        if meta.get("class_frequency") is not None:
            return meta
        if dataset_name in SYNTHETIC_LT_SPLITS:
            ensure_synthetic_lt()
        elif dataset_name in SYNTHETIC_LVIS_SPLITS:
            ensure_synthetic_lvis()
        json_file = meta.get("json_file")
        if json_file is None:
            return meta
        if not os.path.isfile(json_file) and meta.get("thing_classes") and dataset_name.startswith("lvis"):
            return meta
        info = read_lvis_categories(json_file)
        if meta.get("thing_classes") is not None and list(meta.thing_classes) != info["thing_classes"]:
            # detectron2's built-in LVIS metadata spells names the same way as the JSON
            raise ValueError(
                f"{json_file}: category names disagree with the metadata already registered "
                f"for '{dataset_name}'"
            )
        registered = meta.get("class_image_count")
        on_disk = _image_counts(info["class_image_count"])
        if registered is not None and _image_counts(registered) != on_disk:
            # a table registered beforehand (detectron2's built-in LVIS counts) disagrees with
            # the annotations being trained on: the JSON wins, for EQL and federated loss alike.
            # Metadata refuses to overwrite a key, so the entry is rebuilt.
            differ = sum(a != b for a, b in zip(_image_counts(registered), on_disk))
            logger.warning(
                "%s: class_image_count registered for this dataset differs from %s for %d "
                "categories; using the counts of %s", dataset_name, json_file, differ, json_file)
            kept = {k: v for k, v in meta.as_dict().items() if k != "name"}
            kept.update(info)
            MetadataCatalog.remove(dataset_name)
            meta = MetadataCatalog.get(dataset_name)
            meta.set(**kept)
        else:
            meta.set(**{k: v for k, v in info.items() if meta.get(k) is None})
    return meta


def _image_counts(class_image_count):
    """[(category id, image count)] sorted by id, to compare count tables of any entry type."""
    return sorted((int(e["id"]), int(e["image_count"])) for e in class_image_count)


# ----------------------------------------------------------------------------- Synthetic-LT


def synthetic_lt_root():
    """Folder of the default Synthetic-LT dataset (see module docstring)."""
    root = os.environ.get("EQL_D2_SYNTHETIC_ROOT")
    if root:
        return os.path.abspath(root)
    return os.path.abspath(os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "synthetic_lt"))


def _generated_with(root):
    try:
        with open(os.path.join(root, "generator.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ensure_synthetic_lt(root=None, default_spec=None):
    """Return `root` holding a complete Synthetic-LT, generating `default_spec` (default:
    :class:`~eql_d2.data.synthetic.SyntheticLTSpec()`) there if absent.

    A folder made by ``python -m eql_d2.data.synthetic`` (any arguments) is used as it is,
    its federated val added if it predates it; one made by an older generator version is
    regenerated with the arguments it records.
    """
    root = root or synthetic_lt_root()
    have = _generated_with(root)
    if have is not None and have.get("version") == synthetic.GENERATOR_VERSION:
        synthetic.add_federated_val(root)
        return root
    spec = default_spec or synthetic.SyntheticLTSpec()
    if have is not None:
        args = {k: v for k, v in have.items() if k != "version"}
        spec = synthetic.SyntheticLTSpec(**args)
        logger.warning("Synthetic-LT at %s is from generator version %s; regenerating it", root, have.get("version"))
    logger.info("Generating Synthetic-LT into %s (one time, about a minute)", root)
    synthetic.generate(root, spec)
    return root


def register_synthetic_lt():
    root = synthetic_lt_root()
    for name, split in SYNTHETIC_LT_SPLITS.items():
        json_file = os.path.join(root, f"lvis_v1_{split}.json")
        image_root = root

        def load(json_file=json_file, image_root=image_root, name=name):
            ensure_synthetic_lt(root)
            return load_lvis_format(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="lvis")


# ----------------------------------------------------------------------------- Synthetic-LVIS

SYNTHETIC_LVIS_SPLITS = {"synthetic_lvis_train": "train", "synthetic_lvis_val": "val",
                         "synthetic_lvis_val_fed": "val_fed"}


def synthetic_lvis_root():
    """Folder of the ``synthetic_lvis`` preset: ``$EQL_D2_SYNTHETIC_LVIS_ROOT`` if set, else
    ``$DETECTRON2_DATASETS/synthetic_lvis`` (default ``datasets/synthetic_lvis``)."""
    root = os.environ.get("EQL_D2_SYNTHETIC_LVIS_ROOT")
    if root:
        return os.path.abspath(root)
    return os.path.abspath(os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"),
                                        "synthetic_lvis"))


def ensure_synthetic_lvis(root=None):
    """Return `root` holding the ``synthetic_lvis`` preset, generating it if absent (one
    time, a few minutes); as :func:`ensure_synthetic_lt` otherwise."""
    return ensure_synthetic_lt(root or synthetic_lvis_root(), synthetic.PRESETS["synthetic_lvis"])


def register_synthetic_lvis():
    """Register ``synthetic_lvis_train``, ``synthetic_lvis_val`` (exhaustive) and
    ``synthetic_lvis_val_fed`` (federated, as LVIS val), generated on first use."""
    root = synthetic_lvis_root()
    for name, split in SYNTHETIC_LVIS_SPLITS.items():
        json_file = os.path.join(root, f"lvis_v1_{split}.json")

        def load(json_file=json_file, name=name):
            ensure_synthetic_lvis(root)
            return load_lvis_format(json_file, root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(json_file=json_file, image_root=root, evaluator_type="lvis")
