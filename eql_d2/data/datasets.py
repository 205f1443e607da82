"""LVIS-format datasets for detectron2: checked loading, category metadata, Synthetic-LT.

Any LVIS-format JSON registered with :func:`register_lvis_format`, and detectron2's built-in
annotated LVIS splits (``lvis_v1_train``, ``lvis_v1_val``, ``lvis_v0.5_train``,
``lvis_v0.5_val``, ``lvis_v0.5_val_rand_100``, re-registered here), are loaded by
:func:`load_lvis_format`: one ``json.load`` per process, a check that names the file and
field at fault, and dataset dicts in the format of detectron2's ``load_lvis_json`` (which
would parse the file a second time and stops at the first polygon it cannot use).

Annotations that cannot be trained on are skipped with one warning giving their count and
first ids: a box with non-positive or non-finite width or height, a box entirely outside its
image, an empty segmentation or polygon, a polygon with fewer than 3 points or an odd number
of coordinates. Boxes that extend partly outside their image are kept (detectron2 clips
them). Structural faults (unknown image or category id, malformed box, RLE or missing
segmentation, duplicate annotation ids, an image id or image file in two ``images``
entries) raise ``ValueError``.

Metadata of a dataset carries what long-tailed training needs:

- ``thing_classes``: category names in contiguous-id order;
- ``class_image_count``: ``[{"id": k, "image_count": n}, ...]`` as detectron2's LVIS v1
  metadata spells it (so ``get_fed_loss_cls_weights`` works on it); a category's
  ``image_count`` from the JSON, else the number of images with a usable annotation of it;
- ``class_frequency``: LVIS group of each category, ``"r"``, ``"c"`` or ``"f"``;
- ``num_train_images``: number of images of the split the counts come from.

Training reads these datasets from a compact form converted once per machine
(:mod:`eql_d2.data.compact`, which reaches them through their :class:`LVISFormatLoader`
entry of the DatasetCatalog and applies the same checks with the same functions).

The model needs this metadata before the training dicts are loaded (``train_net.py`` runs
:func:`load_category_metadata` first). So that a process parses the JSON only once,
the process that computes it (local rank 0 in ``prepare_datasets``) stores it in a small
cache file, ``$EQL_D2_CACHE_DIR`` (default ``~/.cache/eql_d2``) ``/categories-<hash of the
JSON's path>.json``, valid while the JSON's path, size and modification time are unchanged;
the other processes read it. The dataset folder itself is never written to (it is often
shared or read-only). The metadata is checked against the JSON again when the dicts are
loaded, from the same parse.

Importing eql_d2 registers nothing; :func:`register_all` (which ``train_net.py``,
``demo.py`` and the tools call first) registers the built-in datasets below and re-registers
detectron2's annotated LVIS splits. The embedded default, Synthetic-LT
(:mod:`eql_d2.data.synthetic`), is registered as ``synthetic_lt_train``, ``synthetic_lt_val``
(exhaustive) and ``synthetic_lt_val_fed`` (the same images, federated as LVIS val). It is generated on first use into
``$EQL_D2_SYNTHETIC_ROOT`` if set, else ``$DETECTRON2_DATASETS/synthetic_lt`` (detectron2's
default ``datasets/``). Its large-vocabulary presets are registered the same way, each as
``<preset>_{train,val,val_fed}`` in the folder named by its variable of
:data:`SYNTHETIC_PRESET_ROOT_VARS`, else ``$DETECTRON2_DATASETS/<preset>``:
``synthetic_lvis`` (``$EQL_D2_SYNTHETIC_LVIS_ROOT``) and its balanced control
``synthetic_lvis_balanced`` (``$EQL_D2_SYNTHETIC_LVIS_BALANCED_ROOT``), whose categories
are all in one LVIS group (common).
"""

import functools
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import defaultdict

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..utils.io import read_json, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "register_all",
    "register_lvis_format",
    "register_builtin_lvis",
    "load_lvis_format",
    "read_lvis_categories",
    "synthetic_lt_root",
    "ensure_synthetic_lt",
    "register_synthetic_lt",
    "synthetic_preset_root",
    "ensure_synthetic_preset",
    "register_synthetic_presets",
    "load_category_metadata",
    "store_category_metadata",
    "category_info",
    "metadata_cache_file",
    "cache_root",
    "cache_name",
    "file_key",
    "LVISFormatLoader",
]

SYNTHETIC_LT_SPLITS = {"synthetic_lt_train": "train", "synthetic_lt_val": "val",
                       "synthetic_lt_val_fed": "val_fed"}

# detectron2's built-in LVIS splits that carry annotations with LVIS's own category ids
# (the image-info test files have none; the cocofied ones use COCO's ids).
BUILTIN_LVIS_ANNOTATED = ("lvis_v1_train", "lvis_v1_val", "lvis_v0.5_train", "lvis_v0.5_val",
                          "lvis_v0.5_val_rand_100")

# Bumped whenever what the metadata is computed from changes, so older cache files are ignored.
METADATA_CACHE_VERSION = 1

# How many ids of skipped annotations the warning names.
SKIPPED_IDS_SHOWN = 10


def _synthetic():
    # imported on use, not with the package: ``python -m eql_d2.data.synthetic`` runs that
    # module as __main__, and an earlier import of it by the package makes runpy warn
    from . import synthetic

    return synthetic


def _read_json(json_file):
    """The one full parse of an LVIS-format JSON; checks its top level only."""
    data = read_json(json_file, "LVIS-format annotation file")
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


def _check_images(json_file, images):
    for img in images:
        for key in ("id", "height", "width"):
            if key not in img:
                raise ValueError(f"{json_file}: image {img.get('id', '?')} has no '{key}'")
        if "coco_url" not in img:
            raise ValueError(
                f"{json_file}: image {img['id']} has no 'coco_url'; detectron2's LVIS loader "
                "reads <image_root><folder>/<file> from its last two parts"
            )
    _check_unique_images(json_file, images)


def _check_unique_images(json_file, images):
    """Raise ValueError naming `json_file` when two ``images`` entries share an id or an
    image file: dataset dicts would keep one of them while ``num_train_images`` (which
    EQL's category frequencies divide by) counted both."""
    entries_of_id, ids_of_file = defaultdict(int), defaultdict(list)
    for img in images:
        entries_of_id[img["id"]] += 1
        ids_of_file["/".join(img["coco_url"].split("/")[-2:])].append(img["id"])
    repeated = [(i, n) for i, n in entries_of_id.items() if n > 1]
    if repeated:
        shown = ", ".join(f"{i} ({n} entries)" for i, n in repeated[:SKIPPED_IDS_SHOWN])
        raise ValueError(
            f"{json_file}: {len(repeated)} image ids appear in more than one 'images' entry: "
            f"{shown}{' ...' if len(repeated) > SKIPPED_IDS_SHOWN else ''}; every image "
            "must be listed once, under its own id")
    shared = [(f, ids) for f, ids in ids_of_file.items() if len(ids) > 1]
    if shared:
        shown = "; ".join(f"{f}: image ids {ids}" for f, ids in shared[:SKIPPED_IDS_SHOWN])
        raise ValueError(
            f"{json_file}: {len(shared)} image files are listed more than once (under "
            f"several image ids): {shown}{' ...' if len(shared) > SKIPPED_IDS_SHOWN else ''}; "
            "every image must be listed once")


def _unusable(json_file, a, image_sizes):
    """Why annotation `a` cannot be trained on (a short reason), or None if it can.

    Raises ValueError for faults of the file's structure rather than of one object.
    """
    bbox = a.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise ValueError(f"{json_file}: annotation {a.get('id')} has malformed bbox {bbox!r}")
    segm = a.get("segmentation")
    if not isinstance(segm, list) or not all(isinstance(p, list) for p in segm):
        raise ValueError(
            f"{json_file}: annotation {a.get('id')} has segmentation of type "
            f"{type(segm).__name__}; LVIS format needs a list of polygons [[x1, y1, x2, y2, ...], ...]"
        )
    x, y, w, h = bbox
    if not all(math.isfinite(v) for v in bbox) or w <= 0 or h <= 0:
        return "box with non-positive or non-finite size"
    width, height = image_sizes[a["image_id"]]
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return "box entirely outside the image"
    if not segm or any(not p for p in segm):
        return "empty polygon"
    # the rule detectron2's load_lvis_json asserts: at least 3 (x, y) points
    if any(len(p) < 6 or len(p) % 2 for p in segm):
        return "polygon with < 3 points or odd coordinate count"
    return None


def _usable_annotations(json_file, data):
    """Annotations of `data` that can be trained on; raises on structural faults, warns once
    (count, reasons, first ids) about the skipped ones."""
    _check_images(json_file, data["images"])
    image_sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    return list(_checked_annotations(json_file, image_sizes, len(data["categories"]),
                                     data["annotations"]))


def _checked_annotations(json_file, image_sizes, num_classes, annotations):
    """Yield the annotations of the iterable `annotations` that can be trained on, in order.

    `image_sizes` maps each image id to its (width, height). Raises ValueError on structural
    faults; once the iterable is exhausted, warns once (count, reasons, first ids) about the
    skipped ones. Shared by the loader of dataset dicts and the streaming conversion of
    :mod:`eql_d2.data.compact`, so both skip and refuse the same annotations.
    """
    skipped, reasons, seen, total = [], defaultdict(int), set(), 0
    for a in annotations:
        total += 1
        if a.get("image_id") not in image_sizes:
            raise ValueError(f"{json_file}: annotation {a.get('id')} refers to unknown image_id {a.get('image_id')}")
        cid = a.get("category_id")
        if not isinstance(cid, int) or not 1 <= cid <= num_classes:
            raise ValueError(f"{json_file}: annotation {a.get('id')} has category_id {cid} outside 1..{num_classes}")
        ann_id = a.get("id")
        if ann_id in seen:
            raise ValueError(f"{json_file}: annotation id {ann_id} appears more than once")
        seen.add(ann_id)
        why = _unusable(json_file, a, image_sizes)
        if why is None:
            yield a
        else:
            skipped.append(ann_id)
            reasons[why] += 1
    if skipped:
        logger.warning(
            "%s: skipped %d of %d annotations that cannot be used (%s); first ids: %s",
            json_file, len(skipped), total,
            ", ".join(f"{why}: {n}" for why, n in sorted(reasons.items())),
            skipped[:SKIPPED_IDS_SHOWN])


def _read_lvis(json_file):
    """Parse, check and filter an LVIS-format JSON: (data with only usable annotations)."""
    data = _read_json(json_file)
    _check_categories(json_file, data["categories"])
    data["annotations"] = _usable_annotations(json_file, data)
    return data


def _category_metadata(data):
    """thing_classes / class_image_count / class_frequency / num_train_images of checked `data`."""
    def counted():  # images per category among the usable annotations themselves
        per_cat = [set() for _ in data["categories"]]
        for a in data["annotations"]:
            per_cat[a["category_id"] - 1].add(a["image_id"])
        return [len(s) for s in per_cat]

    return category_info(data["categories"], len(data["images"]), counted)


def category_info(categories, num_images, counted_image_counts):
    """Category metadata (see the module docstring) of the checked `categories` of a file
    with `num_images` images. Each category's image count is the file's ``image_count`` when
    every category has one, else ``counted_image_counts()[id - 1]`` (a callable, so that the
    counting runs only when needed): the number of images with a usable annotation of it."""
    cats = sorted(categories, key=lambda c: c["id"])
    if all("image_count" in c for c in cats):
        counts = [int(c["image_count"]) for c in cats]
    else:
        counts = [int(n) for n in counted_image_counts()]
    group = _synthetic().frequency_group
    freq = [c.get("frequency") or group(n) for c, n in zip(cats, counts)]
    return {
        "thing_classes": [c["name"] for c in cats],
        "class_image_count": [{"id": c["id"], "image_count": n} for c, n in zip(cats, counts)],
        "class_frequency": freq,
        "num_train_images": num_images,
        # not metadata: only to compare names with a table registered beforehand
        "_synonyms": [c.get("synonyms") or [] for c in cats],
    }


def _names_agree(registered, info):
    """Whether registered class names are the JSON's, allowing a synonym of it: detectron2's
    built-in LVIS v1 table names each category by its first synonym, which for one category
    (id 162, "bull" / "horned_cow") is not its name."""
    return len(registered) == len(info["thing_classes"]) and all(
        r == name or r in syn for r, name, syn in zip(registered, info["thing_classes"], info["_synonyms"]))


def read_lvis_categories(json_file):
    """Checked category metadata of an LVIS-format JSON (parses the whole file once)."""
    info = _category_metadata(_read_lvis(json_file))
    del info["_synonyms"]
    return info


def _dataset_dicts(data, image_root):
    """detectron2 dataset dicts of checked `data`, as detectron2's ``load_lvis_json`` makes them.

    One dict per image, by increasing image id: ``file_name`` (``image_root`` + the last two
    parts of ``coco_url``), ``height``, ``width``, ``image_id``, ``neg_category_ids``,
    ``not_exhaustive_category_ids`` (LVIS 1-based ids) and ``annotations``, each with ``bbox``
    (XYWH_ABS), ``bbox_mode``, 0-based ``category_id`` and ``segmentation`` (the JSON's
    own lists, not copies, to keep memory at one parse).
    """
    anns_per_image = defaultdict(list)
    for a in data["annotations"]:
        anns_per_image[a["image_id"]].append({
            "bbox": a["bbox"], "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": a["category_id"] - 1, "segmentation": a["segmentation"]})
    images = {img["id"]: img for img in data["images"]}
    dicts = []
    for image_id in sorted(images):
        img = images[image_id]
        folder, file_name = img["coco_url"].split("/")[-2:]
        dicts.append({
            "file_name": os.path.join(image_root + folder, file_name),
            "height": img["height"],
            "width": img["width"],
            "not_exhaustive_category_ids": img.get("not_exhaustive_category_ids", []),
            "neg_category_ids": img.get("neg_category_ids", []),
            "image_id": image_id,
            "annotations": anns_per_image.pop(image_id, []),
        })
    return dicts


def load_lvis_format(json_file, image_root, dataset_name=None):
    """Load an LVIS-format JSON into detectron2 dataset dicts, parsing it once.

    Skips unusable annotations (see the module docstring) and raises ValueError naming the
    file on structural faults. Dataset dicts keep ``neg_category_ids`` and
    ``not_exhaustive_category_ids`` (LVIS, 1-based ids), which the EQL heads use for
    image-level category exclusion. With `dataset_name`, its category metadata is set from
    the same parse, or, if :func:`load_category_metadata` set it before, checked against it.
    """
    start = time.perf_counter()
    data = _read_lvis(json_file)
    if dataset_name is not None:
        _set_category_metadata(dataset_name, json_file, _category_metadata(data), check=True)
    root = image_root if image_root.endswith(os.sep) else image_root + os.sep
    dicts = _dataset_dicts(data, root)
    logger.info("Loaded %d images in the LVIS format from %s in %.1f s", len(dicts), json_file,
                time.perf_counter() - start)
    return dicts


class LVISFormatLoader:
    """The DatasetCatalog entry of an LVIS-format dataset: calling it returns the dataset
    dicts of :func:`load_lvis_format`. It also tells which JSON and image root the dataset
    is read from, so that training can map the same dataset from its compact form instead
    (:func:`eql_d2.data.compact.compact_dataset`).

    `ensure`, if given, is called first (it generates a Synthetic-LT dataset on first use).
    """

    def __init__(self, name, json_file, image_root, ensure=None):
        self.name, self.json_file, self.image_root, self.ensure = name, json_file, image_root, ensure

    def prepare(self):
        """Make the JSON exist (generating it if this dataset is generated)."""
        if self.ensure is not None:
            self.ensure()

    def __call__(self):
        self.prepare()
        return load_lvis_format(self.json_file, self.image_root, self.name)


def register_lvis_format(name, json_file, image_root, **extra_metadata):
    """Register an LVIS-format dataset (evaluated with LVISEvaluator) under `name`."""
    DatasetCatalog.register(name, LVISFormatLoader(name, json_file, image_root))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="lvis", **extra_metadata
    )


def register_builtin_lvis(names=BUILTIN_LVIS_ANNOTATED):
    """Load detectron2's built-in LVIS splits `names` with :func:`load_lvis_format`.

    Their metadata (paths under ``$DETECTRON2_DATASETS``, detectron2's category tables) is
    kept; only the loader changes. Names detectron2 did not register are left alone.
    """
    for name in names:
        if name not in DatasetCatalog.list():
            continue
        meta = MetadataCatalog.get(name)
        json_file, image_root = meta.get("json_file"), meta.get("image_root")
        if json_file is None or image_root is None:
            continue
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, LVISFormatLoader(name, json_file, image_root))


# ------------------------------------------------------------------ category metadata cache


def cache_root():
    """Folder of eql_d2's caches: ``$EQL_D2_CACHE_DIR``, else ``$XDG_CACHE_HOME/eql_d2``, else
    ``~/.cache/eql_d2``."""
    return os.environ.get("EQL_D2_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "eql_d2")


def cache_name(json_file, kind):
    """``<kind>-<hash of the JSON's absolute path>``: the name of a cache entry of `json_file`."""
    digest = hashlib.sha1(os.path.abspath(json_file).encode()).hexdigest()[:16]
    return f"{kind}-{digest}"


def metadata_cache_file(json_file):
    """Where the category metadata of `json_file` is cached (see the module docstring)."""
    return os.path.join(cache_root(), cache_name(json_file, "categories") + ".json")


def file_key(json_file, version=METADATA_CACHE_VERSION):
    """What a cache entry of `json_file` is valid for: its path, size and modification time,
    and the `version` of the cache's format."""
    st = os.stat(json_file)
    return {"json_file": os.path.abspath(json_file), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "version": version}


def _cached_metadata(json_file, key):
    path = metadata_cache_file(json_file)
    try:
        with open(path) as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    return entry.get("metadata")


def _write_cached_metadata(json_file, key, info):
    path = metadata_cache_file(json_file)
    try:
        write_json_atomic(path, {"key": key, "metadata": info})
    except OSError as e:
        # without the cache every process parses the JSON once more; training is unaffected
        logger.warning("Could not write the category metadata cache %s (%s); set EQL_D2_CACHE_DIR "
                       "to a writable folder to spare the other processes a parse of %s",
                       path, e, json_file)


# reentrant: load_category_metadata holds it while _set_category_metadata takes it again
_category_lock = threading.RLock()


def load_category_metadata(dataset_name):
    """Fill `thing_classes`, `class_image_count`, `class_frequency` of a registered dataset.

    Reads them from the metadata cache when it matches the dataset's JSON, else from the
    JSON itself (for Synthetic-LT, generating it first), writing the cache. When a
    class_image_count registered earlier (detectron2's built-in LVIS tables) disagrees with
    the JSON, the JSON's counts replace it, with a warning. For built-in LVIS names whose JSON
    is not on disk, the built-in metadata is kept.
    Returns the dataset's Metadata.
    """
    with _category_lock:
        meta = MetadataCatalog.get(dataset_name)
        if meta.get("class_frequency") is not None:
            return meta
        if dataset_name in SYNTHETIC_LT_SPLITS:
            ensure_synthetic_lt()
        elif dataset_name in SYNTHETIC_PRESET_SPLITS:
            preset, _ = SYNTHETIC_PRESET_SPLITS[dataset_name]
            ensure_synthetic_preset(preset, meta.get("image_root"))
        json_file = meta.get("json_file")
        if json_file is None:
            return meta
        if not os.path.isfile(json_file) and meta.get("thing_classes") and dataset_name.startswith("lvis"):
            return meta
        key = file_key(json_file)
        info = _cached_metadata(json_file, key)
        if info is not None:
            logger.info("Category metadata of %s from %s", dataset_name, metadata_cache_file(json_file))
        else:
            info = _category_metadata(_read_lvis(json_file))
            _write_cached_metadata(json_file, key, info)
        return _set_category_metadata(dataset_name, json_file, info)


def store_category_metadata(dataset_name, json_file, info):
    """Set `info` (:func:`category_info` of `json_file`, computed elsewhere) as the dataset's
    category metadata and cache it, as :func:`load_category_metadata` does after a parse."""
    with _category_lock:
        key = file_key(json_file)
        if _cached_metadata(json_file, key) is None:
            _write_cached_metadata(json_file, key, info)
        return _set_category_metadata(dataset_name, json_file, info)


def _set_category_metadata(dataset_name, json_file, info, check=False):
    """Set `info` on the dataset's Metadata where absent; with `check`, metadata set before
    (from the cache or another parse) must agree with it."""
    with _category_lock:
        meta = MetadataCatalog.get(dataset_name)
        if meta.get("class_frequency") is not None:
            if check and (not _names_agree(list(meta.thing_classes), info)
                          or _image_counts(meta.class_image_count) != _image_counts(info["class_image_count"])):
                raise ValueError(
                    f"{json_file}: its categories or image counts differ from the metadata "
                    f"'{dataset_name}' was set up with (the file changed after it was read, or "
                    f"the cache {metadata_cache_file(json_file)} is stale: delete it)")
            return meta
        if meta.get("thing_classes") is not None and not _names_agree(list(meta.thing_classes), info):
            raise ValueError(
                f"{json_file}: category names disagree with the metadata already registered "
                f"for '{dataset_name}'"
            )
        info = {k: v for k, v in info.items() if not k.startswith("_")}
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
    if have is not None and have.get("version") == _synthetic().GENERATOR_VERSION:
        _synthetic().add_federated_val(root)
        return root
    synthetic = _synthetic()
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
        DatasetCatalog.register(name, LVISFormatLoader(
            name, json_file, root, ensure=functools.partial(ensure_synthetic_lt, root)))
        MetadataCatalog.get(name).set(json_file=json_file, image_root=root, evaluator_type="lvis")


# ----------------------------------------------------------------------------- Synthetic-LVIS

# Presets of eql_d2.data.synthetic registered as <preset>_{train,val,val_fed}, each with the
# environment variable that names its folder.
SYNTHETIC_PRESET_ROOT_VARS = {
    "synthetic_lvis": "EQL_D2_SYNTHETIC_LVIS_ROOT",
    "synthetic_lvis_balanced": "EQL_D2_SYNTHETIC_LVIS_BALANCED_ROOT",
    "synthetic_hard_tail": "EQL_D2_SYNTHETIC_HARD_TAIL_ROOT",
    "synthetic_hard_tail_pretrain": "EQL_D2_SYNTHETIC_HARD_TAIL_PRETRAIN_ROOT",
}

# registered name -> (preset, split file lvis_v1_<split>.json)
SYNTHETIC_PRESET_SPLITS = {f"{preset}_{split}": (preset, split)
                           for preset in SYNTHETIC_PRESET_ROOT_VARS
                           for split in ("train", "val", "val_fed")}


def synthetic_preset_root(preset):
    """Folder of a registered preset (:data:`SYNTHETIC_PRESET_ROOT_VARS`): its environment
    variable if set, else ``$DETECTRON2_DATASETS/<preset>`` (default ``datasets/<preset>``)."""
    root = os.environ.get(SYNTHETIC_PRESET_ROOT_VARS[preset])
    if root:
        return os.path.abspath(root)
    return os.path.abspath(os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), preset))


def ensure_synthetic_preset(preset, root=None):
    """Return `root` (default :func:`synthetic_preset_root`) holding the preset, generating
    it if absent (one time, a few minutes); as :func:`ensure_synthetic_lt` otherwise."""
    return ensure_synthetic_lt(root or synthetic_preset_root(preset), _synthetic().PRESETS[preset])


def register_synthetic_presets(presets=tuple(SYNTHETIC_PRESET_ROOT_VARS)):
    """Register ``<preset>_train``, ``<preset>_val`` (exhaustive) and ``<preset>_val_fed``
    (federated, as LVIS val) of each preset, generated on first use."""
    for name, (preset, split) in SYNTHETIC_PRESET_SPLITS.items():
        if preset not in presets:
            continue
        root = synthetic_preset_root(preset)
        json_file = os.path.join(root, f"lvis_v1_{split}.json")
        DatasetCatalog.register(name, LVISFormatLoader(
            name, json_file, root, ensure=functools.partial(ensure_synthetic_preset, preset, root)))
        MetadataCatalog.get(name).set(json_file=json_file, image_root=root, evaluator_type="lvis")


def synthetic_lvis_root():
    """:func:`synthetic_preset_root` of ``synthetic_lvis``."""
    return synthetic_preset_root("synthetic_lvis")


def ensure_synthetic_lvis(root=None):
    """:func:`ensure_synthetic_preset` of ``synthetic_lvis``."""
    return ensure_synthetic_preset("synthetic_lvis", root)


def register_synthetic_lvis():
    """:func:`register_synthetic_presets` of ``synthetic_lvis`` alone."""
    register_synthetic_presets(("synthetic_lvis",))


# ----------------------------------------------------------------------------- all built-in


def register_all():
    """Register Synthetic-LT, the Synthetic-LVIS presets (folders from the environment, as
    :func:`synthetic_lt_root` and :func:`synthetic_preset_root` read it now) and the checked
    loader of detectron2's annotated LVIS splits. Names already registered are left as
    they are, so a second call changes nothing."""
    registered = DatasetCatalog.list()
    if "synthetic_lt_train" not in registered:
        register_synthetic_lt()
    presets = tuple(p for p in SYNTHETIC_PRESET_ROOT_VARS if f"{p}_train" not in registered)
    if presets:
        register_synthetic_presets(presets)
    register_builtin_lvis()
