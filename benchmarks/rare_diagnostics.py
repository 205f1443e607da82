"""Where do rare categories get lost? Recall and score statistics per frequency group.

For each run folder (a train_net.py OUTPUT_DIR with inference/<dataset>/lvis_instances_results.json)
and the ground truth of that dataset, prints per LVIS frequency group (r / c / f):

- AP: mean per-category bbox AP (from the run's per_category_bbox.csv);
- recall: fraction of ground-truth boxes covered (IoU >= 0.5) by a detection of their own
  category anywhere in the image's output list, whatever its score;
- TP score: median score of the best such detection;
- dets/img: detections per image labelled with a category of the group;
- FP score: median score of the group's detections that match no box of their category
  (false positives);
- FP on objects: fraction of those false positives that cover (IoU >= 0.5) an object of
  another category, i.e. confusions between categories rather than background;
- high FP/img: false positives per image scoring above the group's median TP score.

``--locations`` prints a second table: where each group's false positives land, by what the
image's LVIS labels say of the detected category (``location_statistics``), per image:

- positive: the category is annotated in the image (a duplicate or a misplaced box);
- verified negative: the category is in the image's ``neg_category_ids`` (LVIS counts it);
- not exhaustive: in ``not_exhaustive_category_ids`` (LVIS ignores it);
- unverified: neither (LVIS ignores it: federated labelling).

Only the first two lower LVIS AP; a loss that adds detections only where the evaluation
ignores them costs nothing on the benchmark.

AP of a category needs its true positives to outrank its false positives across images, so
"recall high, TP score below FP score" means the classifier finds the objects but ranks them
badly, while "recall low" means the detector never proposes the category there.

    python benchmarks/rare_diagnostics.py --gt datasets/synthetic_lt/lvis_v1_val.json RUN_DIR ...
"""

import argparse
import glob
import json
import os
from collections import defaultdict

import numpy as np
import torch
from torchvision.ops import box_iou

from eql_d2.evaluation.lvis_evaluation import read_per_category_ap
from eql_d2.utils.groups import GROUPS


def _xyxy(boxes):
    b = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


def group_statistics(gt, results, iou_thresh=0.5):
    """Per-group recall / score statistics of LVIS-format `results` against `gt` (dicts)."""
    group = {c["id"]: c["frequency"] for c in gt["categories"]}
    gt_by = defaultdict(list)  # (image, category) -> boxes
    gt_image = defaultdict(list)  # image -> [(category, box)]
    for a in gt["annotations"]:
        gt_by[(a["image_id"], a["category_id"])].append(a["bbox"])
        gt_image[a["image_id"]].append((a["category_id"], a["bbox"]))
    det_by = defaultdict(list)  # (image, category) -> [(score, box)]
    for r in results:
        det_by[(r["image_id"], r["category_id"])].append((r["score"], r["bbox"]))

    stats = {g: {"gt": 0, "found": 0, "tp_scores": [], "fp_scores": [], "fp_on_objects": 0, "dets": 0}
             for g in GROUPS}
    for key in set(gt_by) | set(det_by):
        g = stats[group[key[1]]]
        gts, dets = gt_by.get(key, []), det_by.get(key, [])
        g["gt"] += len(gts)
        g["dets"] += len(dets)
        if not dets:
            continue
        scores = torch.tensor([s for s, _ in dets], dtype=torch.float64)
        if gts:
            iou = box_iou(_xyxy(gts), _xyxy([b for _, b in dets])) >= iou_thresh
        else:
            iou = torch.zeros(0, len(dets), dtype=torch.bool)
        for row in iou:
            if row.any():
                g["found"] += 1
                g["tp_scores"].append(float(scores[row].max()))
        unmatched = ~iou.any(dim=0)
        g["fp_scores"].extend(scores[unmatched].tolist())
        others = [b for c, b in gt_image.get(key[0], []) if c != key[1]]
        if others and bool(unmatched.any()):
            fp_boxes = _xyxy([b for (_, b), u in zip(dets, unmatched.tolist()) if u])
            g["fp_on_objects"] += int((box_iou(fp_boxes, _xyxy(others)) >= iou_thresh).any(dim=1).sum())

    num_images = len(gt["images"])
    out = {}
    for name, g in stats.items():
        tp_median = float(np.median(g["tp_scores"])) if g["tp_scores"] else float("nan")
        out[name] = {
            "recall": g["found"] / max(g["gt"], 1),
            "tp_score": tp_median,
            "fp_score": float(np.median(g["fp_scores"])) if g["fp_scores"] else float("nan"),
            "dets_per_image": g["dets"] / num_images,
            "fp_on_objects": g["fp_on_objects"] / max(len(g["fp_scores"]), 1),
            "high_fp_per_image": sum(f > tp_median for f in g["fp_scores"]) / num_images,
        }
    return out


LOCATIONS = ("positive", "verified negative", "not exhaustive", "unverified")


def location_statistics(gt, results, iou_thresh=0.5):
    """Per group: false positives per image by where they land (:data:`LOCATIONS`), in all
    and above the group's median true-positive score ("high"); dicts of floats."""
    group = {c["id"]: c["frequency"] for c in gt["categories"]}
    negative = {(img["id"], c) for img in gt["images"] for c in img.get("neg_category_ids", [])}
    not_exhaustive = {(img["id"], c) for img in gt["images"]
                      for c in img.get("not_exhaustive_category_ids", [])}
    gt_by = defaultdict(list)
    for a in gt["annotations"]:
        gt_by[(a["image_id"], a["category_id"])].append(a["bbox"])
    det_by = defaultdict(list)
    for r in results:
        det_by[(r["image_id"], r["category_id"])].append((r["score"], r["bbox"]))
    fps = {g: [] for g in GROUPS}  # (location, score)
    tps = {g: [] for g in GROUPS}
    for key, dets in det_by.items():
        gts = gt_by.get(key, [])
        scores = [sc for sc, _ in dets]
        if gts:
            hit = box_iou(_xyxy(gts), _xyxy([b for _, b in dets])) >= iou_thresh
            for row in hit:
                if row.any():
                    tps[group[key[1]]].append(max(sc for sc, h in zip(scores, row.tolist()) if h))
            unmatched = (~hit.any(dim=0)).tolist()
            location = "positive"
        else:
            unmatched = [True] * len(dets)
            location = ("verified negative" if key in negative else
                        "not exhaustive" if key in not_exhaustive else "unverified")
        fps[group[key[1]]].extend((location, sc) for sc, u in zip(scores, unmatched) if u)
    num_images = len(gt["images"])
    out = {}
    for g in GROUPS:
        median_tp = float(np.median(tps[g])) if tps[g] else float("inf")
        out[g] = {loc: sum(1 for l, _ in fps[g] if l == loc) / num_images for loc in LOCATIONS}
        out[g].update({f"high {loc}": sum(1 for l, sc in fps[g] if l == loc and sc > median_tp)
                       / num_images for loc in LOCATIONS})
    return out


def group_ap(csv_file):
    """Mean per-category AP (in %) of each group from a per_category_<task>.csv."""
    per = defaultdict(list)
    for frequency, ap in read_per_category_ap(csv_file).values():
        per[frequency].append(ap)
    return {g: float(np.mean(v)) if v else float("nan") for g, v in per.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gt", required=True, help="LVIS-format ground-truth JSON")
    parser.add_argument("runs", nargs="+", help="train_net.py output folders")
    parser.add_argument("--locations", action="store_true",
                        help="also print where the false positives land (see above)")
    args = parser.parse_args()
    with open(args.gt) as f:
        gt = json.load(f)

    print("| run | group | AP | recall (any score) | TP score | FP score | dets/img "
          "| FP on objects | high FP/img |")
    print("|---|---|---|---|---|---|---|---|---|")
    loaded = []
    names = dict(zip(args.runs, run_labels(args.runs)))
    for run in args.runs:
        found = glob.glob(os.path.join(run, "inference", "*", "lvis_instances_results.json"))
        if len(found) != 1:
            raise SystemExit(f"{run}: expected one inference/*/lvis_instances_results.json, "
                             f"found {len(found)}")
        with open(found[0]) as f:
            results = json.load(f)
        name = names[run]
        loaded.append((name, results))
        ap = group_ap(os.path.join(os.path.dirname(found[0]), "per_category_bbox.csv"))
        for g, s in group_statistics(gt, results).items():
            print(f"| {name} | {g} | {ap.get(g, float('nan')):.2f} "
                  f"| {s['recall']:.3f} | {s['tp_score']:.4f} | {s['fp_score']:.4f} "
                  f"| {s['dets_per_image']:.1f} | {s['fp_on_objects']:.3f} "
                  f"| {s['high_fp_per_image']:.2f} |")
    if args.locations:
        print("\nFalse positives per image by where they land (in all / above the group's "
              "median TP score)\n")
        print("| run | group | " + " | ".join(LOCATIONS) + " |")
        print("|---|---|" + "---|" * len(LOCATIONS))
        for name, results in loaded:
            for g, s in location_statistics(gt, results).items():
                cells = " | ".join(f"{s[loc]:.2f} / {s['high ' + loc]:.2f}" for loc in LOCATIONS)
                print(f"| {name} | {g} | {cells} |")


def run_labels(runs):
    """Each run folder's name, with as many parent folders as it takes to tell the runs apart
    (``atss_focal/seed0`` and ``atss_efl/seed0``, not ``seed0`` twice)."""
    parts = [os.path.normpath(r).split(os.sep) for r in runs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return labels


if __name__ == "__main__":
    main()
