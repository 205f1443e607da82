"""LVIS AP through faster-coco-eval's C++ matching and accumulation, with lvis-api's numbers.

``faster_coco_eval.COCOeval_faster(..., lvis_style=True)`` implements LVIS's federated rules
(a detection counts only on images where its category is annotated or listed in
``neg_category_ids``; unmatched detections of a category in the image's
``not_exhaustive_category_ids`` are ignored; r / c / f groups from the categories'
``frequency``), but it differs from ``lvis.LVISEval`` in what it is given:

- its detection cap (``params.maxDets``) applies per image *and category*, as COCO's does;
  LVIS keeps the top ``max_dets`` detections per *image* over all categories
  (``LVISResults.limit_dets_per_image``). LVIS's cap is applied first
  (:meth:`~eql_d2.evaluation.detections.DetectionArrays.per_image_cap`), and the C++ cap is
  set at or above what remains;
- lvis-api leaves out ground truth and detections whose area is not in (0, inf) (its
  ``get_ann_ids`` filter; e.g. an empty mask); faster-coco-eval keeps them (an empty
  mask then counts as a false positive). They are removed here, after the cap, as in
  lvis-api;
- it takes ``iscrowd`` of the ground truth as crowd regions and ignores the dataset's
  ``ignore`` flag; lvis-api does the reverse. LVIS has neither field: ``iscrowd`` is
  dropped here, and a ground truth with a true ``ignore`` flag is refused
  (:func:`supports`), for lvis-api to evaluate.

With that, every entry of ``precision`` and ``recall`` equals lvis-api's (up to the last
bits of ``tp / (tp + fp)``, which lvis-api computes with ``+ eps``), hence AP, AP50, AP75,
APs/m/l, APr/c/f and every per-category AP.

Detections are taken as :class:`~eql_d2.evaluation.detections.DetectionArrays` (a results
list is converted) and become dicts only for the categories faster-coco-eval evaluates at
once. Memory of faster-coco-eval grows with images x categories (one record per pair and area
range); :class:`FastLVISEval` evaluates categories in groups, each over the images that
hold its ground truth or detections, so a group stays near ``pairs_per_group`` pairs.
"""

import math
from collections import Counter, OrderedDict, defaultdict

import numpy as np

from .detections import DetectionArrays, top_k_index

__all__ = ["FastLVISEval", "supports"]


def supports(lvis_gt):
    """False when the ground truth carries an ``ignore`` flag, which only lvis-api honours."""
    return not any(a.get("ignore") for a in lvis_gt.dataset["annotations"])


def _in_area_filter(area):
    return 0 < area < math.inf


def _lvis_params(iou_type, max_dets):
    """lvis-api's evaluation parameters (thresholds, area ranges, group labels)."""
    from lvis.eval import Params

    p = Params(iou_type=iou_type)
    p.max_dets = max_dets
    return p


class FastLVISEval:
    """``lvis.LVISEval``'s results through faster-coco-eval.

    After :meth:`run`, ``eval["precision"]`` [T, R, K, A] and ``eval["recall"]`` [T, K, A]
    (-1 where a category has no ground truth in an area range), ``results`` (AP, AP50, AP75,
    APs, APm, APl, APr, APc, APf, AR@max_dets, ARs/m/l@max_dets as fractions), ``params``
    (lvis-api's) and ``num_detections`` (results per category after the per-image cap) are
    what ``LVISEval`` would hold.

    Args:
        lvis_gt: an ``lvis.LVIS``.
        results: LVIS result dicts (not modified).
        iou_type: "bbox" or "segm" (segm results: compressed RLE ``segmentation``; as in
            lvis-api their area is the mask area, not the box's).
        max_dets: per-image cap (LVIS: 300); < 0 for none (AP-fixed).
        pairs_per_group: images x categories evaluated together (bounds memory).
    """

    def __init__(self, lvis_gt, results, iou_type="segm", max_dets=300, pairs_per_group=1000,
                 index=None):
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_type: {iou_type} is not supported.")
        if not supports(lvis_gt):
            raise ValueError("ground truth with an 'ignore' flag: evaluate it with lvis-api")
        self.lvis_gt = lvis_gt
        if not isinstance(results, DetectionArrays):
            results = DetectionArrays.from_dicts(results)
        if iou_type == "segm" and len(results) and not results.has_masks:
            raise ValueError("segm evaluation: the detections have no masks")
        if iou_type == "bbox" and len(results) and results.bbox is None:
            raise ValueError("bbox evaluation: the detections have no boxes")
        self._dets = results
        self._index = np.arange(len(results)) if index is None else np.asarray(index, np.int64)
        self.params = _lvis_params(iou_type, max_dets)
        self.params.img_ids = sorted(lvis_gt.get_img_ids())
        self.params.cat_ids = sorted(lvis_gt.get_cat_ids())
        self.pairs_per_group = pairs_per_group
        self.eval = {}
        self.results = OrderedDict()
        self.num_detections = Counter()

    # ------------------------------------------------------------------------- inputs

    def _ground_truth(self):
        by_cat = defaultdict(list)
        for a in self.lvis_gt.dataset["annotations"]:
            if _in_area_filter(a["area"]):
                a = dict(a)
                a.pop("iscrowd", None)
                by_cat[a["category_id"]].append(a)
        return by_cat

    def _verified_keys(self, gt_by_cat, scale):
        """image_id * scale + category_id of every (image, category) LVIS scores: the
        category is annotated on the image or in its negative list."""
        keys = [a["image_id"] * scale + c for c, anns in gt_by_cat.items() for a in anns]
        for img in self.lvis_gt.dataset["images"]:
            keys.extend(img["id"] * scale + c for c in img.get("neg_category_ids", ()))
        return np.unique(np.asarray(keys, np.int64))

    def _detections(self, gt_by_cat):
        """Indices into the detections, grouped by category (a dict of index arrays): after
        the per-image cap, without zero-area ones and those of a category neither annotated
        on their image nor in its negative list (LVIS does not score them; faster-coco-eval
        would drop them too, later)."""
        p, det = self.params, self._dets
        keep = self._index[top_k_index(det.image_id[self._index], det.score[self._index], p.max_dets)]
        cats, counts = np.unique(det.category_id[keep], return_counts=True)
        self.num_detections = Counter(dict(zip(cats.tolist(), counts.tolist())))
        if p.iou_type == "segm":
            areas = det.mask_areas(keep)
        else:
            areas = det.bbox[keep, 2] * det.bbox[keep, 3]
        self._area = np.zeros(len(det), np.float64)  # read again for the result annotations
        self._area[keep] = areas
        scale = max(self.params.cat_ids, default=0) + 1
        keys = det.image_id[keep] * scale + det.category_id[keep]
        scored = (areas > 0) & (areas < math.inf) & np.isin(keys, self._verified_keys(gt_by_cat, scale))
        keep = keep[scored]
        keep = keep[np.argsort(det.category_id[keep], kind="stable")]
        cats = det.category_id[keep]
        bounds = np.flatnonzero(np.r_[True, cats[1:] != cats[:-1], True])
        return {int(cats[a]): keep[a:b] for a, b in zip(bounds[:-1], bounds[1:])}

    def _result_annotations(self, index):
        """The detections at `index` as faster-coco-eval's result annotations: what its
        ``loadRes`` makes of a results list (ids 1.., ``iscrowd`` 0, ``area`` the box's or
        the mask's, for masks the RLE's bounding box), from the areas of :meth:`_detections`
        and, for masks, the boxes of all of them at once."""
        det = self._dets
        areas = self._area[index].tolist()
        if self.params.iou_type == "bbox":
            anns = list(det.dicts(index, bbox=True, segmentation=False))
            for k, (ann, area) in enumerate(zip(anns, areas)):
                ann["id"], ann["iscrowd"], ann["area"] = k + 1, 0, area
            return anns
        import pycocotools.mask as mask_utils

        rles = det.rles(index)
        boxes = mask_utils.toBbox(rles).tolist() if rles else []
        columns = zip(det.image_id[index].tolist(), det.category_id[index].tolist(),
                      det.score[index].tolist(), rles, areas, boxes)
        return [{"image_id": i, "category_id": c, "score": s, "area": a, "bbox": b,
                 "segmentation": {"size": r["size"], "counts": r["counts"].decode("ascii")},
                 "id": k + 1, "iscrowd": 0}
                for k, (i, c, s, r, a, b) in enumerate(columns)]

    def _groups(self, gt_by_cat, dt_by_cat):
        """Categories with ground truth, in id order, cut into groups of about
        `pairs_per_group` (images touched x categories)."""
        group, images = [], set()
        for c in self.params.cat_ids:
            if not gt_by_cat.get(c):
                continue  # no ground truth: precision stays -1, as in lvis-api
            touched = {a["image_id"] for a in gt_by_cat[c]}
            if c in dt_by_cat:
                touched.update(np.unique(self._dets.image_id[dt_by_cat[c]]).tolist())
            if group and len(images | touched) * (len(group) + 1) > self.pairs_per_group:
                yield group, images
                group, images = [], set()
            group.append(c)
            images |= touched
        if group:
            yield group, images

    # ----------------------------------------------------------------------- evaluate

    def _evaluate_group(self, cats, image_ids, gt_by_cat, dt_by_cat):
        from faster_coco_eval import COCO, COCOeval_faster

        def quiet(*args, **kwargs):
            pass

        p, det = self.params, self._dets
        images = [self.lvis_gt.imgs[i] for i in sorted(image_ids)]
        gt = COCO({"images": images, "categories": self.lvis_gt.load_cats(cats),
                   "annotations": [a for c in cats for a in gt_by_cat[c]]}, print_function=quiet)
        index = np.concatenate([dt_by_cat[c] for c in cats if c in dt_by_cat] or [np.zeros(0, np.int64)])
        dt = COCO({"images": images, "categories": gt.dataset["categories"],
                   "annotations": self._result_annotations(index)}, print_function=quiet)
        ev = COCOeval_faster(gt, dt, p.iou_type, lvis_style=True, print_function=quiet)
        ev.params.imgIds = sorted(image_ids)
        ev.params.catIds = list(cats)
        ev.params.iouThrs = p.iou_thrs
        ev.params.recThrs = p.rec_thrs
        ev.params.areaRng = [list(r) for r in p.area_rng]
        ev.params.areaRngLbl = list(p.area_rng_lbl)
        # the per-image cap is applied already; the C++ cap (per image and category) must
        # not cut further, and sizes its buffers by it
        pairs = det.image_id[index] * (max(cats) + 1) + det.category_id[index]
        ev.params.maxDets = [int(np.unique(pairs, return_counts=True)[1].max()) if len(pairs) else 1]
        ev.evaluate()
        ev.accumulate()
        return ev.eval["precision"][..., 0], ev.eval["recall"][..., 0]

    def evaluate(self):
        p = self.params
        gt_by_cat = self._ground_truth()
        dt_by_cat = self._detections(gt_by_cat)
        num_t, num_r, num_a = len(p.iou_thrs), len(p.rec_thrs), len(p.area_rng)
        precision = -np.ones((num_t, num_r, len(p.cat_ids), num_a))
        recall = -np.ones((num_t, len(p.cat_ids), num_a))
        index = {c: k for k, c in enumerate(p.cat_ids)}
        for cats, image_ids in self._groups(gt_by_cat, dt_by_cat):
            prec, rec = self._evaluate_group(cats, image_ids, gt_by_cat, dt_by_cat)
            ks = [index[c] for c in cats]
            precision[:, :, ks, :] = prec
            recall[:, ks, :] = rec
        self.eval = {"params": p, "counts": [num_t, num_r, len(p.cat_ids), num_a],
                     "precision": precision, "recall": recall}

    def accumulate(self):
        """Nothing to do: :meth:`evaluate` accumulates (kept for LVISEval's call order)."""

    # ---------------------------------------------------------------------- summarize

    def _freq_groups(self):
        groups = [[] for _ in self.params.img_count_lbl]
        for k, cat in enumerate(self.lvis_gt.load_cats(self.params.cat_ids)):
            groups[self.params.img_count_lbl.index(cat["frequency"])].append(k)
        return groups

    def _summarize(self, kind, iou_thr=None, area_rng="all", cats=None):
        p = self.params
        a = p.area_rng_lbl.index(area_rng)
        s = self.eval["precision"] if kind == "ap" else self.eval["recall"]
        if iou_thr is not None:
            s = s[np.where(iou_thr == p.iou_thrs)[0]]
        s = s[..., a]
        if cats is not None:
            s = s[..., cats]
        s = s[s > -1]
        return float(np.mean(s)) if s.size else -1

    def summarize(self):
        if not self.eval:
            raise RuntimeError("Please run accumulate() first.")
        groups = self._freq_groups()
        r = self.results
        r["AP"] = self._summarize("ap")
        r["AP50"] = self._summarize("ap", iou_thr=0.50)
        r["AP75"] = self._summarize("ap", iou_thr=0.75)
        r["APs"] = self._summarize("ap", area_rng="small")
        r["APm"] = self._summarize("ap", area_rng="medium")
        r["APl"] = self._summarize("ap", area_rng="large")
        for name, group in zip(("APr", "APc", "APf"), groups):
            r[name] = self._summarize("ap", cats=group)
        max_dets = self.params.max_dets
        r[f"AR@{max_dets}"] = self._summarize("ar")
        for area_rng in ("small", "medium", "large"):
            r[f"AR{area_rng[0]}@{max_dets}"] = self._summarize("ar", area_rng=area_rng)

    def run(self):
        self.evaluate()
        self.accumulate()
        self.summarize()

    def get_results(self):
        return self.results

    def print_results(self):
        for key, value in self.results.items():
            print(f" {key:<10} = {value:0.3f}")
