"""Open Images Challenge 2019 detection data for detectron2, from the challenge CSVs or from
a COCO-style JSON; both give the same dataset dicts.

Layout under ``$DETECTRON2_DATASETS/openimages/`` (the challenge's own file names)::

    challenge2019/challenge-2019-classes-description-500.csv          LabelName,DisplayName
    challenge2019/challenge-2019-label500-hierarchy.json               class hierarchy
    challenge2019/challenge-2019-{train,validation}-detection-bbox.csv
        ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,
        IsGroupOf,IsDepiction,IsInside     (boxes in [0, 1] of the image's width / height)
    challenge2019/challenge-2019-{train,validation}-detection-human-imagelabels.csv
        ImageID,Source,LabelName,Confidence   (1: verified present, 0: verified absent)
    train/<ImageID>.jpg, validation/<ImageID>.jpg
    annotations/openimages_challenge_2019_{train,validation}.json     (COCO-style form)

The COCO-style JSON is what ``python -m eql_d2.data.openimages convert`` writes from the CSVs
(it reads each image's size once from its file header, which the CSVs lack; train from
JSON, so that start-up does not read 1.7 million headers):

- ``categories``: ``id`` 1..500 in the class-description order, ``name`` (DisplayName),
  ``freebase_id`` (LabelName), ``image_count`` and ``instance_count`` (train images with a
  box of the class, and its train boxes);
- ``images``: ``id`` (1-based rank of the ImageID in sorted order), ``file_name``,
  ``oid_image_id``, ``height``, ``width``, ``pos_category_ids`` / ``neg_category_ids``
  (the verified image-level labels, category ids);
- ``annotations``: ``id``, ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` in
  pixels, ``area``, ``iscrowd`` 0, ``isgroupof`` 0 / 1.

A dataset dict (one per image, by ImageID) holds ``file_name``, ``height``, ``width``,
``image_id``, ``oid_image_id``, ``annotations`` (``bbox`` XYWH_ABS, ``category_id`` 0-based,
``is_group_of``; group-of boxes are trained on as ordinary boxes), and the image-level
labels the way LVIS's travel to the heads (:mod:`eql_d2.data.image_labels`):
``neg_category_ids`` (verified absent), ``pos_category_ids`` (verified present) and
``not_exhaustive_category_ids``, the positive labels without a box of their class in the
image (present but not boxed, LVIS's meaning). EQL's exclusion keeps at full weight an
image's box classes and verified negatives; the evaluator reads all three lists.

Labels are not expanded up the hierarchy for training (the files are read as they are);
the evaluator (:mod:`eql_d2.evaluation.oid_evaluation`) expands the ground truth.

A malformed row raises an error naming the file and line (JSON: the entry): an unknown
class, a box outside [0, 1] or with XMin > XMax, a flag other than 0 / 1, a missing image.

Metadata: ``thing_classes`` (display names), ``class_mids``, ``class_parents`` (per class,
its direct parents in the hierarchy), ``class_image_count``, ``class_instance_count``
(images with a box of the class, boxes of it), ``class_frequency`` (LVIS's
r / c / f bands), ``num_train_images`` and ``evaluator_type`` "oid". They are computed on
first access from the class file, the hierarchy and one pass over the boxes (cached in
``$EQL_D2_CACHE_DIR`` as the LVIS metadata is), so that a model can be built before the
dataset dicts are loaded.
"""

import argparse
import csv
import functools
import json
import logging
import math
import os
import sys
from collections import defaultdict

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.structures import BoxMode
from PIL import Image

from ..utils.io import read_json, write_json_atomic
from .datasets import cache_name, cache_root, file_key

__all__ = [
    "BBOX_HEADER",
    "LABELS_HEADER",
    "OIDMetadata",
    "builtin_openimages_files",
    "convert_to_json",
    "load_oid_csv",
    "load_oid_json",
    "oid_category_metadata",
    "read_class_descriptions",
    "read_class_parents",
    "register_builtin_openimages",
    "register_openimages",
]

logger = logging.getLogger(__name__)

BBOX_HEADER = ["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax",
               "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"]
LABELS_HEADER = ["ImageID", "Source", "LabelName", "Confidence"]
CATEGORY_KEYS = ("thing_classes", "class_mids", "class_parents", "class_image_count",
                 "class_instance_count", "class_frequency", "num_train_images")
METADATA_CACHE_VERSION = 1


# ---------------------------------------------------------------------------- reading


def read_class_descriptions(path):
    """(LabelNames, DisplayNames) of a class-description CSV (no header, two columns)."""
    mids, names, seen = [], [], set()
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) != 2 or not row[0]:
                raise ValueError(f"{path}:{line}: expected 'LabelName,DisplayName', got {row!r}")
            if row[0] in seen:
                raise ValueError(f"{path}:{line}: class {row[0]!r} listed twice")
            seen.add(row[0])
            mids.append(row[0])
            names.append(row[1])
    if not mids:
        raise ValueError(f"{path}: no classes")
    return mids, names


def read_class_parents(path, mids):
    """Per class (in `mids` order), the indices of its direct parents in the hierarchy JSON
    at `path` (None: no hierarchy, every class a root)."""
    from ..evaluation.oid_evaluation import ClassHierarchy

    if path is None:
        return [[] for _ in mids]
    tree = read_json(path, "Open Images class hierarchy")
    index = {m: i for i, m in enumerate(mids)}
    return ClassHierarchy.from_oid_json(tree, index, path).parents


def _rows(path, header):
    """(line number, row) of a CSV with `header`; raises naming the file on another header
    and the line on a row of another length."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        first = next(reader, None)
        if first != header:
            raise ValueError(f"{path}:1: header {first!r}, expected {','.join(header)}")
        for line, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{line}: {len(row)} fields, expected {len(header)}")
            yield line, row


def _flag(value, path, line, key):
    if value not in ("0", "1"):
        raise ValueError(f"{path}:{line}: {key} must be 0 or 1, got {value!r}")
    return int(value)


def _class_of(label, index, path, line):
    if label not in index:
        raise ValueError(f"{path}:{line}: unknown class {label!r} (not in the class descriptions)")
    return index[label]


def _read_boxes(path, index):
    """{ImageID: [(class, XMin, XMax, YMin, YMax, is_group_of)]} in file order, and the line
    each image first appears on."""
    boxes, first_line = defaultdict(list), {}
    for line, row in _rows(path, BBOX_HEADER):
        image_id, label = row[0], row[2]
        cls = _class_of(label, index, path, line)
        try:
            x0, x1, y0, y1 = (float(v) for v in row[4:8])
        except ValueError:
            raise ValueError(f"{path}:{line}: box {row[4:8]!r} is not numeric") from None
        if not all(0.0 <= v <= 1.0 for v in (x0, x1, y0, y1)) or x0 > x1 or y0 > y1:
            raise ValueError(f"{path}:{line}: box XMin {x0}, XMax {x1}, YMin {y0}, YMax {y1} "
                             "outside [0, 1] or with min > max")
        group_of = _flag(row[10], path, line, "IsGroupOf")
        boxes[image_id].append((cls, x0, x1, y0, y1, group_of))
        first_line.setdefault(image_id, line)
    return boxes, first_line


def _read_labels(path, index):
    """{ImageID: (positive classes, negative classes)} and first lines."""
    labels, first_line = defaultdict(lambda: (set(), set())), {}
    for line, row in _rows(path, LABELS_HEADER):
        cls = _class_of(row[2], index, path, line)
        confidence = _flag(row[3], path, line, "Confidence")
        labels[row[0]][0 if confidence else 1].add(cls)
        first_line.setdefault(row[0], line)
    return labels, first_line


def _image_size(file_name, where):
    if not os.path.isfile(file_name):
        raise FileNotFoundError(f"{where}: image not found: {file_name}")
    with Image.open(file_name) as im:
        width, height = im.size
    return height, width


def _image_dict(image_id, oid_image_id, file_name, height, width, annotations, pos, neg):
    boxed = {a["category_id"] for a in annotations}
    return {"file_name": file_name, "height": height, "width": width, "image_id": image_id,
            "oid_image_id": oid_image_id, "annotations": annotations,
            "pos_category_ids": sorted(c + 1 for c in pos),
            "neg_category_ids": sorted(c + 1 for c in neg),
            "not_exhaustive_category_ids": sorted(c + 1 for c in set(pos) - boxed)}


def load_oid_csv(bbox_csv, labels_csv, classes_csv, image_root, image_ext=".jpg"):
    """Dataset dicts (module docstring) of the challenge CSVs: every image of the box file
    or the image-level label file, ``<image_root>/<ImageID><image_ext>``."""
    mids, _ = read_class_descriptions(classes_csv)
    index = {m: i for i, m in enumerate(mids)}
    boxes, box_lines = _read_boxes(bbox_csv, index)
    labels, label_lines = ({}, {}) if labels_csv is None else _read_labels(labels_csv, index)
    dicts = []
    for rank, oid_id in enumerate(sorted(set(boxes) | set(labels)), 1):
        file_name = os.path.join(image_root, oid_id + image_ext)
        where = (f"{bbox_csv}:{box_lines[oid_id]}" if oid_id in box_lines
                 else f"{labels_csv}:{label_lines[oid_id]}")
        height, width = _image_size(file_name, where)
        anns = [{"bbox": [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height],
                 "bbox_mode": BoxMode.XYWH_ABS, "category_id": c, "is_group_of": g}
                for c, x0, x1, y0, y1, g in boxes.get(oid_id, ())]
        pos, neg = labels.get(oid_id, ((), ()))
        dicts.append(_image_dict(rank, oid_id, file_name, height, width, anns, pos, neg))
    logger.info("Loaded %d Open Images images from %s", len(dicts), bbox_csv)
    return dicts


def _checked_ids(ids, key, where, num_classes):
    if not isinstance(ids, list) or not all(isinstance(c, int) and 1 <= c <= num_classes
                                            for c in ids):
        raise ValueError(f"{where}: {key} must be a list of category ids in 1..{num_classes}, "
                         f"got {ids!r:.80}")
    return [c - 1 for c in ids]


def load_oid_json(json_file, image_root):
    """Dataset dicts (module docstring) of the COCO-style JSON form."""
    data = read_json(json_file, "Open Images COCO-style annotation file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise ValueError(f"{json_file}: missing or malformed '{key}' (must be a list)")
    num_classes = len(data["categories"])
    if sorted(c.get("id") for c in data["categories"]) != list(range(1, num_classes + 1)):
        raise ValueError(f"{json_file}: category ids must be 1..{num_classes}")
    images = {}
    for i, img in enumerate(data["images"]):
        where = f"{json_file}: images[{i}]"
        for key in ("id", "file_name", "height", "width"):
            if key not in img:
                raise ValueError(f"{where} has no '{key}'")
        if img["id"] in images:
            raise ValueError(f"{where}: image id {img['id']} listed twice")
        file_name = os.path.join(image_root, img["file_name"])
        if not os.path.isfile(file_name):
            raise FileNotFoundError(f"{where} (id {img['id']}): image not found: {file_name}")
        images[img["id"]] = (img, _checked_ids(img.get("pos_category_ids", []), "pos_category_ids",
                                               where, num_classes),
                             _checked_ids(img.get("neg_category_ids", []), "neg_category_ids",
                                          where, num_classes), [])
    for i, a in enumerate(data["annotations"]):
        where = f"{json_file}: annotations[{i}] (id {a.get('id')})"
        if a.get("image_id") not in images:
            raise ValueError(f"{where}: unknown image_id {a.get('image_id')!r}")
        img = images[a["image_id"]][0]
        cid = a.get("category_id")
        if not isinstance(cid, int) or not 1 <= cid <= num_classes:
            raise ValueError(f"{where}: unknown category_id {cid!r} (ids are 1..{num_classes})")
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            raise ValueError(f"{where}: malformed bbox {bbox!r}")
        x, y, w, h = bbox
        eps = 1e-6 * max(img["width"], img["height"])
        if w < 0 or h < 0 or x < -eps or y < -eps or x + w > img["width"] + eps \
                or y + h > img["height"] + eps:
            raise ValueError(f"{where}: box {bbox} outside the image "
                             f"({img['width']} x {img['height']})")
        group_of = a.get("isgroupof", 0)
        if group_of not in (0, 1):
            raise ValueError(f"{where}: isgroupof must be 0 or 1, got {group_of!r}")
        images[a["image_id"]][3].append({"bbox": list(bbox), "bbox_mode": BoxMode.XYWH_ABS,
                                         "category_id": cid - 1, "is_group_of": int(group_of)})
    dicts = []
    for image_id in sorted(images):
        img, pos, neg, anns = images[image_id]
        oid_id = img.get("oid_image_id") or os.path.splitext(os.path.basename(img["file_name"]))[0]
        dicts.append(_image_dict(image_id, oid_id, os.path.join(image_root, img["file_name"]),
                                 img["height"], img["width"], anns, pos, neg))
    logger.info("Loaded %d Open Images images from %s", len(dicts), json_file)
    return dicts


def convert_to_json(bbox_csv, labels_csv, classes_csv, image_root, out_file, *,
                    train_bbox_csv=None, image_ext=".jpg"):
    """Write the COCO-style form of the challenge CSVs to `out_file`. Category
    ``image_count`` / ``instance_count``: train images with a box of the class and its
    train boxes, from `train_bbox_csv` (default `bbox_csv`: converting the train split
    itself). Returns the dataset dicts."""
    dicts = load_oid_csv(bbox_csv, labels_csv, classes_csv, image_root, image_ext)
    mids, names = read_class_descriptions(classes_csv)
    counts, instances, _ = _box_counts(train_bbox_csv or bbox_csv, mids)
    images, annotations = [], []
    for d in dicts:
        images.append({"id": d["image_id"],
                       "file_name": os.path.relpath(d["file_name"], image_root),
                       "oid_image_id": d["oid_image_id"], "height": d["height"],
                       "width": d["width"], "pos_category_ids": d["pos_category_ids"],
                       "neg_category_ids": d["neg_category_ids"]})
        for a in d["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": d["image_id"],
                                "category_id": a["category_id"] + 1, "bbox": a["bbox"],
                                "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0,
                                "isgroupof": a["is_group_of"]})
    categories = [{"id": k + 1, "name": n, "freebase_id": m, "image_count": c,
                   "instance_count": i}
                  for k, (m, n, c, i) in enumerate(zip(mids, names, counts, instances))]
    info = {"description": f"converted from {os.path.basename(bbox_csv)}"}
    write_json_atomic(out_file, {"info": info, "categories": categories, "images": images,
                                 "annotations": annotations})
    return dicts


def _box_counts(bbox_csv, mids):
    """(images with a box of each class, boxes of each class, images with a box) of a box
    CSV."""
    index = {m: i for i, m in enumerate(mids)}
    boxes, _ = _read_boxes(bbox_csv, index)
    images, instances = [0] * len(mids), [0] * len(mids)
    for rows in boxes.values():
        for c in {r[0] for r in rows}:
            images[c] += 1
        for r in rows:
            instances[r[0]] += 1
    return images, instances, len(boxes)


# --------------------------------------------------------------------------- metadata


def oid_category_metadata(classes_csv, hierarchy_json, bbox_csv=None, json_file=None):
    """Category metadata (module docstring) of a split: from the JSON's categories'
    ``image_count`` when it has them, else counted from the boxes (CSV or JSON)."""
    from .synthetic import frequency_group

    mids, names = read_class_descriptions(classes_csv)
    parents = read_class_parents(hierarchy_json, mids)
    if json_file is not None:
        data = read_json(json_file, "Open Images COCO-style annotation file")
        cats = sorted(data["categories"], key=lambda c: c["id"])
        if [c.get("freebase_id", m) for c, m in zip(cats, mids)] != mids or len(cats) != len(mids):
            raise ValueError(f"{json_file}: its categories are not the classes of {classes_csv}")
        if all("image_count" in c and "instance_count" in c for c in cats):
            counts = [int(c["image_count"]) for c in cats]
            instances = [int(c["instance_count"]) for c in cats]
        else:
            per, instances = [set() for _ in mids], [0] * len(mids)
            for a in data["annotations"]:
                per[a["category_id"] - 1].add(a["image_id"])
                instances[a["category_id"] - 1] += 1
            counts = [len(s) for s in per]
        num_images = len(data["images"])
    else:
        counts, instances, num_images = _box_counts(bbox_csv, mids)
    return {"thing_classes": names, "class_mids": mids, "class_parents": parents,
            "class_image_count": [{"id": k + 1, "image_count": n} for k, n in enumerate(counts)],
            "class_instance_count": [{"id": k + 1, "instance_count": n}
                                     for k, n in enumerate(instances)],
            "class_frequency": [frequency_group(n) for n in counts],
            "num_train_images": num_images}


def _cached_category_metadata(files, ensure=None):
    """:func:`oid_category_metadata` of `files`, through the cache (keyed by the files'
    paths, sizes and modification times)."""
    if ensure is not None:
        ensure()
    paths = [p for p in (files.get("json_file") or files["bbox_csv"], files["classes_csv"],
                         files.get("hierarchy_json")) if p]
    key = [file_key(p, METADATA_CACHE_VERSION) for p in paths]
    cache = os.path.join(cache_root(), cache_name(paths[0], "oid-categories") + ".json")
    try:
        with open(cache) as f:
            entry = json.load(f)
        if entry.get("key") == key:
            return entry["metadata"]
    except (OSError, ValueError):
        pass
    info = oid_category_metadata(files["classes_csv"], files.get("hierarchy_json"),
                                 files.get("bbox_csv"), files.get("json_file"))
    try:
        write_json_atomic(cache, {"key": key, "metadata": info})
    except OSError as e:
        logger.warning("Could not write the category metadata cache %s (%s)", cache, e)
    return info


class OIDMetadata(Metadata):
    """detectron2 Metadata whose category keys (:data:`CATEGORY_KEYS`) are computed on
    first access, from the files of ``oid_files`` (after ``oid_ensure``, which generates a
    generated dataset on first use)."""

    def __getattr__(self, key):
        d = self.__dict__
        if key in CATEGORY_KEYS and "oid_files" in d and not d.get("_loading"):
            object.__setattr__(self, "_loading", True)
            try:
                info = _cached_category_metadata(d["oid_files"], d.get("oid_ensure"))
                for k, v in info.items():
                    if k not in d:
                        object.__setattr__(self, k, v)
            finally:
                object.__setattr__(self, "_loading", False)
            return d[key]
        return super().__getattr__(key)


# ----------------------------------------------------------------------- registration


class OIDLoader:
    """The DatasetCatalog entry of an Open Images split: its dataset dicts, from the JSON
    form when given, else from the CSVs (after `ensure`, if any)."""

    def __init__(self, name, files, image_root, ensure=None, image_ext=".jpg"):
        self.name, self.files, self.image_root, self.ensure = name, files, image_root, ensure
        self.image_ext = image_ext

    def __call__(self):
        if self.ensure is not None:
            self.ensure()
        if self.files.get("json_file"):
            return load_oid_json(self.files["json_file"], self.image_root)
        return load_oid_csv(self.files["bbox_csv"], self.files.get("labels_csv"),
                            self.files["classes_csv"], self.image_root, self.image_ext)


def register_openimages(name, image_root, classes_csv, hierarchy_json=None, *, bbox_csv=None,
                        labels_csv=None, json_file=None, ensure=None, image_ext=".jpg"):
    """Register an Open Images split under `name` (evaluated by OIDEvaluator): the JSON
    form when `json_file` is given, else the box and image-level label CSVs. The class
    file (and the hierarchy) give the classes in both forms. `ensure`, if given, is called
    before any file is read (it generates a generated dataset). CSV images are
    ``<image_root>/<ImageID><image_ext>``."""
    if (json_file is None) == (bbox_csv is None):
        raise ValueError(f"register_openimages({name!r}): give json_file or bbox_csv (one of them)")
    files = {"classes_csv": classes_csv, "hierarchy_json": hierarchy_json, "bbox_csv": bbox_csv,
             "labels_csv": labels_csv, "json_file": json_file}
    DatasetCatalog.register(name, OIDLoader(name, files, image_root, ensure, image_ext))
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    meta = OIDMetadata(name=name)
    MetadataCatalog[name] = meta
    meta.set(oid_files=files, image_root=image_root, evaluator_type="oid")
    if ensure is not None:
        object.__setattr__(meta, "oid_ensure", ensure)
    return meta


def builtin_openimages_files(root, split):
    """The files of the challenge 2019 split ("train" or "validation") under `root`."""
    folder = os.path.join(root, "challenge2019")
    return {"classes_csv": os.path.join(folder, "challenge-2019-classes-description-500.csv"),
            "hierarchy_json": os.path.join(folder, "challenge-2019-label500-hierarchy.json"),
            "bbox_csv": os.path.join(folder, f"challenge-2019-{split}-detection-bbox.csv"),
            "labels_csv": os.path.join(
                folder, f"challenge-2019-{split}-detection-human-imagelabels.csv"),
            "json_file": os.path.join(root, "annotations",
                                      f"openimages_challenge_2019_{split}.json")}


BUILTIN_SPLITS = {"oid_challenge_2019_train": "train", "oid_challenge_2019_val": "validation"}


def register_builtin_openimages(root=None):
    """Register ``oid_challenge_2019_{train,val}`` (from the CSVs) and
    ``oid_challenge_2019_{train,val}_json`` (the COCO-style form) under `root` (default
    ``$DETECTRON2_DATASETS/openimages``); names already registered are left alone."""
    root = root or os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "openimages")
    for name, split in BUILTIN_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        f = builtin_openimages_files(root, split)
        image_root = os.path.join(root, split)
        register_openimages(name, image_root, f["classes_csv"], f["hierarchy_json"],
                            bbox_csv=f["bbox_csv"], labels_csv=f["labels_csv"])
        register_openimages(name + "_json", image_root, f["classes_csv"], f["hierarchy_json"],
                            json_file=f["json_file"])


SYNTHETIC_OID_SPLITS = {"synthetic_oid_train": ("train", "train"),
                        "synthetic_oid_val": ("validation", "val")}


def synthetic_oid_root():
    """``$EQL_D2_SYNTHETIC_OID_ROOT``, else ``$DETECTRON2_DATASETS/synthetic_oid``."""
    root = os.environ.get("EQL_D2_SYNTHETIC_OID_ROOT")
    if root:
        return os.path.abspath(root)
    return os.path.abspath(os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"),
                                        "synthetic_oid"))


def _ensure_synthetic_oid(root):
    # the generator is imported on first load, not with the package, so that
    # ``python -m eql_d2.data.synthetic_oid`` runs a module not yet imported
    from .synthetic_oid import ensure_synthetic_oid

    return ensure_synthetic_oid(root)


def register_synthetic_oid(root=None):
    """Register ``synthetic_oid_train`` and ``synthetic_oid_val`` (:mod:`.synthetic_oid`; names
    already registered are left alone), generated into `root` on first use."""
    root = root or synthetic_oid_root()
    for name, (split, folder) in SYNTHETIC_OID_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        f = builtin_openimages_files(root, split)
        register_openimages(name, os.path.join(root, folder), f["classes_csv"],
                            f["hierarchy_json"], bbox_csv=f["bbox_csv"],
                            labels_csv=f["labels_csv"],
                            ensure=functools.partial(_ensure_synthetic_oid, root),
                            image_ext=".png")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert an Open Images Challenge 2019 split from its CSVs to the "
                    "COCO-style JSON eql_d2 trains from (see eql_d2/data/openimages.py).")
    parser.add_argument("command", choices=["convert"])
    parser.add_argument("--root", default=os.path.join(
        os.environ.get("DETECTRON2_DATASETS", "datasets"), "openimages"))
    parser.add_argument("--split", choices=["train", "validation"], required=True)
    args = parser.parse_args(argv)
    f = builtin_openimages_files(args.root, args.split)
    train = builtin_openimages_files(args.root, "train")["bbox_csv"]
    dicts = convert_to_json(f["bbox_csv"], f["labels_csv"], f["classes_csv"],
                            os.path.join(args.root, args.split), f["json_file"],
                            train_bbox_csv=train if os.path.isfile(train) else None)
    print(f"wrote {f['json_file']}: {len(dicts)} images")


if __name__ == "__main__":
    sys.exit(main())
