"""Merging LVIS-format results of several detectors (challenge-style ensembles).

Boxes are merged per image and category by the ``ensemble-boxes`` package: NMS, soft-NMS
or weighted boxes fusion (WBF), with one weight per member. What is new here is around it:

- coordinates: LVIS ``[x, y, w, h]`` pixels <-> ensemble-boxes' normalized ``[x1, y1, x2,
  y2]`` (clipped to the image; boxes of zero area after clipping are dropped, as
  ensemble-boxes would drop them with a printed warning);
- masks follow the boxes: NMS / soft-NMS keep input boxes, and a kept box takes the mask
  of the input detection it is (same category, IoU 1; among equal boxes the highest
  weighted score). WBF boxes are fused, and a fused box takes the weighted pixel vote
  (weights score x member weight, foreground where the vote >= 1/2) of the masks of the
  inputs of its category whose box overlaps it by more than the IoU threshold, which is the
  criterion WBF clusters by. A kept box whose own detection has no mask (a box-only
  member) takes the mask of the best-overlapping masked input above the threshold, and
  without one its own box as a rectangle mask, so every output detection has a mask when
  any member has masks;
- score calibration (optional, per member): "quantile" replaces each score by its rank
  quantile among that member's scores, so members with different score scales (sigmoid
  R-CNN, ATSS's sqrt(p * IoU)) are comparable before weighting;
- the per-image cap (LVIS: 300) or AP-fixed's top-K per category.

ensemble-boxes details worth knowing: its NMS and soft-NMS scale each member's scores by
weight / sum(weights); its soft-NMS returns the kept boxes with their original (not
decayed) scores; its WBF with ``conf_type="avg"`` scores a fused box by the mean weighted
score of its cluster times min(#members, cluster size) / sum(weights), so a box found by
one of two equally weighted members gets half its score.
"""

import logging
from collections import defaultdict

import numpy as np
import pycocotools.mask as mask_utils
from ensemble_boxes import nms, soft_nms, weighted_boxes_fusion

from .results_io import top_k_per

__all__ = ["METHODS", "merge_image", "merge_results", "cap_per_image", "calibrate_quantile"]

logger = logging.getLogger(__name__)

METHODS = ("nms", "soft_nms", "wbf")


def calibrate_quantile(results):
    """Copy of `results` with score_i = (rank of score_i, 1 = lowest) / N over the list."""
    order = np.argsort([r["score"] for r in results], kind="mergesort")
    out = [dict(r) for r in results]
    n = len(results)
    for rank, i in enumerate(order):
        out[i]["score"] = (rank + 1) / n
    return out


def cap_per_image(results, max_dets):
    """The `max_dets` highest-scoring detections of each image."""
    return top_k_per(results, "image_id", max_dets)


def _to_normalized(dets, width, height):
    """LVIS dets -> (boxes [N, 4] normalized xyxy clipped to [0, 1], scores, labels, index)."""
    if not dets:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0), np.zeros(0, dtype=int)
    xywh = np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
    boxes = np.stack([xywh[:, 0] / width, xywh[:, 1] / height,
                      (xywh[:, 0] + xywh[:, 2]) / width, (xywh[:, 1] + xywh[:, 3]) / height], 1)
    boxes = boxes.clip(0.0, 1.0)
    keep = np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    scores = np.array([d["score"] for d in dets], dtype=np.float64)
    labels = np.array([d["category_id"] for d in dets], dtype=np.float64)
    return boxes[keep], scores[keep], labels[keep], keep


def _iou(boxes, box):
    """IoU of each row of boxes [N, 4] with box [4], xyxy."""
    lt = np.maximum(boxes[:, :2], box[:2])
    rb = np.minimum(boxes[:, 2:], box[2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / (area + np.prod(box[2:] - box[:2]) - inter)


def _rle_to_json(rle):
    rle = dict(rle)
    if isinstance(rle["counts"], bytes):
        rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _box_mask(box_px, height, width):
    x1, y1, x2, y2 = box_px
    rle = mask_utils.frPyObjects([[x1, y1, x2, y1, x2, y2, x1, y2]], height, width)
    return _rle_to_json(mask_utils.merge(rle))


def _vote(masks, weights):
    """Weighted pixel vote of RLE masks: foreground where the weighted mean >= 1/2."""
    if len(masks) == 1:
        return _rle_to_json(masks[0])
    stack = mask_utils.decode([dict(m, counts=m["counts"].encode("ascii")
                                    if isinstance(m["counts"], str) else m["counts"])
                               for m in masks]).astype(np.float32)  # [H, W, K]
    w = np.asarray(weights, dtype=np.float32)
    vote = (stack * w).sum(axis=2) / max(float(w.sum()), 1e-12)
    return _rle_to_json(mask_utils.encode(np.asfortranarray((vote >= 0.5).astype(np.uint8))))


def merge_image(member_dets, width, height, *, method="wbf", weights=None, iou_thr=0.55,
                skip_box_thr=0.0, sigma=0.5, conf_type="avg"):
    """Merge one image's detections of several members.

    Args:
        member_dets: one list per member of that member's LVIS result dicts for this image.
        width, height: image size in pixels (LVIS ``images`` entry).
        method: "nms", "soft_nms" or "wbf" (see module docstring).
        weights: one weight per member (default all 1).
        iou_thr: IoU above which boxes of a category suppress (NMS) or fuse (WBF).
        skip_box_thr: WBF drops input boxes scoring below it; soft-NMS drops boxes whose
            decayed score falls below it.
        sigma: Gaussian soft-NMS parameter.
        conf_type: WBF's fused-score rule ("avg", "max", "box_and_model_avg",
            "absent_model_aware_avg").

    Returns:
        list of LVIS result dicts (image_id, category_id, bbox, score, and segmentation when
        any member has masks), highest score first.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown merge method {method!r}; choose one of {METHODS}")
    weights = [1.0] * len(member_dets) if weights is None else [float(w) for w in weights]
    if len(weights) != len(member_dets):
        raise ValueError(f"{len(weights)} weights for {len(member_dets)} members")
    image_ids = {d["image_id"] for dets in member_dets for d in dets}
    if not image_ids:
        return []
    if len(image_ids) > 1:
        raise ValueError(f"merge_image got detections of several images: {sorted(image_ids)}")
    image_id = image_ids.pop()

    boxes_list, scores_list, labels_list, inputs = [], [], [], []
    for m, dets in enumerate(member_dets):
        b, s, lab, idx = _to_normalized(dets, width, height)
        boxes_list.append(b)
        scores_list.append(s)
        labels_list.append(lab)
        # input table for mask lookup: (member, box, weighted score, label, segmentation)
        inputs.extend((m, b[j], s[j] * weights[m], lab[j], dets[i].get("segmentation"))
                      for j, i in enumerate(idx))
    if not inputs:
        return []
    if method == "nms":
        boxes, scores, labels = nms(boxes_list, scores_list, labels_list, iou_thr=iou_thr,
                                    weights=weights)
    elif method == "soft_nms":
        boxes, scores, labels = soft_nms(boxes_list, scores_list, labels_list, iou_thr=iou_thr,
                                         sigma=sigma, thresh=skip_box_thr, weights=weights)
    else:
        boxes, scores, labels = weighted_boxes_fusion(
            boxes_list, scores_list, labels_list, weights=weights, iou_thr=iou_thr,
            skip_box_thr=skip_box_thr, conf_type=conf_type)

    with_masks = any(inp[4] is not None for inp in inputs)
    by_label = defaultdict(list)
    for inp in inputs:
        by_label[inp[3]].append(inp)
    scale = np.array([width, height, width, height], dtype=np.float64)
    out = []
    for box, score, label in zip(boxes, scores, labels):
        px = box * scale
        det = {"image_id": image_id, "category_id": int(label),
               "bbox": [round(float(px[0]), 3), round(float(px[1]), 3),
                        round(float(px[2] - px[0]), 3), round(float(px[3] - px[1]), 3)],
               "score": float(score)}
        if with_masks:
            det["segmentation"] = _follow_mask(box, px, by_label[label], method, iou_thr,
                                               height, width)
        out.append(det)
    out.sort(key=lambda d: d["score"], reverse=True)
    return out


def _follow_mask(box, box_px, candidates, method, iou_thr, height, width):
    boxes = np.stack([c[1] for c in candidates])
    ious = _iou(boxes, box)
    wscores = np.array([c[2] for c in candidates])
    has_mask = np.array([c[4] is not None for c in candidates])
    if method == "wbf":
        group = np.flatnonzero(has_mask & (ious > iou_thr))
        if group.size:
            return _vote([candidates[i][4] for i in group], wscores[group])
    else:
        # the kept input itself is the candidate with IoU 1; ties go to the higher score
        order = np.lexsort((-wscores, -ious))
        best = order[0]
        if has_mask[best]:
            return _rle_to_json(candidates[best][4])
        masked = [i for i in order if has_mask[i] and ious[i] > iou_thr]
        if masked:
            return _rle_to_json(candidates[masked[0]][4])
    return _box_mask(box_px, height, width)


def merge_results(members, images, *, method="wbf", weights=None, iou_thr=0.55,
                  skip_box_thr=0.0, sigma=0.5, conf_type="avg", progress=None):
    """Merge whole results lists, image by image (see :func:`merge_image`).

    Args:
        members: one LVIS results list per member.
        images: {image_id: (width, height)} of every image the results may name.
        progress: optional callable(done, total) called after each image.

    Returns:
        merged list of LVIS result dicts (uncapped).
    """
    per_member = []
    for results in members:
        by_image = defaultdict(list)
        for r in results:
            by_image[r["image_id"]].append(r)
        per_member.append(by_image)
    image_ids = sorted({i for by_image in per_member for i in by_image})
    merged = []
    for n, image_id in enumerate(image_ids):
        width, height = images[image_id]
        merged.extend(merge_image([by_image.get(image_id, []) for by_image in per_member],
                                  width, height, method=method, weights=weights,
                                  iou_thr=iou_thr, skip_box_thr=skip_box_thr, sigma=sigma,
                                  conf_type=conf_type))
        if progress is not None:
            progress(n + 1, len(image_ids))
    return merged
