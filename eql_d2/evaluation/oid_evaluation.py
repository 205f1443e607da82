"""Open Images Challenge detection evaluation in numpy (no TensorFlow).

The rules are those of the Open Images Detection Challenge (2018 and 2019), as the
TensorFlow Object Detection API implements them (``OpenImagesDetectionChallengeEvaluator``
with ``oid_hierarchical_labels_expansion.py`` applied to the ground truth):

1. **Hierarchy.** Every ground-truth box of class c is also a box of each ancestor of c;
   a verified positive image-level label of c also verifies c's ancestors, a verified
   negative one also c's descendants. Detections are *not* expanded: a detector is expected
   to predict "Fruit" itself where it sees an apple. ``expand_detections=True`` also
   counts each detection for the ancestors of its class (mmdetection's
   ``get_supercategory`` option for detections; not the official rule).
2. **Verified labels.** In an image, a class is *evaluatable* when it is verified there:
   positive or negative image-level label, or a box of it (all after expansion).
   Detections of other classes are ignored: neither true nor false positives.
3. **Matching** (per image and class, detections by decreasing score): a detection is a
   true positive when the box with which it has the highest IoU (among the non-group-of
   boxes; the first such box on ties) has IoU >= 0.5 and no higher-scored detection took
   it; otherwise a false positive, unless stage 4 ignores it.
4. **Group-of boxes.** A detection that is not a true positive, and whose highest
   intersection-over-detection-area (IoA) with a group-of box is >= 0.5, is ignored; each
   group-of box with such detections counts once, as one true positive (weight
   ``group_of_weight``, 1 in the challenge) at the highest score among them. A group-of box
   counts ``group_of_weight`` positives.
5. **AP** per class at IoU 0.5 (PASCAL VOC's all-point interpolation: area under the
   precision envelope), over all detections of the class; classes without positives have
   no AP (NaN) and mAP is the mean over the others. Detections with zero width or height
   are dropped first, as the official code drops them.

Beyond the official metric, classes are split into ``num_groups`` (5) groups of equal size
by a training count, and AP1 .. AP5 are the mean AP of each group's classes with positives.
The papers differ in both choices: EQL (Tab. 6) sorts by **image** count and its AP5 is the
rarest group (the gains it reports "on the group of fewest 100 categories" are its AP5
column); EFL (Tab. 7) sorts by **instance** count with AP1 the rarest. ``group_by``
("images" / "instances") and ``rarest_first`` choose; the default is images, rarest first.
Equal counts keep class-index order.

Differences from the TensorFlow code, none of which changes a result with distinct scores:
equal scores are ranked in input order (a stable sort), where the TensorFlow code uses
``np.argsort`` in reverse; a class reached from an ancestor by two paths of the hierarchy
is expanded once (the TensorFlow expansion writes the box once per path); the official
per-image cap of 10,000 detections per class is not applied (a detectron2 model outputs
far fewer). The matching is vectorized: because each detection's candidate box is fixed
before the greedy pass (the argmax over all boxes, taken or not), "first detection per
box" decides every true positive at once.

:class:`OIDEvaluator` wraps it as a detectron2 ``DatasetEvaluator`` for datasets with
``evaluator_type`` "oid" (:mod:`eql_d2.data.openimages`).
"""

import copy
import csv
import itertools
import logging
import math
import os
from collections import OrderedDict

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table
from matplotlib.figure import Figure

from ..utils.io import atomic_write
from .detections import DetectionArrays
from .plots import save_figure

__all__ = [
    "ClassHierarchy",
    "OIDGroundTruth",
    "OIDEvaluator",
    "OIDResult",
    "evaluate_oid",
    "frequency_groups",
    "voc_average_precision",
]

logger = logging.getLogger(__name__)

CSV_FIELDS = ["category_id", "name", "group", "train_count", "AP", "num_positives",
              "num_detections"]
GROUP_BY = {"images": ("class_image_count", "image_count"),
            "instances": ("class_instance_count", "instance_count")}
GROUP_COLORS = ("tab:red", "tab:orange", "tab:olive", "tab:green", "tab:blue")


# --------------------------------------------------------------------------- hierarchy


def _csr(lists):
    """(offsets [n + 1], values) of a list of integer lists."""
    lengths = np.fromiter((len(x) for x in lists), np.int64, len(lists))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.fromiter(itertools.chain.from_iterable(lists), np.int64, int(offsets[-1]))
    return offsets, values


def _gather_csr(offsets, values, rows):
    """(index into `rows`, value) of every value of CSR rows `rows`, row by row."""
    rows = np.asarray(rows, np.int64)
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    total = int(lengths.sum())
    owner = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return owner, values[np.repeat(starts, lengths) + within]


class ClassHierarchy:
    """Parent links among `num_classes` classes, a directed acyclic graph (in Open Images a
    class may sit under several parents).

    Args:
        num_classes: C.
        parents: for each class index, the indices of its direct parents (a list of C lists,
            or a {child: parents} dict).
    """

    def __init__(self, num_classes, parents=()):
        self.num_classes = int(num_classes)
        items = parents.items() if isinstance(parents, dict) else enumerate(parents)
        direct = [set() for _ in range(self.num_classes)]
        for child, ps in items:
            for p in [child, *ps]:
                if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or \
                        not 0 <= p < self.num_classes:
                    raise ValueError(f"class hierarchy: class index {p!r} outside "
                                     f"0..{self.num_classes - 1}")
            direct[int(child)].update(int(p) for p in ps)
        self.parents = [sorted(p) for p in direct]
        ancestors = [None] * self.num_classes
        for c in range(self.num_classes):
            ancestors[c] = self._ancestors(c, ancestors, ())
        children = [[] for _ in range(self.num_classes)]
        for c, anc in enumerate(ancestors):
            for a in anc:
                children[a].append(c)
        self.ancestors = ancestors
        self.descendants = [sorted(d) for d in children]
        self._up = _csr([[c, *a] for c, a in enumerate(ancestors)])
        self._down = _csr([[c, *d] for c, d in enumerate(self.descendants)])

    def _ancestors(self, c, memo, path):
        if memo[c] is not None:
            return memo[c]
        if c in path:
            raise ValueError(f"class hierarchy: class {c} is its own ancestor "
                             f"(cycle {list(path[path.index(c):]) + [c]})")
        out = set()
        for p in self.parents[c]:
            out.add(p)
            out.update(self._ancestors(p, memo, path + (c,)))
        memo[c] = sorted(out)
        return memo[c]

    @classmethod
    def from_oid_json(cls, tree, label_to_index, source="hierarchy JSON"):
        """The hierarchy of an Open Images hierarchy JSON (``{"LabelName", "Subcategory":
        [...]}`` nested; "Part" links are not class links and are not read). The top node
        (Open Images' "Entity") is a root, not a class. `label_to_index` maps a LabelName
        (MID) to its class index; a node not in it raises ValueError naming `source`."""
        parents = {}

        def walk(node, parent):
            if not isinstance(node, dict) or "LabelName" not in node:
                raise ValueError(f"{source}: a hierarchy node without 'LabelName': {node!r:.80}")
            label = node["LabelName"]
            if parent is not None and label not in label_to_index:
                raise ValueError(f"{source}: label {label!r} of the hierarchy is not a class "
                                 "of the class descriptions")
            index = label_to_index[label] if parent is not None else None
            if index is not None:
                parents.setdefault(index, set())
                if parent != -1:
                    parents[index].add(parent)
            for sub in node.get("Subcategory", ()):
                walk(sub, index if index is not None else -1)

        walk(tree, None)
        return cls(len(label_to_index), {c: sorted(p) for c, p in parents.items()})

    def expand_up(self, classes):
        """(position in `classes`, class) of each class of `classes` and of its ancestors."""
        return _gather_csr(*self._up, classes)

    def expand_down(self, classes):
        """(position in `classes`, class) of each class of `classes` and of its descendants."""
        return _gather_csr(*self._down, classes)


def _flat_hierarchy(num_classes):
    return ClassHierarchy(num_classes)


# ------------------------------------------------------------------------ ground truth


def _class_index(ids, key, image, num_classes, id_map):
    out = []
    for cid in ids or ():
        j = id_map.get(cid) if id_map else cid - 1 if isinstance(cid, int) else None
        if j is None or not 0 <= j < num_classes:
            raise ValueError(f"image {image}: {key} has category id {cid!r}, not one of the "
                             f"{num_classes} classes")
        out.append(j)
    return out


class OIDGroundTruth:
    """The ground truth of an evaluation set, expanded up the hierarchy, as columns.

    Attributes:
        image_ids: [I] int64, sorted.
        box_image, box_class: [B] int64 (image position, class index), boxes: [B, 4]
            float64 XYXY, box_group_of: [B] bool.
        label_keys: sorted unique int64 ``image position * C + class`` of the evaluatable
            (image, class) pairs (rule 2 of the module docstring).
        num_classes: C.
    """

    def __init__(self, image_ids, box_image, box_class, boxes, box_group_of, label_keys,
                 num_classes):
        self.image_ids = np.asarray(image_ids, np.int64)
        self.box_image = np.asarray(box_image, np.int64)
        self.box_class = np.asarray(box_class, np.int64)
        self.boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        self.box_group_of = np.asarray(box_group_of, bool)
        self.label_keys = np.unique(np.asarray(label_keys, np.int64))
        self.num_classes = int(num_classes)

    @classmethod
    def from_dataset_dicts(cls, dataset_dicts, num_classes, hierarchy=None, id_map=None):
        """Ground truth of detectron2 dataset dicts of :mod:`eql_d2.data.openimages`: each
        with ``image_id`` (int), ``annotations`` (``bbox``, ``bbox_mode``, contiguous
        ``category_id``, ``is_group_of``), ``pos_category_ids`` and ``neg_category_ids``
        (dataset category ids: `id_map` maps them to class indices, else id - 1, as LVIS).
        `hierarchy`: a :class:`ClassHierarchy` (None: flat)."""
        hierarchy = hierarchy or _flat_hierarchy(num_classes)
        if hierarchy.num_classes != num_classes:
            raise ValueError(f"class hierarchy has {hierarchy.num_classes} classes, the "
                             f"dataset {num_classes}")
        dicts = sorted(dataset_dicts, key=lambda d: d["image_id"])
        image_ids = np.array([d["image_id"] for d in dicts], np.int64)
        if len(np.unique(image_ids)) != len(image_ids):
            raise ValueError("ground truth: some image_id occurs in two dataset dicts")
        box_image, box_class, boxes, modes, group_of = [], [], [], [], []
        pos_image, pos_class, neg_image, neg_class = [], [], [], []
        for i, d in enumerate(dicts):
            for a in d.get("annotations", ()):
                c = a["category_id"]
                if not 0 <= c < num_classes:
                    raise ValueError(f"image {d['image_id']}: annotation class {c} outside "
                                     f"0..{num_classes - 1}")
                box_image.append(i)
                box_class.append(c)
                boxes.append(a["bbox"])
                modes.append(a["bbox_mode"])
                group_of.append(bool(a.get("is_group_of", 0)))
            pos = _class_index(d.get("pos_category_ids"), "pos_category_ids", d["image_id"],
                               num_classes, id_map)
            neg = _class_index(d.get("neg_category_ids"), "neg_category_ids", d["image_id"],
                               num_classes, id_map)
            pos_image += [i] * len(pos)
            pos_class += pos
            neg_image += [i] * len(neg)
            neg_class += neg
        box_image, box_class = np.array(box_image, np.int64), np.array(box_class, np.int64)
        boxes = np.array(boxes, np.float64).reshape(-1, 4)
        modes = np.array([int(m) for m in modes], np.int64)
        for mode in np.unique(modes):
            rows = modes == mode
            boxes[rows] = BoxMode.convert(boxes[rows], BoxMode(int(mode)), BoxMode.XYXY_ABS)
        owner, up_class = hierarchy.expand_up(box_class)
        pos_owner, pos_up = hierarchy.expand_up(np.array(pos_class, np.int64))
        neg_owner, neg_down = hierarchy.expand_down(np.array(neg_class, np.int64))
        c = num_classes
        keys = np.concatenate([box_image[owner] * c + up_class,
                               np.array(pos_image, np.int64)[pos_owner] * c + pos_up,
                               np.array(neg_image, np.int64)[neg_owner] * c + neg_down])
        return cls(image_ids, box_image[owner], up_class, boxes[owner],
                   np.array(group_of, bool)[owner], keys, num_classes)

    def num_positives(self, group_of_weight=1.0):
        """[C] float: non-group-of boxes + `group_of_weight` x group-of boxes, per class."""
        c = self.num_classes
        plain = np.bincount(self.box_class[~self.box_group_of], minlength=c).astype(np.float64)
        groups = np.bincount(self.box_class[self.box_group_of], minlength=c)
        return plain + group_of_weight * groups


# -------------------------------------------------------------------------- evaluation


class OIDResult:
    """Per-class results of :func:`evaluate_oid`.

    Attributes:
        ap: [C] AP in [0, 1], NaN for classes without positives.
        num_positives: [C] weighted positives (rule 4).
        num_detections: [C] detections evaluated (after the verified-label filter, before
            group-of merging).
    """

    def __init__(self, ap, num_positives, num_detections):
        self.ap, self.num_positives, self.num_detections = ap, num_positives, num_detections

    @property
    def mean_ap(self):
        valid = ~np.isnan(self.ap)
        return float(self.ap[valid].mean()) if valid.any() else float("nan")

    def group_ap(self, groups, num_groups):
        """[num_groups] mean AP of each group's classes with positives (NaN if none)."""
        out = np.full(num_groups, np.nan)
        for g in range(num_groups):
            ap = self.ap[(groups == g) & ~np.isnan(self.ap)]
            if ap.size:
                out[g] = ap.mean()
        return out


def voc_average_precision(precision, recall):
    """PASCAL VOC all-point AP: the area under the precision envelope (the maximum precision
    at any higher recall), summed where recall changes. Empty inputs give 0."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    changed = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[changed] - recall[changed - 1]) * precision[changed]))


def _pairs(det_keys, gt_keys):
    """(detection, ground truth) index pairs with equal keys; `gt_keys` sorted."""
    lo = np.searchsorted(gt_keys, det_keys, "left")
    counts = np.searchsorted(gt_keys, det_keys, "right") - lo
    det = np.repeat(np.arange(len(det_keys), dtype=np.int64), counts)
    within = np.arange(len(det), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return det, np.repeat(lo, counts) + within


def _first_argmax(det, values, num_dets):
    """Per detection, (max of `values` over its pairs, pair index of the first maximum);
    detections without pairs get (-1, -1). Pairs are grouped by detection, in order."""
    best = np.full(num_dets, -1.0)
    np.maximum.at(best, det, values)
    hit = np.flatnonzero(values == best[det])
    first = np.full(num_dets, -1, np.int64)
    uniq, pos = np.unique(det[hit], return_index=True)
    first[uniq] = hit[pos]
    return best, first


def _intersection(a, b):
    w = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    h = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def _area(b):
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def _iou(det, gt):
    inter = _intersection(det, gt)
    return inter / (_area(det) + _area(gt) - inter)


def _ioa(det, gt):
    """Intersection over the detection's area."""
    return _intersection(det, gt) / _area(det)


def _best_match(keys, boxes, gt_keys, gt_boxes, overlap, chunk=250_000):
    """Per detection, (the highest `overlap` with a ground-truth box of its key, the index
    into `gt_keys` of the first box that has it); (-1, -1) without such boxes. `gt_keys`
    sorted. Detections are taken `chunk` at a time, so that the (detection, box) pairs of
    a dataset never need to be in memory together."""
    n = len(keys)
    best = np.full(n, -1.0)
    first = np.full(n, -1, np.int64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        det, g = _pairs(keys[start:stop], gt_keys)
        if not len(det):
            continue
        b, f = _first_argmax(det, overlap(boxes[start:stop][det], gt_boxes[g]), stop - start)
        best[start:stop] = b
        has = np.flatnonzero(f >= 0)
        first[start + has] = g[f[has]]
    return best, first


def evaluate_oid(gt, detections, *, iou_threshold=0.5, group_of_weight=1.0,
                 expand_detections=False, hierarchy=None):
    """Open Images Challenge AP of `detections` against `gt` (rules in the module docstring).

    Args:
        gt: :class:`OIDGroundTruth`.
        detections: :class:`~eql_d2.evaluation.detections.DetectionArrays` with XYWH boxes
            and class indices 0..C-1 as ``category_id``; image ids of `gt`.
        expand_detections: also count each detection for its class's ancestors
            (`hierarchy` needed).
    Returns:
        :class:`OIDResult`.
    """
    c = gt.num_classes
    num_pos = gt.num_positives(group_of_weight)
    image = np.searchsorted(gt.image_ids, detections.image_id)
    image_c = np.minimum(image, max(len(gt.image_ids) - 1, 0))
    unknown = (image >= len(gt.image_ids)) | (gt.image_ids[image_c] != detections.image_id) \
        if len(gt.image_ids) else np.ones(len(detections), bool)
    if unknown.any():
        ids = sorted(set(detections.image_id[unknown].tolist()))[:5]
        raise ValueError(f"detections: image ids {ids} are not images of the ground truth")
    cls = detections.category_id
    if len(cls) and (cls.min() < 0 or cls.max() >= c):
        raise ValueError(f"detections: class indices outside 0..{c - 1}")
    xywh = detections.bbox if detections.bbox is not None else np.zeros((0, 4))
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    score = detections.score
    keep = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
    image, cls, boxes, score = image[keep], cls[keep], boxes[keep], score[keep]
    if expand_detections:
        if hierarchy is None:
            raise ValueError("expand_detections needs the class hierarchy")
        owner, cls = hierarchy.expand_up(cls)
        image, boxes, score = image[owner], boxes[owner], score[owner]
    keys = image * c + cls
    verified = np.isin(keys, gt.label_keys)
    keys, cls, boxes, score = keys[verified], cls[verified], boxes[verified], score[verified]
    # processing order of the greedy matching: by (image, class), then decreasing score
    order = np.lexsort((np.arange(len(keys)), -score, keys))
    keys, cls, boxes, score = keys[order], cls[order], boxes[order], score[order]
    n = len(keys)

    gt_keys = gt.box_image * c + gt.box_class
    tp = np.zeros(n, bool)
    plain = np.flatnonzero(~gt.box_group_of)
    plain = plain[np.argsort(gt_keys[plain], kind="stable")]
    best, box = _best_match(keys, boxes, gt_keys[plain], gt.boxes[plain], _iou)
    cand = np.flatnonzero(best >= iou_threshold)
    # the first candidate (highest score) of each box is its true positive
    _, taken = np.unique(box[cand], return_index=True)
    tp[cand[taken]] = True

    ignored = np.zeros(n, bool)
    group_scores, group_classes = np.zeros(0), np.zeros(0, np.int64)
    grouped = np.flatnonzero(gt.box_group_of)
    grouped = grouped[np.argsort(gt_keys[grouped], kind="stable")]
    best, box = _best_match(keys, boxes, gt_keys[grouped], gt.boxes[grouped], _ioa)
    matched = np.flatnonzero((best >= iou_threshold) & ~tp)
    ignored[matched] = True
    top = np.zeros(len(grouped))
    np.maximum.at(top, box[matched], score[matched])
    hit = np.flatnonzero(top > 0)
    if group_of_weight > 0:
        group_scores, group_classes = top[hit], gt.box_class[grouped[hit]]

    valid = ~ignored
    all_class = np.concatenate([cls[valid], group_classes])
    all_score = np.concatenate([score[valid], group_scores])
    all_label = np.concatenate([tp[valid].astype(np.float64),
                                np.full(len(group_scores), float(group_of_weight))])
    ap = np.full(c, np.nan)
    order = np.lexsort((np.arange(len(all_class)), -all_score, all_class))
    all_class, all_label = all_class[order], all_label[order]
    bounds = np.searchsorted(all_class, np.arange(c + 1))
    for k in np.flatnonzero(num_pos > 0):
        label = all_label[bounds[k]:bounds[k + 1]]
        tps = np.cumsum(label)
        fps = np.cumsum(label <= 0)
        ap[k] = voc_average_precision(tps / np.maximum(tps + fps, 1e-300), tps / num_pos[k])
    return OIDResult(ap, num_pos, np.bincount(cls, minlength=c))


def frequency_groups(train_counts, num_groups=5, rarest_first=True):
    """[C] group 0..num_groups-1 of each class: classes sorted by their train count
    (ascending with `rarest_first`, else descending; equal counts by class index) and cut
    into `num_groups` groups of equal size (the first groups one class larger when C is not
    a multiple)."""
    counts = np.asarray(train_counts, np.float64)
    order = np.argsort(counts if rarest_first else -counts, kind="stable")
    groups = np.empty(len(counts), np.int64)
    for g, part in enumerate(np.array_split(order, num_groups)):
        groups[part] = g
    return groups


def oid_metrics(result, groups, num_groups=5):
    """{"AP": mAP, "AP1".."AP<num_groups>"} in percent."""
    out = OrderedDict(AP=result.mean_ap * 100)
    for g, v in enumerate(result.group_ap(groups, num_groups)):
        out[f"AP{g + 1}"] = float(v * 100)
    return out


# ------------------------------------------------------------------------------ outputs


def _write_csv(rows, path):
    with atomic_write(path) as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if isinstance(r[k], float) and math.isnan(r[k])
                                 else round(r[k], 4) if isinstance(r[k], float) else r[k])
                             for k in CSV_FIELDS})


def plot_oid_ap(rows, metrics, path, title, num_groups=5, count_name="images"):
    """Per-class AP against train count (log x), coloured by frequency group, beside the
    bars of AP and AP1..AP<num_groups>. Classes without positives are not drawn; those with
    a zero count cannot sit on a log axis and are counted in the legend title."""
    fig = Figure(figsize=(10.5, 4.2))
    ax, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    rare = min(rows, key=lambda r: (r["train_count"], r["category_id"]))["group"] if rows else 1
    # red for the rarest group whichever end of AP1..AP<n> it is
    palette = [GROUP_COLORS[g % len(GROUP_COLORS)] for g in range(num_groups)]
    if rare != 1:
        palette = palette[::-1]
    off_axis = 0
    for g in range(num_groups):
        xs, ys = [], []
        for r in rows:
            if r["group"] != g + 1 or math.isnan(r["AP"]):
                continue
            if not r["train_count"]:
                off_axis += 1
                continue
            xs.append(r["train_count"])
            ys.append(r["AP"])
        if xs:
            ax.scatter(xs, ys, s=16, alpha=0.8, color=palette[g],
                       label=f"AP{g + 1} group ({len(xs)})")
    ax.set_xscale("log")
    ax.set_xlabel(f"train {count_name} of the class (log scale)")
    ax.set_ylabel("AP at IoU 0.5 (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8,
                  title=f"{off_axis} without train {count_name}" if off_axis else None)
    keys = list(metrics)
    values = [metrics[k] for k in keys]
    colors = ["tab:gray"] + palette[: len(keys) - 1]
    drawn = bars.bar(range(len(keys)), [0 if math.isnan(v) else v for v in values],
                     color=colors, edgecolor="black", linewidth=0.5)
    for b, v in zip(drawn, values):
        bars.annotate("n/a" if math.isnan(v) else f"{v:.1f}",
                      (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                      va="bottom", fontsize=8)
    bars.set_xticks(range(len(keys)), keys)
    bars.set_ylabel("AP (%)")
    bars.set_ylim(0, max(5.0, bars.get_ylim()[1] * 1.1))
    bars.set_title(f"mAP and frequency groups (AP{rare}: rarest)", fontsize=10)
    save_figure(fig, path)


# ---------------------------------------------------------------------------- evaluator


def _detections_of_instances(instances, image_id):
    boxes = BoxMode.convert(instances.pred_boxes.tensor.numpy(), BoxMode.XYXY_ABS,
                            BoxMode.XYWH_ABS)
    return DetectionArrays(np.full(len(instances), image_id), instances.pred_classes.numpy(),
                           instances.scores.numpy(), boxes)


class OIDEvaluator(DatasetEvaluator):
    """Open Images Challenge evaluation (module docstring) of a registered dataset with
    ``evaluator_type`` "oid": mAP at IoU 0.5 as "AP" and the frequency groups as "AP1" ..
    "AP5", under the task "bbox".

    Each process keeps its detections as compact columns
    (:class:`~eql_d2.evaluation.detections.DetectionArrays`); in a distributed evaluation
    they are gathered to the main process, which evaluates. With an ``output_dir`` it also
    writes ``per_category_bbox.csv`` (class, group, train count, AP, positives, evaluated
    detections) and ``ap_vs_train_images_bbox.png``.

    The ground truth is the dataset dicts of ``dataset_name`` (image-level labels and
    group-of flags as :mod:`eql_d2.data.openimages` loads them) with the metadata's class
    hierarchy (``class_parents``). The groups come from the train counts (``group_by``
    "images": ``class_image_count``, "instances": ``class_instance_count``) of
    ``train_dataset_name``, else from the evaluated dataset's (its JSON form carries the
    train counts; otherwise they are its own, and a warning says so).
    """

    def __init__(self, dataset_name, distributed=True, output_dir=None, *, iou_threshold=0.5,
                 group_of_weight=1.0, expand_detections=False, num_groups=5,
                 group_by="images", rarest_first=True, train_dataset_name=None,
                 per_category_outputs=True):
        if group_by not in GROUP_BY:
            raise ValueError(f"OIDEvaluator: group_by {group_by!r}, expected one of "
                             f"{list(GROUP_BY)}")
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._iou_threshold = iou_threshold
        self._group_of_weight = group_of_weight
        self._expand_detections = expand_detections
        self._num_groups = int(num_groups)
        self._group_by = group_by
        self._rarest_first = rarest_first
        self._train_dataset_name = train_dataset_name
        self._per_category_outputs = per_category_outputs
        self._metadata = MetadataCatalog.get(dataset_name)
        self._gt = None
        self.reset()

    def reset(self):
        self._predictions = []
        self._image_ids = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            self._image_ids.append(inp["image_id"])
            if "instances" in out:
                self._predictions.append(_detections_of_instances(
                    out["instances"].to("cpu"), inp["image_id"]))

    def _ground_truth(self):
        if self._gt is None:
            dicts = DatasetCatalog.get(self._dataset_name)
            num_classes = len(self._metadata.thing_classes)
            self._hierarchy = ClassHierarchy(num_classes, self._metadata.get("class_parents") or ())
            self._gt = OIDGroundTruth.from_dataset_dicts(
                dicts, num_classes, self._hierarchy,
                self._metadata.get("thing_dataset_id_to_contiguous_id"))
        return self._gt

    def _train_counts(self):
        key, field = GROUP_BY[self._group_by]
        names = list(self._metadata.thing_classes)
        if self._train_dataset_name:
            meta = MetadataCatalog.get(self._train_dataset_name)
            counts = meta.get(key)
            if counts is not None and list(meta.get("thing_classes") or ()) == names:
                return np.array([e[field] for e in sorted(counts, key=lambda e: e["id"])])
        logger.warning("%s: no train counts of %s (train dataset %r not registered with the "
                       "same classes); the frequency groups use the evaluated set's %s",
                       self._dataset_name, self._group_by, self._train_dataset_name, key)
        counts = self._metadata.get(key)
        if counts is None:
            raise ValueError(f"{self._dataset_name}: no {key} in its metadata to group the "
                             f"classes by {self._group_by}")
        return np.array([e[field] for e in sorted(counts, key=lambda e: e["id"])])

    def evaluate(self):
        local = DetectionArrays.concatenate(self._predictions)
        if self._distributed and comm.get_world_size() > 1:
            comm.synchronize()
            parts = comm.gather((local, np.asarray(self._image_ids, np.int64)), dst=0)
            if not comm.is_main_process():
                return {}
            detections = DetectionArrays.concatenate([d for d, _ in parts])
            image_ids = np.concatenate([i for _, i in parts])
        else:
            detections, image_ids = local, np.asarray(self._image_ids, np.int64)
        if len(image_ids) == 0:
            logger.warning("[OIDEvaluator] Did not receive valid predictions.")
            return {}
        gt = self._ground_truth()
        result = evaluate_oid(gt, detections, iou_threshold=self._iou_threshold,
                              group_of_weight=self._group_of_weight,
                              expand_detections=self._expand_detections,
                              hierarchy=self._hierarchy)
        counts = self._train_counts()
        groups = frequency_groups(counts, self._num_groups, self._rarest_first)
        metrics = oid_metrics(result, groups, self._num_groups)
        logger.info("Open Images Challenge evaluation of %s (%d images, AP at IoU %.2f):\n%s",
                    self._dataset_name, len(image_ids), self._iou_threshold,
                    create_small_table(metrics))
        if self._output_dir and self._per_category_outputs:
            names = self._metadata.thing_classes
            rows = [{"category_id": k + 1, "name": names[k], "group": int(groups[k]) + 1,
                     "train_count": int(counts[k]), "AP": float(result.ap[k] * 100),
                     "num_positives": float(result.num_positives[k]),
                     "num_detections": int(result.num_detections[k])}
                    for k in range(len(names))]
            _write_csv(rows, os.path.join(self._output_dir, "per_category_bbox.csv"))
            plot_oid_ap(rows, metrics,
                        os.path.join(self._output_dir, "ap_vs_train_images_bbox.png"),
                        f"{self._dataset_name}: AP {metrics['AP']:.1f}", self._num_groups,
                        self._group_by)
        return copy.deepcopy(OrderedDict(bbox=metrics))
