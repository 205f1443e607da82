"""tools/ensemble.py on hand-built results files: NMS, WBF, masks, caps, bad input."""

import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from detectron2.data import MetadataCatalog

from eql_d2.evaluation.ensemble import merge_image
from lvis_cases import box_ann, category, det, image, write_json
from helpers import ROOT, load_script



def load_tool():
    return load_script("tools/ensemble.py", "ensemble_tool")


ensemble = load_tool()


def ground_truth(tmp_path):
    gt = {
        "images": [image(1, neg=[]), image(2, neg=[1])],
        "annotations": [box_ann(1, 1, 1, 10, 10, 20, 20), box_ann(2, 1, 2, 50, 50, 10, 10),
                        box_ann(3, 2, 2, 20, 20, 30, 30)],
        "categories": [category(1, "cat_one", "f", 100), category(2, "cat_two", "r", 4)],
    }
    return write_json(tmp_path / "gt.json", gt)


# member A and B on image 1: A's and B's category-1 boxes overlap with IoU 380 / 420
MEMBER_A = [det(1, 1, 10, 10, 20, 20, 0.9), det(1, 2, 50, 50, 10, 10, 0.6)]
MEMBER_B = [det(1, 1, 11, 10, 20, 20, 0.8), det(1, 1, 70, 70, 10, 10, 0.5)]


def run(tmp_path, members, *extra):
    gt = ground_truth(tmp_path)
    paths = [write_json(tmp_path / f"member{i}.json", m) for i, m in enumerate(members)]
    out = tmp_path / "ens"
    argv = ["--json-file", gt, "--output-dir", str(out)]
    for p in paths:
        argv += ["--member", f"results={p}"]
    ensemble.main(argv + list(extra))
    with open(out / "ensemble_results.json") as f:
        return json.load(f), out, gt


def as_tuples(results):
    return sorted((r["image_id"], r["category_id"], tuple(np.round(r["bbox"], 3)),
                   round(r["score"], 4)) for r in results)


def test_nms_keeps_the_best_box_per_cluster(tmp_path):
    merged, out, _ = run(tmp_path, [MEMBER_A, MEMBER_B], "--method", "nms", "--iou-thr", "0.5")
    # ensemble-boxes scales each member's scores by weight / sum(weights) = 1/2
    assert as_tuples(merged) == as_tuples([
        det(1, 1, 10, 10, 20, 20, 0.45), det(1, 2, 50, 50, 10, 10, 0.3),
        det(1, 1, 70, 70, 10, 10, 0.25)])
    # IoU 0.905 is below a threshold of 0.95: nothing suppressed
    merged, _, _ = run(tmp_path, [MEMBER_A, MEMBER_B], "--method", "nms", "--iou-thr", "0.95")
    assert len(merged) == 4
    metrics = json.load(open(out / "metrics.json"))
    assert set(metrics["ensemble"]) == {"bbox"}


def test_wbf_fuses_overlapping_boxes(tmp_path):
    merged, _, _ = run(tmp_path, [MEMBER_A, MEMBER_B], "--method", "wbf", "--iou-thr", "0.55")
    x1 = (0.9 * 10 + 0.8 * 11) / 1.7
    assert as_tuples(merged) == as_tuples([
        det(1, 1, x1, 10, 20, 20, (0.9 + 0.8) / 2),  # fused: score-weighted coordinates
        det(1, 2, 50, 50, 10, 10, 0.6 / 2),          # found by one of two members
        det(1, 1, 70, 70, 10, 10, 0.5 / 2)])


def test_member_weights(tmp_path):
    gt = ground_truth(tmp_path)
    pa, pb = (write_json(tmp_path / f"{n}.json", m) for n, m in (("a", MEMBER_A), ("b", MEMBER_B)))
    ensemble.main(["--json-file", gt, "--output-dir", str(tmp_path / "w"), "--method", "wbf",
                   "--member", f"results={pa},weight=2", "--member", f"results={pb},weight=1"])
    merged = json.load(open(tmp_path / "w" / "ensemble_results.json"))
    top = max(merged, key=lambda r: r["score"])
    assert top["bbox"][0] == pytest.approx((1.8 * 10 + 0.8 * 11) / 2.6, abs=1e-3)
    assert top["score"] == pytest.approx((1.8 + 0.8) / 2 * 2 / 3, abs=1e-5)


def test_output_round_trips_through_lvis_results(tmp_path):
    from lvis import LVIS, LVISResults

    merged, out, gt = run(tmp_path, [MEMBER_A, MEMBER_B], "--method", "wbf")
    loaded = LVISResults(LVIS(gt), str(out / "ensemble_results.json"))
    assert len(loaded.get_ann_ids()) == len(merged) == 3
    assert {a["category_id"] for a in loaded.anns.values()} == {1, 2}


def test_cap_per_image_and_ap_fixed(tmp_path):
    many = [det(1, 1, 5 * i, 0, 4, 4, 0.9 - 0.01 * i) for i in range(6)]
    many += [det(2, 2, 5 * i, 50, 4, 4, 0.5 - 0.01 * i) for i in range(3)]
    merged, _, _ = run(tmp_path, [many], "--method", "nms", "--max-dets", "2")
    assert sorted(r["image_id"] for r in merged) == [1, 1, 2, 2]
    merged, _, _ = run(tmp_path, [many], "--method", "nms", "--ap-fixed",
                       "--ap-fixed-dets-per-class", "4")
    assert sorted(r["category_id"] for r in merged) == [1, 1, 1, 1, 2, 2, 2]


def rle(x, y, w, h, size=100):
    m = np.zeros((size, size), dtype=np.uint8, order="F")
    m[y:y + h, x:x + w] = 1
    r = mask_utils.encode(m)
    r["counts"] = r["counts"].decode("ascii")
    return r


def decode(r):
    return mask_utils.decode(dict(r, counts=r["counts"].encode("ascii")))


def test_masks_follow_kept_and_fused_boxes():
    a = [det(1, 1, 10, 10, 20, 20, 0.9, segmentation=rle(10, 10, 20, 20))]
    b = [det(1, 1, 11, 10, 20, 20, 0.8, segmentation=rle(12, 10, 20, 20))]
    kept = merge_image([a, b], 100, 100, method="nms", iou_thr=0.5)
    assert len(kept) == 1 and kept[0]["segmentation"] == a[0]["segmentation"]
    # WBF: weighted vote of both masks; with weights 3:1 A's pixels win
    fused = merge_image([a, b], 100, 100, method="wbf", iou_thr=0.5, weights=[3, 1])
    np.testing.assert_array_equal(decode(fused[0]["segmentation"]), decode(a[0]["segmentation"]))
    # equal weights: a pixel of one mask alone has vote 0.9 / 1.7 (A) or 0.8 / 1.7 (B)
    fused = merge_image([a, b], 100, 100, method="wbf", iou_thr=0.5)
    m = decode(fused[0]["segmentation"])
    assert m[15, 10] == 1 and m[15, 30] == 0 and m[15, 20] == 1
    # a box-only member's kept box takes the overlapping masked detection's mask
    box_only = [det(1, 1, 10, 10, 20, 20, 0.95)]
    kept = merge_image([box_only, b], 100, 100, method="nms", iou_thr=0.5)
    assert kept[0]["bbox"] == [10, 10, 20, 20] and kept[0]["segmentation"] == b[0]["segmentation"]
    # ... and without an overlapping mask, its own box
    far = [det(1, 1, 60, 60, 10, 10, 0.95)]
    kept = merge_image([far, b], 100, 100, method="nms", iou_thr=0.5)
    box_mask = next(k for k in kept if k["bbox"][0] == 60)["segmentation"]
    assert decode(box_mask).sum() == pytest.approx(100, abs=25)


@pytest.mark.parametrize("bad, message", [
    ([det(7, 1, 0, 0, 5, 5, 0.5)], "image ids not in"),
    ([det(1, 9, 0, 0, 5, 5, 0.5)], "category ids not in"),
])
def test_unknown_ids_fail_without_output(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message) as err:
        run(tmp_path, [MEMBER_A, bad], "--method", "nms")
    assert "member1.json" in str(err.value)
    assert not (tmp_path / "ens").exists()


def test_missing_weights_fail_without_output(tmp_path):
    gt = ground_truth(tmp_path)
    cfg = os.path.join(ROOT, "configs", "Synthetic-LT", "atss_R18_FPN_efl.yaml")
    with pytest.raises(FileNotFoundError, match="weights file not found: .*nowhere.pth"):
        ensemble.main(["--dataset", "synthetic_lt_val", "--output-dir", str(tmp_path / "ens"),
                       "--member", f"config={cfg},weights={tmp_path}/nowhere.pth"])
    assert not (tmp_path / "ens").exists()
    del gt


def test_member_with_other_categories_fails_without_output(tmp_path):
    from eql_d2.data.datasets import register_lvis_format

    gt = ground_truth(tmp_path)
    other = json.load(open(gt))
    other["categories"][1]["name"] = "not_cat_two"
    other_path = write_json(tmp_path / "other.json", other)
    val, train = f"eqltest_ens_val_{tmp_path.name}", f"eqltest_ens_other_{tmp_path.name}"
    if val not in MetadataCatalog.list():
        register_lvis_format(val, gt, str(tmp_path))
        register_lvis_format(train, other_path, str(tmp_path))
    weights = write_json(tmp_path / "w.pth", {})  # never read: the check comes first
    cfg = os.path.join(ROOT, "configs", "Synthetic-LT", "atss_R18_FPN_efl.yaml")
    base = ["--dataset", val, "--output-dir", str(tmp_path / "ens"),
            "--member", f"config={cfg},weights={weights}"]
    with pytest.raises(ValueError, match=r"MODEL.ATSS.NUM_CLASSES = 60, but .*gt.json has 2"):
        ensemble.main(base)
    with pytest.raises(ValueError, match=rf"trained on '{train}'.*category id 2: "
                                         "'not_cat_two' vs 'cat_two'"):
        ensemble.main(base + ["--opts", "MODEL.ATSS.NUM_CLASSES", "2",
                              "DATASETS.TRAIN", f"('{train}',)"])
    assert not (tmp_path / "ens").exists()


def test_member_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="needs results=FILE or both"):
        ensemble.parse_member("config=a.yaml", 0)
    with pytest.raises(ValueError, match="weight must be > 0"):
        ensemble.parse_member(f"results={ground_truth(tmp_path)},weight=0", 0)
    with pytest.raises(FileNotFoundError, match="results file not found: missing.json"):
        ensemble.parse_member("results=missing.json", 3)


def save_random_model(config, opts, path):
    """Weights of a freshly initialized model: enough to run the whole inference path."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from eql_d2.config import get_eql_cfg
    from eql_d2.engine import prepare_datasets

    cfg = get_eql_cfg(config)
    cfg.merge_from_list(opts)
    prepare_datasets(cfg)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    DetectionCheckpointer(build_model(cfg), save_dir=os.path.dirname(path)).save(
        os.path.splitext(os.path.basename(path))[0])
    return path


def test_model_members_with_tta_end_to_end(small_synthetic, tmp_path):
    """A Mask R-CNN (EQLv2) with TTA and an ATSS (EFL) on the small Synthetic-LT val split:
    inference through launch, per-member evaluation, WBF with masks following, evaluation."""
    import eql_d2.modeling  # noqa: F401
    from eql_d2.data.datasets import register_lvis_format
    from lvis import LVIS, LVISResults

    train, val = "eqltest_ens_slt_train", "eqltest_ens_slt_val"
    if train not in MetadataCatalog.list():
        for name, split in ((train, "train"), (val, "val")):
            register_lvis_format(name, os.path.join(small_synthetic, f"lvis_v1_{split}.json"),
                                 small_synthetic)
    opts = ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)",
            "MODEL.ROI_HEADS.NUM_CLASSES", "8", "MODEL.ATSS.NUM_CLASSES", "8",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "30",
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
            "DATALOADER.NUM_WORKERS", "0"]
    rcnn = os.path.join(ROOT, "configs", "Synthetic-LT", "EQL", "mask_rcnn_R18_FPN_eqlv2.yaml")
    atss = os.path.join(ROOT, "configs", "Synthetic-LT", "atss_R18_FPN_efl.yaml")
    w_rcnn = save_random_model(rcnn, opts, str(tmp_path / "rcnn" / "model_final.pth"))
    w_atss = save_random_model(atss, opts, str(tmp_path / "atss" / "model_final.pth"))
    out = tmp_path / "ens"
    ensemble.main(["--dataset", val, "--output-dir", str(out), "--method", "wbf",
                   "--tta-min-sizes", "48", "64", "--tta-max-size", "100",
                   "--member", f"config={rcnn},weights={w_rcnn},tta=1,name=rcnn_tta",
                   "--member", f"config={atss},weights={w_atss},name=atss",
                   "--opts", *opts])
    for name in ("rcnn_tta", "atss"):
        assert os.path.isfile(out / "members" / name / "lvis_instances_results.json")
    metrics = json.load(open(out / "metrics.json"))
    assert set(metrics["members"]["rcnn_tta"]) == {"bbox", "segm"}
    assert set(metrics["members"]["atss"]) == {"bbox"}
    merged = json.load(open(out / "ensemble_results.json"))
    assert merged and all("segmentation" in r for r in merged)
    assert set(metrics["ensemble"]) == {"bbox", "segm"}
    gt = LVIS(os.path.join(small_synthetic, "lvis_v1_val.json"))
    assert len(LVISResults(gt, str(out / "ensemble_results.json")).get_ann_ids()) == len(merged)
    per_image = {}
    for r in merged:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert max(per_image.values()) <= 300
    assert os.path.isfile(out / "inference" / "per_category_segm.csv")


def test_dense_tta_views_map_back_to_the_image():
    """TTA = per-class NMS over the views' detections mapped back to the image: checked
    against the model run by hand on the image and on its mirror image."""
    import torch
    from detectron2.layers import batched_nms
    from detectron2.modeling import build_model
    from detectron2.modeling.test_time_augmentation import DatasetMapperTTA

    import eql_d2.modeling  # noqa: F401
    from eql_d2.config import get_eql_cfg
    from eql_d2.evaluation.tta import DenseDetectorWithTTA, build_tta_model

    cfg = get_eql_cfg(os.path.join(ROOT, "configs", "Synthetic-LT", "atss_R18_FPN_efl.yaml"))
    cfg.merge_from_list(["DATASETS.TRAIN", "()", "MODEL.ATSS.NUM_CLASSES", "8",
                         "TEST.DETECTIONS_PER_IMAGE", "20"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8)
    with torch.no_grad():
        plain = model([{"image": image}])[0]["instances"]
        mirror = model([{"image": image.flip(-1)}])[0]["instances"]
        tta = DenseDetectorWithTTA(cfg, model, DatasetMapperTTA(min_sizes=[48], max_size=1000,
                                                                flip=True))
        got = tta([{"image": image, "height": 48, "width": 64}])[0]["instances"]
        big = DenseDetectorWithTTA(cfg, model, DatasetMapperTTA(min_sizes=[96], max_size=1000,
                                                                flip=True))
        got_big = big([{"image": image, "height": 48, "width": 64}])[0]["instances"]
    unmirrored = mirror.pred_boxes.tensor[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) \
        + torch.tensor([64, 0, 64, 0])
    boxes = torch.cat([plain.pred_boxes.tensor, unmirrored])
    scores = torch.cat([plain.scores, mirror.scores])
    classes = torch.cat([plain.pred_classes, mirror.pred_classes])
    keep = batched_nms(boxes, scores, classes, cfg.MODEL.ATSS.NMS_THRESH_TEST)[:20]
    assert len(plain) > 0 and len(got) == len(keep)
    torch.testing.assert_close(got.pred_boxes.tensor, boxes[keep], atol=1e-3, rtol=0)
    torch.testing.assert_close(got.scores, scores[keep])
    assert got_big.image_size == (48, 64) and 0 < len(got_big) <= 20
    b = got_big.pred_boxes.tensor
    assert (b[:, 2] <= 64).all() and (b[:, 3] <= 48).all() and (b >= 0).all()
    assert isinstance(build_tta_model(cfg, model), DenseDetectorWithTTA)
