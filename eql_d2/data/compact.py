"""Compact form of an LVIS-format training set: converted once, mapped by every process.

Loading an LVIS-format JSON into dataset dicts costs every training process the whole file
as Python objects (docs/PERFORMANCE.md, "Start-up"). Here the JSON is converted once, by a streaming parse that never holds its annotations, into
flat numpy arrays in ``$EQL_D2_CACHE_DIR/compact-<hash of the JSON's path>/`` (valid while
the JSON's path, size and modification time are unchanged, as the category metadata cache;
the dataset folder is never written to). Every process maps those files read-only, so the
operating system keeps one copy of them per machine, and :class:`CompactDataset` builds
the dataset dict of an image when it is read: the dict :func:`~eql_d2.data.load_lvis_format`
gives for it (same keys, equal values; boxes and polygon coordinates as Python floats).

The conversion applies the checks of :func:`~eql_d2.data.load_lvis_format` with the same
code (the same skipped annotations, warning and ``ValueError`` naming file and field). A
file the streaming parse does not handle (not valid JSON, ``NaN`` / ``Infinity`` numbers,
an unexpected top level) is read with the full parser instead, which raises that loader's
error or, for non-finite numbers, reads it as that loader does. The compact form needs
LVIS's integer image ids, sizes and category ids and numeric polygon coordinates; anything
else is a ``ValueError`` naming the image or annotation.

Layout of the cache folder: ``meta.json`` (the JSON's key, its categories, and the dtype and
shape of every array) and one raw ``<array>.bin`` per array:

- per image, by increasing image id: ``image_id``, ``height``, ``width``; ``file``
  (``<folder>/<file>`` of ``coco_url``, UTF-8, ``file_offsets`` [images + 1] into
  ``file_bytes``); ``neg_category_ids`` and ``not_exhaustive_category_ids`` (LVIS ids of
  all images, ``<name>_offsets`` [images + 1] into them); ``ann_offsets`` [images + 1] into
  the annotations;
- per usable annotation, grouped by image in file order: ``category`` (0-based), ``bbox``
  [annotations, 4] (XYWH, float64), ``poly_start`` and ``poly_count`` (its polygons);
- per polygon, in file order: ``coord_offsets`` [polygons + 1] into ``coords`` (float64).

The folder is written under a temporary name and renamed when complete, so a cut-off
conversion never looks complete; a folder whose files do not have the sizes ``meta.json``
states is rebuilt.
"""

import array
import bisect
import collections.abc
import glob
import itertools
import json
import logging
import operator
import os
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import check_metadata_consistency, print_instances_class_histogram
from detectron2.structures import BoxMode

from ..utils.io import PARTIAL_SUFFIX, atomic_directory, write_json_atomic
from . import datasets
from .datasets import LVISFormatLoader

logger = logging.getLogger(__name__)

__all__ = ["CompactLVIS", "CompactDataset", "compact_cache_dir", "load_compact",
           "compact_dataset", "compact_detection_dataset", "compact_training_sets",
           "prepare_compact"]

# Bumped whenever the layout or the checks change, so older conversions are rebuilt.
COMPACT_VERSION = 1

# name -> dtype of every array of the layout (see the module docstring)
ARRAYS = {
    "image_id": np.int64, "height": np.int64, "width": np.int64,
    "file_offsets": np.int64, "file_bytes": np.uint8,
    "neg_category_ids_offsets": np.int64, "neg_category_ids": np.int64,
    "not_exhaustive_category_ids_offsets": np.int64, "not_exhaustive_category_ids": np.int64,
    "ann_offsets": np.int64, "category": np.int32, "bbox": np.float64,
    "poly_start": np.int64, "poly_count": np.int64,
    "coord_offsets": np.int64, "coords": np.float64,
}
IMAGE_LABELS = ("neg_category_ids", "not_exhaustive_category_ids")

# Polygon coordinates are written to disk in blocks of this many values (8 bytes each).
_COORDS_BLOCK = 1 << 22


def compact_cache_dir(json_file):
    """Folder of the compact form of `json_file` (see the module docstring)."""
    return os.path.join(datasets.cache_root(), datasets.cache_name(json_file, "compact"))


def _key(json_file):
    return datasets.file_key(json_file, version=COMPACT_VERSION)


# ----------------------------------------------------------------------------- reading


class CompactLVIS:
    """The mapped arrays of one converted LVIS-format JSON (see the module docstring).

    Attributes: ``folder``, ``json_file``, ``categories`` (the JSON's list), ``num_images``,
    ``num_annotations`` and one read-only array per name of :data:`ARRAYS`.
    """

    def __init__(self, folder):
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        if set(meta["arrays"]) != set(ARRAYS):
            raise ValueError(f"{folder}: arrays {sorted(meta['arrays'])} are not the layout's")
        self.folder = folder
        self.key = meta["key"]
        self.json_file = meta["key"]["json_file"]
        self.categories = meta["categories"]
        for name, spec in meta["arrays"].items():
            setattr(self, name, _map(os.path.join(folder, name + ".bin"), spec))
        self.num_images = len(self.image_id)
        self.num_annotations = len(self.category)
        for offsets, target in (("file_offsets", "file_bytes"), ("ann_offsets", "category"),
                                ("coord_offsets", "coords"),
                                *((f"{k}_offsets", k) for k in IMAGE_LABELS)):
            offs = getattr(self, offsets)
            if len(offs) < 1 or offs[-1] != len(getattr(self, target)):
                raise ValueError(f"{folder}: {offsets} does not end at the length of {target}")

    def __reduce__(self):
        # another process (a spawned data-loader worker) maps the same files again
        return CompactLVIS, (self.folder,)

    def record(self, index, image_root):
        """The dataset dict of image `index` (by increasing image id), as
        :func:`~eql_d2.data.load_lvis_format` builds it; `image_root` ends with a separator."""
        lo, hi = int(self.ann_offsets[index]), int(self.ann_offsets[index + 1])
        starts, counts = self.poly_start[lo:hi].tolist(), self.poly_count[lo:hi].tolist()
        annotations = []
        for box, category, start, count in zip(self.bbox[lo:hi].tolist(),
                                               self.category[lo:hi].tolist(), starts, counts):
            offs = self.coord_offsets[start:start + count + 1].tolist()
            coords = self.coords[offs[0]:offs[-1]].tolist()
            base = offs[0]
            annotations.append({
                "bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": category,
                "segmentation": [coords[a - base:b - base] for a, b in zip(offs, offs[1:])]})
        folder, file_name = self._file(index).split("/")
        labels = {k: self._image_labels(k, index) for k in IMAGE_LABELS}
        return {
            "file_name": os.path.join(image_root + folder, file_name),
            "height": int(self.height[index]),
            "width": int(self.width[index]),
            "not_exhaustive_category_ids": labels["not_exhaustive_category_ids"],
            "neg_category_ids": labels["neg_category_ids"],
            "image_id": int(self.image_id[index]),
            "annotations": annotations,
        }

    def _file(self, index):
        a, b = self.file_offsets[index], self.file_offsets[index + 1]
        return self.file_bytes[a:b].tobytes().decode("utf-8", "surrogatepass")

    def _image_labels(self, key, index):
        offs = getattr(self, f"{key}_offsets")
        return getattr(self, key)[offs[index]:offs[index + 1]].tolist()

    def file_names(self, indices, image_root):
        """The ``file_name`` of each image of `indices`, one at a time."""
        for index in indices:
            folder, file_name = self._file(index).split("/")
            yield os.path.join(image_root + folder, file_name)

    def annotation_indices(self, indices):
        """(annotation indices of the images `indices`, number of annotations of each image)."""
        starts = self.ann_offsets[indices]
        counts = self.ann_offsets[np.asarray(indices) + 1] - starts
        first = np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(starts, counts) + (np.arange(int(counts.sum())) - first), counts

    def image_counts(self):
        """Images with a usable annotation of each category (0-based), over all images."""
        images, categories = _image_category_pairs(self, np.arange(self.num_images))
        return np.bincount(categories, minlength=len(self.categories))[:len(self.categories)]

    def category_metadata(self):
        """The category metadata :func:`~eql_d2.data.read_lvis_categories` gives for the JSON
        (with the private ``_synonyms`` entry), from the compact form."""
        return datasets.category_info(self.categories, self.num_images,
                                      lambda: self.image_counts().tolist())


def _map(path, spec):
    dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if os.path.getsize(path) != size:
        raise ValueError(f"{path} holds {os.path.getsize(path)} bytes, not the {size} of "
                         f"{dtype} {list(shape)}")
    if size == 0:  # mmap refuses empty files
        return np.zeros(shape, dtype)
    # a plain ndarray view of the map: indexing a np.memmap costs a subclass per result
    return np.memmap(path, dtype, "r", shape=shape).view(np.ndarray)


def _image_category_pairs(compact, indices):
    """(position in `indices`, 0-based category) of each distinct category of each image."""
    ann, counts = compact.annotation_indices(indices)
    positions = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    num_classes = max(len(compact.categories), 1)
    pairs = np.unique(positions * num_classes + compact.category[ann])
    return pairs // num_classes, pairs % num_classes


def _open_valid(json_file):
    """The CompactLVIS of `json_file` if its cache folder is complete and made from the JSON
    as it is now, else None (with the reason logged)."""
    folder = compact_cache_dir(json_file)
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        return None
    try:
        compact = CompactLVIS(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("Compact form of %s at %s is incomplete or unreadable (%s); rebuilding it",
                       json_file, folder, e)
        return None
    if compact.key != _key(json_file):
        logger.info("Compact form of %s at %s was made from another version of the file; "
                    "rebuilding it", json_file, folder)
        return None
    return compact


def load_compact(json_file):
    """The CompactLVIS of `json_file`, converting it first when its cache folder is absent,
    incomplete or stale. Raises what :func:`~eql_d2.data.load_lvis_format` raises for a
    missing or faulty file."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"LVIS-format annotation file not found: {json_file}")
    compact = _open_valid(json_file)
    if compact is None:
        convert(json_file)
        compact = CompactLVIS(compact_cache_dir(json_file))
    return compact


# ----------------------------------------------------------------------------- conversion


def convert(json_file):
    """Convert `json_file` into its cache folder (replacing what is there). Returns it."""
    folder = compact_cache_dir(json_file)
    left = glob.glob(glob.escape(folder) + PARTIAL_SUFFIX + "-*")
    if left:
        logger.warning("Folders left by interrupted conversions of %s (delete them to free "
                       "the space): %s", json_file, ", ".join(left))
    start = time.perf_counter()
    key = _key(json_file)
    logger.info("Converting %s into its compact form in %s (once per version of the file)",
                json_file, folder)
    try:
        with atomic_directory(folder) as tmp:
            num_images, num_annotations = _convert_into(json_file, key, tmp)
            if _key(json_file) != key:
                raise ValueError(f"{json_file} changed while it was being converted; start again")
    except OSError as e:
        if e.filename != json_file:
            raise OSError(
                f"Could not write the compact form of {json_file} into {folder} ({e}); set "
                "EQL_D2_CACHE_DIR to a writable folder with room for it, or "
                "DATALOADER.COMPACT_DATASET False") from e
        raise
    logger.info("Converted %s (%d images, %d usable annotations) into %s in %.1f s", json_file,
                num_images, num_annotations, folder, time.perf_counter() - start)
    return folder


def _convert_into(json_file, key, folder):
    """Write the arrays and ``meta.json`` of `json_file` into `folder`; returns (images,
    usable annotations)."""
    structure = _read_structure(json_file)
    if structure is None:
        # the full parser raises load_lvis_format's error for what the stream could not take
        data = datasets._read_lvis(json_file)
        images, categories, annotations = data["images"], data["categories"], data["annotations"]
    else:
        images, categories = structure
        datasets._check_categories(json_file, categories)
        datasets._check_images(json_file, images)
        image_sizes = {img["id"]: (img["width"], img["height"]) for img in images}
        annotations = datasets._checked_annotations(
            json_file, image_sizes, len(categories), _stream_annotations(json_file))
    writer = _Writer(json_file, folder, images)
    try:
        for a in annotations:
            writer.add(a)
        shapes = writer.finish()
    finally:
        writer.coords_file.close()
    write_json_atomic(os.path.join(folder, "meta.json"), {
        "key": key, "categories": categories,
        "arrays": {name: {"dtype": np.dtype(ARRAYS[name]).str, "shape": list(shape)}
                   for name, shape in shapes.items()}})
    return len(images), shapes["category"][0]


def _read_structure(json_file):
    """(images, categories) of a JSON whose top level is an object with exactly one
    ``images``, ``annotations`` and ``categories`` list each, read by a streaming parse that
    skips the annotations; None for any other file (the full parser then names its fault)."""
    import ijson

    values, counts, first_event, current = {}, collections.Counter(), {}, None
    builder = None
    with open(json_file, "rb") as f:
        events, probe = itertools.tee(ijson.parse(f, use_float=True))
        # the annotations are most of the file: their events are dropped in C, unseen here
        outside = map(operator.not_, map(operator.methodcaller("startswith", "annotations."),
                                         map(operator.itemgetter(0), probe)))
        try:
            kept = itertools.compress(events, outside)
            if next(kept, None) != ("", "start_map", None):
                return None
            for prefix, event, value in kept:
                if prefix == "" and event in ("map_key", "end_map"):
                    if builder is not None:
                        values[current] = builder.value
                    builder = current = None  # after end_map: only a check that nothing follows
                    if event == "map_key":
                        current = value
                        counts[current] += 1
                        if current in ("images", "categories"):
                            builder = ijson.ObjectBuilder()
                    continue
                first_event.setdefault(current, event)
                if builder is not None:
                    builder.event(event, value)
        except (ijson.JSONError, UnicodeDecodeError):
            return None
    if counts[""] or any(k != "annotations" and k.startswith("annotations.") for k in counts):
        return None  # keys whose events the prefix test would confuse
    if any(counts[k] != 1 for k in ("images", "annotations", "categories")):
        return None
    if first_event.get("annotations") != "start_array":
        return None
    if not all(isinstance(values.get(k), list) for k in ("images", "categories")):
        return None
    return values["images"], values["categories"]


def _stream_annotations(json_file):
    import ijson

    with open(json_file, "rb") as f:
        yield from ijson.items(f, "annotations.item", use_float=True)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(value):
    """`value` as an int if it is a JSON integer (or a float with an integral value), else None."""
    if _is_int(value):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


class _Writer:
    """Collects checked images and usable annotations into the arrays of the layout."""

    def __init__(self, json_file, folder, images):
        self.json_file, self.folder = json_file, folder
        for img in images:
            if not _is_int(img["id"]):
                raise ValueError(f"{json_file}: image id {img['id']!r} is not an integer; the "
                                 "compact dataset needs LVIS's integer ids (or set "
                                 "DATALOADER.COMPACT_DATASET False)")
        self.images = sorted(images, key=lambda img: img["id"])
        self.index = {img["id"]: i for i, img in enumerate(self.images)}
        self.image = array.array("q")
        self.category = array.array("i")
        self.bbox = array.array("d")
        self.poly_count = array.array("q")
        self.poly_len = array.array("q")
        self.coords = array.array("d")
        self.coords_written = 0
        self.coords_file = open(os.path.join(folder, "coords.bin"), "wb")

    def add(self, a):
        self.image.append(self.index[a["image_id"]])
        self.category.append(a["category_id"] - 1)
        self.bbox.extend(a["bbox"])
        segm = a["segmentation"]
        self.poly_count.append(len(segm))
        for p in segm:
            try:
                self.coords.extend(p)
            except (TypeError, OverflowError):
                raise ValueError(f"{self.json_file}: annotation {a.get('id')} has a polygon "
                                 f"coordinate that is not a number: {p!r}"[:400]) from None
            self.poly_len.append(len(p))
        if len(self.coords) >= _COORDS_BLOCK:
            self._flush_coords()

    def _flush_coords(self):
        self.coords.tofile(self.coords_file)
        self.coords_written += len(self.coords)
        self.coords = array.array("d")

    def finish(self):
        """Write every array; returns name -> shape."""
        self._flush_coords()
        self.coords_file.close()
        shapes = {"coords": (self.coords_written,)}

        def save(name, values):
            values = np.ascontiguousarray(values, dtype=ARRAYS[name])
            values.tofile(os.path.join(self.folder, name + ".bin"))
            shapes[name] = values.shape

        self._save_images(save)
        image = np.frombuffer(self.image, dtype=np.int64)
        order = np.argsort(image, kind="stable")  # grouped by image, file order within one
        save("ann_offsets", _offsets(np.bincount(image, minlength=len(self.images))))
        save("category", np.frombuffer(self.category, dtype=np.int32)[order])
        save("bbox", np.frombuffer(self.bbox, dtype=np.float64).reshape(-1, 4)[order])
        poly_count = np.frombuffer(self.poly_count, dtype=np.int64)
        save("poly_start", (np.cumsum(poly_count) - poly_count)[order])
        save("poly_count", poly_count[order])
        save("coord_offsets", _offsets(np.frombuffer(self.poly_len, dtype=np.int64)))
        return shapes

    def _save_images(self, save):
        sizes = {"height": [], "width": []}
        files = []
        labels = {k: [] for k in IMAGE_LABELS}
        for img in self.images:
            for k in sizes:
                v = _integer(img[k])
                if v is None:
                    raise ValueError(f"{self.json_file}: image {img['id']} has {k} {img[k]!r}; "
                                     "the compact dataset needs an integer")
                sizes[k].append(v)
            folder, file_name = img["coco_url"].split("/")[-2:]
            files.append(f"{folder}/{file_name}".encode("utf-8", "surrogatepass"))
            for k in IMAGE_LABELS:
                ids = img.get(k, [])
                if not isinstance(ids, list) or not all(_is_int(i) for i in ids):
                    raise ValueError(f"{self.json_file}: image {img['id']} has {k} {ids!r}"[:300]
                                     + "; it must be a list of category ids")
                labels[k].append(ids)
        save("image_id", [img["id"] for img in self.images])
        save("height", sizes["height"])
        save("width", sizes["width"])
        save("file_offsets", _offsets([len(f) for f in files]))
        save("file_bytes", np.frombuffer(b"".join(files), dtype=np.uint8))
        for k in IMAGE_LABELS:
            save(f"{k}_offsets", _offsets([len(ids) for ids in labels[k]]))
            save(k, list(itertools.chain.from_iterable(labels[k])))


def _offsets(lengths):
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


# ----------------------------------------------------------------------------- dataset


class CompactDataset(collections.abc.Sequence):
    """Dataset dicts of one or more converted LVIS-format files, built when read.

    A sequence of the dicts :func:`~eql_d2.data.load_lvis_format` returns (concatenated over
    the files, optionally a selection of their images), which holds only the mapped arrays
    and the selected image indices, so that data-loader workers share it without copies.
    What the training loader needs of all images at once is computed from the arrays:
    :meth:`nonempty`, :meth:`landscape`, :meth:`file_names`, :meth:`class_histogram`,
    :meth:`repeat_factors`.

    Args:
        parts: [(CompactLVIS, image root, image indices into it)].
    """

    def __init__(self, parts):
        self.parts = []
        for compact, image_root, indices in parts:
            root = image_root if image_root.endswith(os.sep) else image_root + os.sep
            self.parts.append((compact, root, np.asarray(indices, dtype=np.int64)))
        self._starts = [0, *itertools.accumulate(len(i) for _, _, i in self.parts)]

    def __len__(self):
        return self._starts[-1]

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self[i] for i in range(len(self))[item]]
        item = operator.index(item)
        if item < 0:
            item += len(self)
        if not 0 <= item < len(self):
            raise IndexError(f"index {item} out of range for {len(self)} images")
        p = bisect.bisect_right(self._starts, item) - 1
        compact, root, indices = self.parts[p]
        return compact.record(int(indices[item - self._starts[p]]), root)

    def __repr__(self):
        files = ", ".join(c.json_file for c, _, _ in self.parts)
        return f"CompactDataset({len(self)} images of {files})"

    def select(self, positions):
        """A CompactDataset of the images at `positions` (increasing ints, or a bool mask
        over this sequence)."""
        positions = np.asarray(positions)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        if np.any(np.diff(positions) <= 0):
            raise ValueError("select: positions must be increasing")
        parts = []
        for p, (compact, root, indices) in enumerate(self.parts):
            lo, hi = self._starts[p], self._starts[p + 1]
            mine = positions[(positions >= lo) & (positions < hi)]
            parts.append((compact, root, indices[mine - lo]))
        return CompactDataset(parts)

    def _per_part(self, fn):
        return np.concatenate([fn(compact, indices) for compact, _, indices in self.parts])

    def num_instances(self):
        """[images] number of annotations of each image."""
        return self._per_part(lambda c, i: c.ann_offsets[i + 1] - c.ann_offsets[i])

    def nonempty(self):
        """[images] bool: the image has an annotation (detectron2's ``filter_empty``, as no
        annotation here is a crowd one)."""
        return self.num_instances() > 0

    def landscape(self):
        """[images] bool: width > height (aspect-ratio grouping)."""
        return self._per_part(lambda c, i: c.width[i] > c.height[i])

    def file_names(self):
        """The ``file_name`` of each image, in order (one at a time)."""
        for compact, root, indices in self.parts:
            yield from compact.file_names(indices, root)

    def image_categories(self):
        """(position, 0-based category) of each distinct category of each image."""
        positions, categories = [], []
        for p, (compact, _, indices) in enumerate(self.parts):
            pos, cat = _image_category_pairs(compact, indices)
            positions.append(pos + self._starts[p])
            categories.append(cat)
        return np.concatenate(positions), np.concatenate(categories)

    def class_histogram(self, num_classes):
        """[num_classes] number of annotations of each category."""
        return sum(np.bincount(c.category[c.annotation_indices(i)[0]], minlength=num_classes)
                   for c, _, i in self.parts)

    def repeat_factors(self, repeat_thresh, sqrt=True):
        """Repeat factor of each image, equal bit for bit to detectron2's
        ``RepeatFactorTrainingSampler.repeat_factors_from_category_frequency`` over these
        dicts (LVIS paper, appendix B.2): r(c) = max(1, t / f(c)) (its square root with
        `sqrt`) for f(c) the fraction of images with category c; r(I) = max over I's
        categories, 1 without any. Returns a float32 tensor [images]."""
        positions, categories = self.image_categories()
        num_classes = int(categories.max()) + 1 if len(categories) else 0
        images_with = np.bincount(categories, minlength=num_classes)
        present = images_with > 0
        # float64 throughout, as detectron2's Python floats: the same roundings
        ratio = repeat_thresh / (images_with[present] / len(self))
        category_rep = np.ones(num_classes)
        category_rep[present] = np.maximum(1.0, np.sqrt(ratio) if sqrt else ratio)
        image_rep = np.ones(len(self))
        np.maximum.at(image_rep, positions, category_rep[categories])
        return torch.tensor(image_rep, dtype=torch.float32)

    def __reduce__(self):
        return CompactDataset, ([(c, root, indices) for c, root, indices in self.parts],)


# ----------------------------------------------------------------------------- training


def compact_training_sets(cfg):
    """The DatasetCatalog entries (:class:`~eql_d2.data.datasets.LVISFormatLoader`) of
    DATASETS.TRAIN when the training loader reads them from their compact form, else None:
    with DATALOADER.COMPACT_DATASET, when every training set is an LVIS-format dataset of
    eql_d2's loader and neither precomputed proposals nor keypoints are configured."""
    if not cfg.DATALOADER.COMPACT_DATASET or cfg.MODEL.LOAD_PROPOSALS or cfg.MODEL.KEYPOINT_ON:
        return None
    names = list(cfg.DATASETS.TRAIN)
    # DatasetCatalog.get calls the registered function; indexing returns it
    loaders = [DatasetCatalog[n] if n in DatasetCatalog else None for n in names]
    if not names or not all(isinstance(x, LVISFormatLoader) for x in loaders):
        return None
    return loaders


def prepare_compact(loader):
    """Convert the dataset of `loader` if its compact form is absent or stale, and set its
    category metadata from it (cached for the other processes as
    :func:`~eql_d2.data.load_category_metadata` caches it). Returns the CompactLVIS."""
    loader.prepare()
    compact = load_compact(loader.json_file)
    datasets.store_category_metadata(loader.name, loader.json_file, compact.category_metadata())
    return compact


def compact_dataset(name):
    """The dataset dicts of LVIS-format dataset `name` as a CompactDataset (converting its
    JSON first if needed), its category metadata checked against the metadata set before,
    as :func:`~eql_d2.data.load_lvis_format` checks it."""
    loader = DatasetCatalog[name]
    if not isinstance(loader, LVISFormatLoader):
        raise ValueError(f"dataset '{name}' is not an LVIS-format dataset of eql_d2's loader")
    loader.prepare()
    compact = load_compact(loader.json_file)
    datasets._set_category_metadata(name, loader.json_file, compact.category_metadata(),
                                    check=True)
    return CompactDataset([(compact, loader.image_root, np.arange(compact.num_images))])


def compact_detection_dataset(names, filter_empty=True):
    """What detectron2's ``get_detection_dataset_dicts(names, filter_empty)`` returns, as one
    CompactDataset: the datasets concatenated, images without annotations dropped with
    `filter_empty`, the class histogram logged."""
    if isinstance(names, str):
        names = [names]
    parts = []
    for name in names:
        ds = compact_dataset(name)
        if not len(ds):
            raise ValueError(f"Dataset '{name}' is empty!")
        parts.extend(ds.parts)
    dataset = CompactDataset(parts)
    if filter_empty:
        before = len(dataset)
        dataset = dataset.select(dataset.nonempty())
        logging.getLogger("detectron2.data.build").info(
            "Removed %d images with no usable annotations. %d images left.",
            before - len(dataset), len(dataset))
    check_metadata_consistency("thing_classes", names)
    class_names = MetadataCatalog.get(names[0]).thing_classes
    # detectron2's table from the counts: per category, that many references to one dict
    counts = dataset.class_histogram(len(class_names))
    print_instances_class_histogram(
        [{"annotations": [{"category_id": c}] * int(n)} for c, n in enumerate(counts)],
        class_names)
    if not len(dataset):
        raise ValueError(f"No valid data found in {','.join(names)}.")
    return dataset
