"""LVIS evaluation with per-category outputs and AP-fixed, on hand-built cases."""

import csv
import math
import os

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances

from eql_d2.config import get_eql_cfg
from eql_d2.evaluation import LVISPerCategoryEvaluator, build_evaluator, evaluate_lvis
from eql_d2.evaluation.lvis_evaluation import (numpy_float_alias, per_category_ap,
                                               read_per_category_ap, top_k_per_category)
from lvis_cases import box_ann, category, det, image, per_category_case, write_json


def read_csv(path):
    with open(path) as f:
        return {int(r["category_id"]): r for r in csv.DictReader(f)}


def lvis_gt(path):
    from lvis import LVIS

    return LVIS(path)


def test_per_category_csv_matches_lvis_eval(tmp_path):
    from lvis import LVISEval, LVISResults

    gt, results, expected_ap, expected_dets = per_category_case()
    gt_path = write_json(tmp_path / "gt.json", gt)
    out = evaluate_lvis(lvis_gt(gt_path), results, ("bbox",), output_dir=str(tmp_path / "out"))

    # LVISEval's own numbers, run here independently of eql_d2
    ref = LVISEval(lvis_gt(gt_path), LVISResults(lvis_gt(gt_path), [dict(r) for r in results]),
                   "bbox")
    with numpy_float_alias():  # lvis 0.5.3 on numpy >= 1.24
        ref.run()
    rows = read_csv(tmp_path / "out" / "per_category_bbox.csv")
    assert list(rows) == [1, 2, 3, 4]
    precision = ref.eval["precision"]
    for k, cat_id in enumerate(ref.params.cat_ids):
        p = precision[:, :, k, 0]
        row = rows[cat_id]
        if expected_ap[cat_id] is None:
            assert (p == -1).all() and row["AP"] == ""
        else:
            assert float(row["AP"]) == pytest.approx(100 * p[p > -1].mean(), abs=1e-4)
            assert float(row["AP"]) == pytest.approx(expected_ap[cat_id], abs=1e-4)
        assert int(row["num_detections"]) == expected_dets[cat_id]
    assert [rows[c]["frequency"] for c in rows] == ["f", "c", "r", "r"]
    assert [int(rows[c]["train_image_count"]) for c in rows] == [200, 30, 3, 1]
    assert rows[2]["name"] == "beta"

    summary = ref.get_results()
    for key in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        assert out["bbox"][key] == pytest.approx(100 * summary[key])
    assert out["bbox"]["AP"] == pytest.approx((100 + expected_ap[2] + 0) / 3)
    assert out["bbox"]["APr"] == pytest.approx(0.0)
    for png in ("ap_vs_train_images_bbox.png", "ap_by_frequency_bbox.png"):
        with open(tmp_path / "out" / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(tmp_path / "out") if "partial" in n]


def test_per_category_csv_reads_back_the_categories_with_an_ap(tmp_path):
    """read_per_category_ap gives each category's group and AP as written; a category
    without ground truth (empty AP) is left out, and a CSV of another kind is refused."""
    gt, results, expected_ap, _ = per_category_case()
    evaluate_lvis(lvis_gt(write_json(tmp_path / "gt.json", gt)), results, ("bbox",),
                  output_dir=str(tmp_path / "out"))
    read = read_per_category_ap(tmp_path / "out" / "per_category_bbox.csv")
    groups = {c["id"]: c["frequency"] for c in gt["categories"]}
    assert read == {c: (groups[c], pytest.approx(ap, abs=1e-4))
                    for c, ap in expected_ap.items() if ap is not None}
    assert len(read) < len(expected_ap)

    other = tmp_path / "oid.csv"
    other.write_text("class,group,AP\n/m/01,r,12.5\n")
    with pytest.raises(ValueError, match=r"oid.csv: not a per-category AP table "
                                         r"\(no column category_id, frequency\)"):
        read_per_category_ap(other)


def test_numpy_is_patched_only_during_lvis_eval(tmp_path):
    """lvis 0.5.3 needs np.float, which the evaluation adds for its LVISEval call only."""
    gt, results, _, _ = per_category_case()
    evaluate_lvis(lvis_gt(write_json(tmp_path / "gt.json", gt)), results, ("bbox",))
    assert not hasattr(np, "float")


def test_per_category_ap_reads_one_category_column():
    """per_category_ap takes area 'all' of one category and skips -1 entries."""

    class FakeEval:
        class params:
            cat_ids = [7, 9]
            area_rng_lbl = ["all", "small"]
        eval = {"precision": -np.ones((2, 3, 2, 2))}

    FakeEval.eval["precision"][:, :, 0, 0] = [[1.0, 0.5, 0.0], [1.0, 1.0, -1]]
    FakeEval.eval["precision"][:, :, 0, 1] = 0.25  # another area range: ignored
    ap = per_category_ap(FakeEval)
    assert ap[7] == pytest.approx(3.5 / 5)
    assert math.isnan(ap[9])


def ap_fixed_case(tmp_path, extra_b_false_positives=0):
    """Image 1 holds category b's only ground truth and 300 higher-scoring false positives of
    a (verified absent there); image 2 holds a's ground truth, found with the top score."""
    gt = {
        "images": [image(1, neg=[1]), image(2, neg=[2])],
        "annotations": [box_ann(1, 1, 2, 10, 10, 20, 20), box_ann(2, 2, 1, 30, 30, 40, 40)],
        "categories": [category(1, "a", "f", 500), category(2, "b", "r", 5)],
    }
    rng = np.random.default_rng(0)
    results = [det(2, 1, 30, 30, 40, 40, 0.95), det(1, 2, 10, 10, 20, 20, 0.1)]
    for i in range(300):
        x, y = rng.uniform(40, 80, size=2)
        results.append(det(1, 1, float(x), float(y), 10.0, 10.0, 0.5 + 0.4 * i / 300))
    for i in range(extra_b_false_positives):  # b's misses on image 1, above its hit
        results.append(det(1, 2, 60.0 + 5 * i, 60.0, 8.0, 8.0, 0.3 - 0.01 * i))
    return lvis_gt(write_json(tmp_path / "gt.json", gt)), results


def test_ap_fixed_drops_the_per_image_cap(tmp_path):
    gt, results = ap_fixed_case(tmp_path)
    m = evaluate_lvis(gt, results, ("bbox",), ap_fixed_dets_per_class=10000,
                      output_dir=str(tmp_path / "out"))["bbox"]
    # standard AP: b's hit is detection 301 of image 1 and falls under the 300 cap
    assert m["AP"] == pytest.approx(50.0)
    assert m["APr"] == pytest.approx(0.0)
    assert m["APf"] == pytest.approx(100.0)
    # AP-fixed keeps it
    assert m["AP-fixed"] == pytest.approx(100.0)
    assert m["APr-fixed"] == pytest.approx(100.0)
    rows = read_csv(tmp_path / "out" / "per_category_bbox.csv")
    assert float(rows[2]["AP"]) == 0.0 and float(rows[2]["AP_fixed"]) == 100.0
    assert int(rows[1]["num_detections"]) + int(rows[2]["num_detections"]) == 301
    assert int(rows[2]["num_detections_fixed"]) == 1
    # the same detections with a cap above 301 per image: no difference
    m_big = evaluate_lvis(gt, results, ("bbox",), max_dets_per_image=1000)["bbox"]
    assert m_big["AP"] == pytest.approx(100.0)


def test_ap_fixed_keeps_top_k_per_category(tmp_path):
    gt, results = ap_fixed_case(tmp_path, extra_b_false_positives=2)
    # b has 3 detections; its hit is the lowest-scoring one: precision 1/3 at every recall
    assert evaluate_lvis(gt, results, ("bbox",), ap_fixed_dets_per_class=3)["bbox"][
        "APr-fixed"] == pytest.approx(100 / 3)
    assert evaluate_lvis(gt, results, ("bbox",), ap_fixed_dets_per_class=2)["bbox"][
        "APr-fixed"] == pytest.approx(0.0)
    kept = top_k_per_category(results, 2)
    assert sorted(r["score"] for r in kept if r["category_id"] == 2) == [0.29, 0.3]


def register(name, json_file, **extra):
    meta = MetadataCatalog.get(name)
    if meta.get("json_file") is None:
        meta.set(json_file=json_file, evaluator_type="lvis", **extra)
    return name


def test_evaluator_from_config_writes_outputs(tmp_path):
    gt, results, expected_ap, _ = per_category_case()
    gt_path = write_json(tmp_path / "gt.json", gt)
    name = register(f"eqltest_eval_{os.getpid()}_{tmp_path.name}", gt_path)
    train = register(f"{name}_train", gt_path, thing_classes=["alpha", "beta", "gamma", "delta"],
                     class_image_count=[{"id": i, "image_count": 10 * i} for i in range(1, 5)])
    cfg = get_eql_cfg()
    cfg.DATASETS.TRAIN = (train,)
    cfg.TEST.EVAL.AP_FIXED = True
    out_dir = str(tmp_path / "inference")
    evaluator = build_evaluator(cfg, name, out_dir)
    assert isinstance(evaluator, LVISPerCategoryEvaluator)
    evaluator._distributed = False
    evaluator.reset()
    for image_id in (1, 2, 3):
        dets = [r for r in results if r["image_id"] == image_id]
        inst = Instances((100, 100))
        inst.pred_boxes = Boxes(torch.tensor([[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2],
                                               r["bbox"][1] + r["bbox"][3]] for r in dets],
                                             dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.tensor([r["score"] for r in dets])
        inst.pred_classes = torch.tensor([r["category_id"] - 1 for r in dets], dtype=torch.long)
        evaluator.process([{"image_id": image_id}], [{"instances": inst}])
    metrics = evaluator.evaluate()
    assert set(metrics) == {"bbox"}
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AP-fixed"):
        assert key in metrics["bbox"]
    assert metrics["bbox"]["AP"] == pytest.approx((100 + expected_ap[2]) / 3, abs=1e-3)
    assert metrics["bbox"]["AP-fixed"] == pytest.approx(metrics["bbox"]["AP"])
    rows = read_csv(os.path.join(out_dir, "per_category_bbox.csv"))
    # train image counts come from the training dataset's metadata
    assert [int(r["train_image_count"]) for r in rows.values()] == [10, 20, 30, 40]
    assert float(rows[2]["AP"]) == pytest.approx(expected_ap[2], abs=1e-3)
    for f in ("lvis_instances_results.json", "ap_vs_train_images_bbox.png",
              "ap_by_frequency_bbox.png"):
        assert os.path.isfile(os.path.join(out_dir, f))
