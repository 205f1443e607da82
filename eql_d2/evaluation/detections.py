"""LVIS detections as columns, and the per-process shards the distributed evaluation reads.

A detection as a Python dict (``image_id``, ``category_id``, ``score``, ``bbox`` list, RLE
``segmentation``) costs about a kilobyte; LVIS v1 val with 300 detections per image is 5.9
million of them. :class:`DetectionArrays` holds the same content in a few numpy arrays:
image and category ids, scores and XYWH boxes in float64 (the dicts' values exactly), and
for masks the compressed RLE strings concatenated, with their offsets and ``[h, w]`` sizes.
:meth:`DetectionArrays.dicts` gives the dicts back, equal to the ones it was built from.

The per-image cap of LVIS AP and the top-K per category of AP-fixed are index operations on
these columns (:meth:`~DetectionArrays.per_image_cap`, :meth:`~DetectionArrays.top_k_per`),
with the selection lvis-api makes: highest scores first, equal scores in input order.

Shards: in a distributed evaluation every process writes its detections into one file
(:func:`save_shard`, numpy's ``.npz``, uncompressed, written under a temporary name and
renamed), and the main process reads them all (:func:`load_shards`). A shard that is
missing, cut short, from another evaluation or another number of processes raises an error
that names it, never a smaller result.
"""

import json
import os
import zipfile

import numpy as np

from ..utils.io import atomic_write

__all__ = ["DetectionArrays", "load_shards", "save_shard", "shard_path", "top_k_index"]

SHARD_FORMAT = "eql_d2-detections-1"


def _as_column(values, dtype, name, length=None):
    out = np.ascontiguousarray(values, dtype=dtype)
    if out.ndim != 1 or (length is not None and len(out) != length):
        raise ValueError(f"detections: '{name}' must be a column of {length} values, "
                         f"got shape {out.shape}")
    return out


class DetectionArrays:
    """N detections as columns (see the module docstring).

    Args:
        image_id, category_id: [N] integers (category ids as the annotation JSON has them,
            or contiguous class indices before :meth:`map_categories`).
        score: [N] float64.
        bbox: [N, 4] float64 XYWH, or None when the detections have no boxes.
        rle_counts: uint8 bytes of all compressed RLE ``counts`` strings, back to back, or
            None without masks; rle_offsets: [N + 1] int64 (detection i's string is
            ``rle_counts[rle_offsets[i]:rle_offsets[i + 1]]``); rle_size: [N, 2] int64
            ``[height, width]``.
    """

    def __init__(self, image_id, category_id, score, bbox=None, rle_counts=None,
                 rle_offsets=None, rle_size=None):
        self.image_id = _as_column(image_id, np.int64, "image_id")
        n = len(self.image_id)
        self.category_id = _as_column(category_id, np.int64, "category_id", n)
        self.score = _as_column(score, np.float64, "score", n)
        self.bbox = None
        if bbox is not None:
            self.bbox = np.ascontiguousarray(bbox, dtype=np.float64).reshape(-1, 4)
            if len(self.bbox) != n:
                raise ValueError(f"detections: 'bbox' has {len(self.bbox)} rows for {n} detections")
        self.rle_counts = self.rle_offsets = self.rle_size = None
        if rle_counts is not None:
            self.rle_counts = _as_column(rle_counts, np.uint8, "rle_counts")
            self.rle_offsets = _as_column(rle_offsets, np.int64, "rle_offsets", n + 1)
            self.rle_size = np.ascontiguousarray(rle_size, dtype=np.int64).reshape(-1, 2)
            if (len(self.rle_size) != n or self.rle_offsets[0] != 0
                    or self.rle_offsets[-1] != len(self.rle_counts)
                    or np.any(np.diff(self.rle_offsets) < 0)):
                raise ValueError("detections: RLE offsets or sizes do not match the RLE bytes")

    # ------------------------------------------------------------------ construction

    @classmethod
    def empty(cls, with_boxes=True, with_masks=False):
        return cls(np.zeros(0), np.zeros(0), np.zeros(0),
                   np.zeros((0, 4)) if with_boxes else None,
                   *((np.zeros(0), np.zeros(1), np.zeros((0, 2))) if with_masks else ()))

    @classmethod
    def from_dicts(cls, results):
        """Columns of an LVIS / COCO results list (dicts with image_id, category_id, score,
        bbox and / or a compressed-RLE segmentation; every dict with the same fields)."""
        results = list(results)
        if not results:
            return cls.empty()
        with_boxes = "bbox" in results[0]
        with_masks = "segmentation" in results[0]
        if any(("bbox" in r) != with_boxes or ("segmentation" in r) != with_masks
               for r in results):
            raise ValueError("detections: some results have a bbox or segmentation and others "
                             "not; every result needs the same fields")
        masks = {}
        if with_masks:
            counts = [r["segmentation"]["counts"] for r in results]
            counts = [c.encode("ascii") if isinstance(c, str) else bytes(c) for c in counts]
            lengths = np.fromiter((len(c) for c in counts), np.int64, len(counts))
            masks = dict(rle_counts=np.frombuffer(b"".join(counts), np.uint8),
                         rle_offsets=np.concatenate([[0], np.cumsum(lengths)]),
                         rle_size=[r["segmentation"]["size"] for r in results])
        return cls([r["image_id"] for r in results], [r["category_id"] for r in results],
                   [r["score"] for r in results],
                   [r["bbox"] for r in results] if with_boxes else None, **masks)

    @classmethod
    def concatenate(cls, parts):
        """One DetectionArrays of `parts` (all with boxes, or none; all with masks, or none)."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return cls.empty()
        nonempty = [p for p in parts if len(p)] or parts[:1]
        with_boxes = nonempty[0].bbox is not None
        with_masks = nonempty[0].rle_counts is not None
        if any((p.bbox is not None) != with_boxes or (p.rle_counts is not None) != with_masks
               for p in nonempty):
            raise ValueError("detections: cannot join parts with and without boxes or masks")
        masks = {}
        if with_masks:
            offsets, shift = [np.zeros(1, np.int64)], 0
            for p in nonempty:
                offsets.append(p.rle_offsets[1:] + shift)
                shift += len(p.rle_counts)
            masks = dict(rle_counts=np.concatenate([p.rle_counts for p in nonempty]),
                         rle_offsets=np.concatenate(offsets),
                         rle_size=np.concatenate([p.rle_size for p in nonempty]))
        return cls(np.concatenate([p.image_id for p in nonempty]),
                   np.concatenate([p.category_id for p in nonempty]),
                   np.concatenate([p.score for p in nonempty]),
                   np.concatenate([p.bbox for p in nonempty]) if with_boxes else None, **masks)

    # ------------------------------------------------------------------------ access

    def __len__(self):
        return len(self.image_id)

    @property
    def has_masks(self):
        return self.rle_counts is not None

    @property
    def nbytes(self):
        arrays = (self.image_id, self.category_id, self.score, self.bbox, self.rle_counts,
                  self.rle_offsets, self.rle_size)
        return sum(a.nbytes for a in arrays if a is not None)

    def take(self, index):
        """The detections at `index` (integer array), in that order."""
        index = np.asarray(index, dtype=np.int64)
        masks = {}
        if self.has_masks:
            starts = self.rle_offsets[index]
            lengths = self.rle_offsets[index + 1] - starts
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            # byte positions: each string's start repeated over its length, plus 0, 1, ...
            within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
            masks = dict(rle_counts=self.rle_counts[np.repeat(starts, lengths) + within],
                         rle_offsets=offsets, rle_size=self.rle_size[index])
        return DetectionArrays(self.image_id[index], self.category_id[index], self.score[index],
                               None if self.bbox is None else self.bbox[index], **masks)

    def map_categories(self, id_map):
        """A copy with category ids replaced through `id_map` ({old: new}); raises naming the
        ids `id_map` lacks."""
        old = np.array(sorted(id_map), dtype=np.int64)
        new = np.array([id_map[k] for k in old.tolist()], dtype=np.int64)
        pos = np.searchsorted(old, self.category_id)
        pos_clipped = np.minimum(pos, max(len(old) - 1, 0))
        unknown = (pos >= len(old)) | (old[pos_clipped] != self.category_id) if len(old) else \
            np.ones(len(self), bool)
        if unknown.any():
            raise ValueError(f"detections: category ids {sorted(set(self.category_id[unknown].tolist()))[:5]} "
                             "have no entry in the dataset's category map")
        return self.with_category_ids(new[pos_clipped])

    def with_category_ids(self, category_id):
        """A copy sharing every column except the category ids, which become `category_id`."""
        out = DetectionArrays.__new__(DetectionArrays)
        out.__dict__.update(self.__dict__)
        out.category_id = _as_column(category_id, np.int64, "category_id", len(self))
        return out

    def rles(self, index):
        """The compressed RLEs of the detections at `index` as pycocotools takes them
        (``counts`` as bytes)."""
        index = np.asarray(index, np.int64)
        sizes = self.rle_size[index].tolist()
        starts, stops = self.rle_offsets[index].tolist(), self.rle_offsets[index + 1].tolist()
        counts = memoryview(self.rle_counts)
        return [{"size": size, "counts": counts[a:b].tobytes()}
                for size, a, b in zip(sizes, starts, stops)]

    def mask_areas(self, index=None, chunk=100_000):
        """float64 area of the masks at `index` (default all; pycocotools, in chunks)."""
        import pycocotools.mask as mask_utils

        index = np.arange(len(self)) if index is None else np.asarray(index, np.int64)
        areas = np.zeros(len(index), np.float64)
        for start in range(0, len(index), chunk):
            part = index[start:start + chunk]
            areas[start:start + len(part)] = mask_utils.area(self.rles(part))
        return areas

    def dicts(self, index=None, *, bbox=True, segmentation=True):
        """Yield the detections at `index` (default all) as LVIS result dicts; RLE counts as
        str, as detectron2 writes them. `bbox` / `segmentation` False leave those out."""
        index = np.arange(len(self)) if index is None else np.asarray(index, np.int64)
        columns = [self.image_id[index].tolist(), self.category_id[index].tolist(),
                   self.score[index].tolist()]
        boxes = self.bbox[index].tolist() if (bbox and self.bbox is not None) else None
        masks = segmentation and self.has_masks
        if masks:
            sizes = self.rle_size[index].tolist()
            starts, stops = self.rle_offsets[index].tolist(), self.rle_offsets[index + 1].tolist()
            counts = memoryview(self.rle_counts)
        for k, (image_id, category_id, score) in enumerate(zip(*columns)):
            d = {"image_id": image_id, "category_id": category_id, "score": score}
            if boxes is not None:
                d["bbox"] = boxes[k]
            if masks:
                d["segmentation"] = {"size": sizes[k],
                                     "counts": str(counts[starts[k]:stops[k]], "ascii")}
            yield d

    def to_dicts(self):
        return list(self.dicts())

    # ------------------------------------------------------------------- selections

    def top_k_per(self, key, k):
        """Indices (increasing) of the `k` highest-scoring detections of each value of `key`
        ("image_id" or "category_id"); equal scores keep the earlier detection, as a stable
        sort by descending score does. k < 0 keeps all."""
        return top_k_index(getattr(self, key), self.score, k)

    def per_image_cap(self, max_dets):
        """Indices of what LVIS's per-image cap keeps (``LVISResults.limit_dets_per_image``)."""
        return self.top_k_per("image_id", max_dets)

    # ------------------------------------------------------------------------ files

    def arrays(self):
        out = {"image_id": self.image_id, "category_id": self.category_id, "score": self.score}
        if self.bbox is not None:
            out["bbox"] = self.bbox
        if self.has_masks:
            out.update(rle_counts=self.rle_counts, rle_offsets=self.rle_offsets,
                       rle_size=self.rle_size)
        return out

    def write_json(self, path, chunk=20_000):
        """Write the LVIS results file (a JSON list of dicts) chunk by chunk, atomically."""
        with atomic_write(path) as f:
            f.write("[")
            for start in range(0, len(self), chunk):
                part = self.dicts(range(start, min(start + chunk, len(self))))
                text = json.dumps(list(part), allow_nan=False)
                f.write(("," if start else "") + text[1:-1])
            f.write("]")


def top_k_index(key, score, k):
    """Indices (increasing) of the `k` highest `score` entries of each value of `key`; equal
    scores keep the earlier entry (a stable sort by descending score). k < 0 keeps all."""
    n = len(key)
    if k < 0 or n == 0:
        return np.arange(n, dtype=np.int64)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    group = rank[inverse.reshape(-1)]  # values of `key` numbered by first appearance
    order = np.lexsort((np.arange(n), -score, group))
    sorted_group = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    position = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.sort(order[position < k])


def shard_path(folder, rank, world_size):
    return os.path.join(folder, f"detections_{rank:05d}_of_{world_size:05d}.npz")


def save_shard(detections, folder, rank, world_size, token, image_ids):
    """Write `detections` of process `rank` (of `world_size`) into `folder`; `token`
    identifies the evaluation (the same in every process), `image_ids` the images this
    process evaluated. Returns the path."""
    path = shard_path(folder, rank, world_size)
    meta = {"format": SHARD_FORMAT, "rank": rank, "world_size": world_size, "token": int(token),
            "num_detections": len(detections), "num_images": len(image_ids)}
    with atomic_write(path, "wb") as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                 evaluated_image_ids=np.asarray(image_ids, np.int64), **detections.arrays())
    return path


def _load_shard(path, rank, world_size, token):
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"detection shard {path} of process {rank} (of {world_size}) is missing: that "
            "process did not finish writing its detections")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            arrays = {k: z[k] for k in z.files if k not in ("meta", "evaluated_image_ids")}
            image_ids = z["evaluated_image_ids"]
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError, OSError) as e:
        raise ValueError(f"detection shard {path} is unreadable (cut short or not a shard): "
                         f"{e}") from e
    expected = {"format": SHARD_FORMAT, "rank": rank, "world_size": world_size, "token": int(token)}
    wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"detection shard {path} is not this evaluation's shard of process "
                         f"{rank} of {world_size}: it has {wrong}, expected "
                         f"{ {k: expected[k] for k in wrong} }")
    detections = DetectionArrays(**arrays)
    if len(detections) != meta["num_detections"] or len(image_ids) != meta["num_images"]:
        raise ValueError(f"detection shard {path} holds {len(detections)} detections of "
                         f"{len(image_ids)} images, its header says {meta['num_detections']} "
                         f"of {meta['num_images']}")
    return detections, image_ids


def load_shards(folder, world_size, token):
    """(all processes' detections in rank order, the evaluated image ids) from the shards in
    `folder`; raises naming the first missing, unreadable or foreign shard."""
    parts, image_ids = [], []
    for rank in range(world_size):
        det, ids = _load_shard(shard_path(folder, rank, world_size), rank, world_size, token)
        parts.append(det)
        image_ids.append(ids)
    return DetectionArrays.concatenate(parts), np.concatenate(image_ids)
