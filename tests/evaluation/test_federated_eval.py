"""Federated LVIS evaluation: a false positive counts only where its category is verified.

LVISEval scores category c on image i only when i is in c's positive set (c annotated on i)
or negative set (c in i's ``neg_category_ids``), and ignores unmatched detections of c on
images that list c in ``not_exhaustive_category_ids``. The expected APs are computed by hand
from LVIS's 101-point interpolated precision.
"""

import json
import os

import pytest
from lvis import LVIS

from eql_d2.evaluation import evaluate_lvis
from lvis_cases import box_ann, category, det, image, write_json

# ranked hit, false positive, hit on 2 ground truths: precision 1 up to recall 0.5 (51 of
# the 101 recall points), 2/3 after it (50 points)
AP_HIT_FP_HIT = 100.0 * (51 * 1 + 50 * 2 / 3) / 101


def _case():
    """Category 1: ground truth on images 1 and 2; image 3 verified free of it; image 4
    unverified (neither annotated nor negative); image 5 has one annotated instance of it
    and is flagged not exhaustive. Category 2 gives the split a second category."""
    return {
        "images": [image(1, neg=[2]), image(2, neg=[2]), image(3, neg=[1, 2]), image(4),
                   image(5, not_exhaustive=[1])],
        "annotations": [box_ann(1, 1, 1, 10, 10, 30, 30), box_ann(2, 2, 1, 20, 20, 30, 30),
                        box_ann(3, 5, 1, 60, 60, 20, 20), box_ann(4, 4, 2, 5, 5, 20, 20)],
        "categories": [category(1, "alpha", "f", 300), category(2, "beta", "r", 4)],
    }


def _ap(tmp_path, gt, results):
    """{category_id: bbox AP in percent} through eql_d2's LVIS evaluation (LVISEval)."""
    os.makedirs(tmp_path, exist_ok=True)
    gt_path = write_json(tmp_path / "gt.json", gt)
    out = evaluate_lvis(LVIS(gt_path), results, ("bbox",), output_dir=str(tmp_path / "out"))
    with open(tmp_path / "out" / "per_category_bbox.csv") as f:
        rows = [line.split(",") for line in f.read().splitlines()[1:]]
    return {int(r[0]): float(r[4]) for r in rows if r[4]}, out["bbox"]


def _hits():
    # every ground truth of category 1 found exactly, image 5's first
    return [det(1, 1, 10, 10, 30, 30, 0.9), det(2, 1, 20, 20, 30, 30, 0.7),
            det(5, 1, 60, 60, 20, 20, 0.95), det(4, 2, 5, 5, 20, 20, 0.9)]


def test_false_positive_on_unverified_image_is_ignored(tmp_path):
    ap, _ = _ap(tmp_path, _case(), _hits() + [det(4, 1, 50, 50, 30, 30, 0.8)])
    assert ap[1] == pytest.approx(100.0)


def test_false_positive_on_verified_negative_image_counts(tmp_path):
    # 3 ground truths (images 1, 2, 5); ranking: hit .95, hit .9, FP .8, hit .7:
    # precision 1 up to recall 2/3 (points 0..0.66: 67 points), then 3/4 (34 points)
    ap, summary = _ap(tmp_path, _case(), _hits() + [det(3, 1, 50, 50, 30, 30, 0.8)])
    assert ap[1] == pytest.approx(100.0 * (67 * 1 + 34 * 3 / 4) / 101, abs=1e-4)
    assert summary["APf"] == pytest.approx(ap[1], abs=1e-4)


def test_unmatched_detection_ignored_only_where_not_exhaustive(tmp_path):
    # an extra box of category 1 on image 5 (flagged not exhaustive) is ignored ...
    ap, _ = _ap(tmp_path, _case(), _hits() + [det(5, 1, 5, 5, 20, 20, 0.8)])
    assert ap[1] == pytest.approx(100.0)
    # ... the same box on image 2 (exhaustive) is a false positive
    ap, _ = _ap(tmp_path, _case(), _hits() + [det(2, 1, 60, 60, 20, 20, 0.8)])
    assert ap[1] == pytest.approx(100.0 * (67 * 1 + 34 * 3 / 4) / 101, abs=1e-4)


def test_same_false_positive_counts_in_exhaustive_split(tmp_path):
    """The exhaustive split lists every absent category as negative, so the false positive
    that the federated split ignores (image 4) is scored there."""
    gt = _case()
    gt["images"][3]["neg_category_ids"] = [1]
    ap, _ = _ap(tmp_path, gt, _hits() + [det(4, 1, 50, 50, 30, 30, 0.8)])
    assert ap[1] == pytest.approx(100.0 * (67 * 1 + 34 * 3 / 4) / 101, abs=1e-4)


def _load(root, split):
    with open(os.path.join(root, f"lvis_v1_{split}.json")) as f:
        return json.load(f)


def test_generated_federated_val_scores_only_verified_images(small_synthetic, tmp_path):
    """On the generator's federated val: perfect detections of one category plus a top-scored
    false positive on an image where it is unverified keep AP 100; on an image of its
    negative set the AP drops to n / (n + 1) for n ground truths (the false positive ranks
    first, so precision is k / (k + 1) at recall k / n and interpolates to n / (n + 1))."""
    fed = _load(small_synthetic, "val_fed")
    present = {}
    for a in fed["annotations"]:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    verified = {img["id"]: present.get(img["id"], set()) | set(img["neg_category_ids"])
                for img in fed["images"]}
    # a category with both a verified-absent and an unverified image
    c = next(c["id"] for c in fed["categories"]
             if any(c["id"] in img["neg_category_ids"] for img in fed["images"])
             and any(c["id"] not in verified[i] for i in verified))
    neg_image = next(img["id"] for img in fed["images"] if c in img["neg_category_ids"])
    unverified_image = next(i for i in sorted(verified) if c not in verified[i])
    gts = [a for a in fed["annotations"] if a["category_id"] == c]
    assert gts
    hits = [det(a["image_id"], c, *a["bbox"], 0.5) for a in gts]
    box = [4.0, 4.0, 20.0, 20.0]  # neither image has an object of c to match it

    ap, _ = _ap(tmp_path / "a", fed, hits + [det(unverified_image, c, *box, 0.9)])
    assert ap[c] == pytest.approx(100.0)
    ap, _ = _ap(tmp_path / "b", fed, hits + [det(neg_image, c, *box, 0.9)])
    n = len(gts)
    assert ap[c] == pytest.approx(100.0 * n / (n + 1), abs=1e-4)
