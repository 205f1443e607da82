"""benchmarks/rare_diagnostics.py on a hand-built ground truth and result list."""

import math

import pytest

from helpers import load_script

rare_diagnostics = load_script("benchmarks/rare_diagnostics.py")


def test_group_statistics_by_hand():
    gt = {
        "images": [{"id": 1}, {"id": 2}],
        "categories": [{"id": 1, "frequency": "r"}, {"id": 2, "frequency": "c"},
                       {"id": 3, "frequency": "f"}],
        "annotations": [
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
            {"image_id": 2, "category_id": 1, "bbox": [20, 20, 10, 10]},
            {"image_id": 1, "category_id": 3, "bbox": [50, 50, 20, 20]},
        ],
    }
    results = [
        # rare box of image 1 found twice (best score 0.3); image 2's rare box missed:
        # the only detection there is the wrong place (IoU 0) -> a false positive
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "score": 0.3},
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 9], "score": 0.1},
        {"image_id": 2, "category_id": 1, "bbox": [60, 60, 5, 5], "score": 0.7},
        # frequent box found with IoU 0.81 (>= 0.5) and one with IoU 0.25 (< 0.5, a FP)
        {"image_id": 1, "category_id": 3, "bbox": [50, 50, 20, 16.2], "score": 0.9},
        {"image_id": 1, "category_id": 3, "bbox": [50, 50, 10, 10], "score": 0.2},
        # common category has no ground truth at all: a false positive
        {"image_id": 2, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 0.05},
        # common detection on image 1's rare object: a confusion between categories
        {"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.5},
    ]
    s = rare_diagnostics.group_statistics(gt, results)
    assert s["r"]["recall"] == 0.5
    assert s["r"]["tp_score"] == 0.3
    # the 0.1 detection also matches the found box: not a false positive
    assert s["r"]["fp_score"] == 0.7
    assert s["r"]["dets_per_image"] == 1.5
    assert s["f"]["recall"] == 1.0 and s["f"]["tp_score"] == 0.9
    assert s["f"]["fp_score"] == 0.2
    assert s["c"]["recall"] == 0.0 and math.isnan(s["c"]["tp_score"])
    assert s["c"]["fp_score"] == pytest.approx(0.275) and s["c"]["dets_per_image"] == 1.0
    assert s["c"]["fp_on_objects"] == 0.5  # the 0.5 one lies on the rare object
    assert s["r"]["fp_on_objects"] == 0.0 and s["f"]["fp_on_objects"] == 0.0
    # FP above the median TP score: rare 0.7 > 0.3 (1 of 2 images), frequent 0.2 < 0.9
    assert s["r"]["high_fp_per_image"] == 0.5 and s["f"]["high_fp_per_image"] == 0.0


def test_group_ap_skips_categories_without_ground_truth(tmp_path):
    path = tmp_path / "per_category_bbox.csv"
    path.write_text("category_id,name,frequency,train_image_count,AP,num_detections\n"
                    "1,a,r,1,2.0,5\n2,b,r,2,4.0,5\n3,c,f,9,-1,0\n4,d,f,9,10.0,3\n")
    assert rare_diagnostics.group_ap(str(path)) == pytest.approx({"r": 3.0, "f": 10.0})


def test_false_positive_locations_by_hand():
    gt = {
        "images": [{"id": 1, "neg_category_ids": [2], "not_exhaustive_category_ids": [3]},
                   {"id": 2, "neg_category_ids": [], "not_exhaustive_category_ids": []}],
        "categories": [{"id": 1, "frequency": "r"}, {"id": 2, "frequency": "r"},
                       {"id": 3, "frequency": "r"}, {"id": 4, "frequency": "f"}],
        "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}],
    }
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.4},   # TP
        {"image_id": 1, "category_id": 1, "bbox": [40, 40, 5, 5], "score": 0.6},   # positive
        {"image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 0.2},     # verified neg
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5},     # not exh.
        {"image_id": 2, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 0.9},     # unverified
        {"image_id": 2, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.1},     # unverified
        {"image_id": 2, "category_id": 4, "bbox": [0, 0, 5, 5], "score": 0.1},     # f, unverified
    ]
    s = rare_diagnostics.location_statistics(gt, results)
    r = s["r"]
    # per image (2 images); "high": above the rare median TP score 0.4
    assert (r["positive"], r["verified negative"], r["not exhaustive"], r["unverified"]) == \
        (0.5, 0.5, 0.5, 1.0)
    assert (r["high positive"], r["high verified negative"], r["high not exhaustive"],
            r["high unverified"]) == (0.5, 0.0, 0.5, 0.5)
    # the frequent group has no true positive: every false positive counts as "high" only
    # above an infinite median, i.e. never
    assert s["f"]["unverified"] == 0.5 and s["f"]["high unverified"] == 0.0
    assert s["c"]["positive"] == 0.0


def test_runs_are_labelled_by_as_many_folders_as_tell_them_apart():
    assert rare_diagnostics.run_labels(["out/a/seed0", "out/b/seed0/"]) == ["a/seed0",
                                                                            "b/seed0"]
    assert rare_diagnostics.run_labels(["x/run1", "y/run2"]) == ["run1", "run2"]
    # the same folder twice: the whole path, still the same
    assert rare_diagnostics.run_labels(["a/s", "a/s"]) == ["a/s", "a/s"]
