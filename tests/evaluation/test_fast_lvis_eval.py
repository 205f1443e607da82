"""The "fast" LVIS backend (faster-coco-eval with lvis-api's rules) against lvis-api itself.

On generated federated LVIS-format splits (positive, negative and not-exhaustive
categories; categories without ground truth; images without detections and images above
the per-image cap; scores with ties; boxes and RLE masks), every summary metric, every
per-category AP and every entry of the precision and recall arrays must equal LVISEval's.
The evaluation tests of test_evaluation.py and test_federated_eval.py run here a second
time with the "lvis" backend (their own files run with the default, "fast").
"""

import contextlib
import copy
import io
import logging
import os

import numpy as np
import pytest

import test_evaluation
import test_federated_eval
from eql_d2.config import get_eql_cfg
from eql_d2.evaluation import build_evaluator, evaluate_lvis
from eql_d2.evaluation import lvis_evaluation
from eql_d2.evaluation.detections import DetectionArrays
from eql_d2.evaluation.fast_lvis import FastLVISEval
from eql_d2.evaluation.lvis_evaluation import per_category_ap
from helpers import load_script
from lvis_cases import box_ann, category, det, image, per_category_case, write_json

pytest.importorskip("faster_coco_eval")

lvis_eval_speed = load_script("benchmarks/lvis_eval_speed.py")


def lvis_from_dict(dataset):
    from lvis import LVIS

    gt = LVIS.__new__(LVIS)
    gt.dataset = copy.deepcopy(dataset)
    gt.logger = logging.getLogger("lvis")
    gt._create_index()
    return gt


def reference(gt, results, iou_type, max_dets):
    with contextlib.redirect_stdout(io.StringIO()):
        return lvis_evaluation._run_lvis_eval(gt, results, iou_type, max_dets, "lvis")


def assert_same(ref, fast):
    """Every summary number (AP ... APf, AR), per-category AP, precision and recall entry."""
    a, b = ref.get_results(), fast.get_results()
    assert list(a) == list(b)
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    ap_ref, ap_fast = per_category_ap(ref), per_category_ap(fast)
    assert list(ap_ref) == list(ap_fast)
    for c in ap_ref:
        if np.isnan(ap_ref[c]):
            assert np.isnan(ap_fast[c]), c
        else:
            assert ap_fast[c] == pytest.approx(ap_ref[c], abs=1e-6), c
    np.testing.assert_allclose(fast.eval["precision"], ref.eval["precision"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(fast.eval["recall"], ref.eval["recall"], rtol=0, atol=1e-9)


# seed, images, categories, detections per image (cap 300 is exceeded at 320), score
# decimals (1: many ties), images x categories per faster-coco-eval call
CASES = [(0, 30, 25, 320, 2, 250_000), (1, 20, 12, 60, 1, 40), (2, 40, 40, 150, 6, 1)]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed,images,cats,dets,decimals,pairs", CASES)
def test_generated_cases_equal_lvis_api(iou_type, seed, images, cats, dets, decimals, pairs):
    gt_dict, results = lvis_eval_speed.make_lvis_case(
        num_images=images, num_categories=cats, dets_per_image=dets, masks=iou_type == "segm",
        score_decimals=decimals, seed=seed)
    gt = lvis_from_dict(gt_dict)
    assert any(not gt.cat_img_map.get(c) for c in gt.get_cat_ids())  # categories without gt
    for max_dets in (300, -1, 25):  # LVIS's cap, AP-fixed's no cap, a cap that bites
        fast = FastLVISEval(gt, results, iou_type, max_dets, pairs_per_group=pairs)
        fast.run()
        assert_same(reference(gt, results, iou_type, max_dets), fast)


def _edge_case():
    """Hand-made corners: a zero-area ground truth (left out by lvis-api, and then its
    category is not positive on that image), an empty-mask and a zero-width detection,
    ties, a crowd flag (lvis-api does not read it), an image without detections, a
    category without ground truth that is listed as negative, results only on unverified
    categories of an image."""
    import pycocotools.mask as mask_utils

    gt = {
        "images": [image(1, neg=[3]), image(2, neg=[1, 3], not_exhaustive=[2]), image(3),
                   image(4, neg=[2])],
        "annotations": [box_ann(1, 1, 1, 10, 10, 30, 30), box_ann(2, 1, 2, 50, 50, 20, 20),
                        box_ann(3, 2, 2, 10, 10, 40, 40), box_ann(4, 3, 1, 5, 5, 20, 20),
                        {**box_ann(5, 3, 2, 60, 60, 10, 10), "area": 0.0},
                        {**box_ann(6, 1, 1, 60, 10, 30, 30), "iscrowd": 1}],
        "categories": [category(1, "a", "f", 200), category(2, "b", "c", 30),
                       category(3, "c", "r", 3)],
    }
    empty = mask_utils.encode(np.zeros((100, 100, 1), dtype=np.uint8, order="F"))[0]
    empty["counts"] = empty["counts"].decode("ascii")
    results = [det(1, 1, 10, 10, 30, 30, 0.9), det(1, 1, 12, 12, 30, 30, 0.9),
               det(1, 3, 10, 10, 30, 30, 0.9), det(1, 2, 50, 50, 20, 20, 0.5),
               det(1, 2, 0, 0, 0, 20, 0.95), det(2, 2, 10, 10, 40, 40, 0.5),
               det(2, 2, 70, 70, 20, 20, 0.9), det(2, 1, 70, 70, 20, 20, 0.9),
               det(3, 2, 60, 60, 10, 10, 0.99), det(3, 1, 5, 5, 20, 20, 0.3),
               det(3, 3, 5, 5, 20, 20, 0.3)]
    for r in results:
        x, y, w, h = r["bbox"]
        rle = mask_utils.merge(mask_utils.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]],
                                                      100, 100))
        rle["counts"] = rle["counts"].decode("ascii")
        r["segmentation"] = rle
    results.append({**det(2, 2, 1, 1, 5, 5, 0.97), "segmentation": empty})
    return gt, results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_edge_cases_equal_lvis_api(iou_type):
    gt_dict, results = _edge_case()
    gt = lvis_from_dict(gt_dict)
    for max_dets in (300, -1, 2):
        fast = FastLVISEval(gt, results, iou_type, max_dets)
        fast.run()
        assert_same(reference(gt, results, iou_type, max_dets), fast)


def limit_dets_per_image(results, max_dets):
    """lvis-api's rule, written out: per image (in order of first appearance), the
    `max_dets` best by a stable descending sort of the score."""
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    out = []
    for anns in by_image.values():
        if 0 <= max_dets < len(anns):
            anns = sorted(anns, key=lambda a: a["score"], reverse=True)[:max_dets]
        out.extend(anns)
    return out


def test_per_image_cap_is_lvis_results():
    """Top-scored results per image over all categories; ties keep their order."""
    results = [det(1, 1, 0, 0, 5, 5, s) for s in (0.2, 0.9, 0.5)] + \
        [det(2, c, 0, 0, 5, 5, 0.7, tag=c) for c in (1, 2, 3)] + [det(1, 2, 0, 0, 5, 5, 0.9)]
    arrays = DetectionArrays.from_dicts(results)
    capped = [results[i] for i in arrays.per_image_cap(2)]
    assert sorted((r["image_id"], r["category_id"], r["score"]) for r in capped) == \
        [(1, 1, 0.9), (1, 2, 0.9), (2, 1, 0.7), (2, 2, 0.7)]
    assert len(arrays.per_image_cap(-1)) == len(results)
    # random lists with many ties: the same detections as the rule above, for several caps
    rng = np.random.default_rng(0)
    results = [det(int(i), int(c), 0, 0, 5, 5, float(s), tag=k) for k, (i, c, s) in enumerate(
        zip(rng.integers(1, 9, 400), rng.integers(1, 4, 400), rng.integers(0, 5, 400) / 4))]
    arrays = DetectionArrays.from_dicts(results)
    for cap in (0, 1, 7, 60, -1):
        expected = sorted(id(r) for r in limit_dets_per_image(results, cap))
        assert sorted(id(results[i]) for i in arrays.per_image_cap(cap)) == expected, cap


def test_ignore_flag_falls_back_to_lvis_api(tmp_path, caplog):
    gt, results, _, _ = per_category_case()
    gt["annotations"][0]["ignore"] = 1
    lvis_gt = lvis_from_dict(gt)
    with caplog.at_level(logging.WARNING, logger=lvis_evaluation.__name__):
        ev = lvis_evaluation._run_lvis_eval(lvis_gt, results, "bbox", 300, "fast")
    assert not isinstance(ev, FastLVISEval) and "ignore" in caplog.text
    with pytest.raises(ValueError):
        FastLVISEval(lvis_gt, results, "bbox")


@pytest.mark.parametrize("backend", ["fast", "lvis"])
def test_config_switch_selects_the_backend(backend, tmp_path, monkeypatch):
    gt, results, expected_ap, _ = per_category_case()
    gt_path = write_json(tmp_path / "gt.json", gt)
    name = test_evaluation.register(f"eqltest_fast_{backend}_{os.getpid()}_{tmp_path.name}", gt_path)
    cfg = get_eql_cfg()
    assert cfg.TEST.EVAL.BACKEND == "fast"
    cfg.TEST.EVAL.BACKEND = backend
    evaluator = build_evaluator(cfg, name, str(tmp_path / "out"))
    assert evaluator._backend == backend

    used = []
    run = lvis_evaluation._run_lvis_eval

    def spy(*args):
        ev = run(*args)
        used.append(type(ev).__name__)
        return ev

    monkeypatch.setattr(lvis_evaluation, "_run_lvis_eval", spy)
    evaluator._results = {}
    evaluator._eval_predictions(DetectionArrays.from_dicts(
        [{**r, "category_id": r["category_id"] - 1} for r in results]))
    assert used == [{"fast": "FastLVISEval", "lvis": "LVISEval"}[backend]]
    assert evaluator._results["bbox"]["AP"] == pytest.approx((100 + expected_ap[2]) / 3, abs=1e-4)
    out = evaluate_lvis(lvis_from_dict(gt), results, ("bbox",), backend=backend)
    assert out["bbox"]["AP"] == pytest.approx(evaluator._results["bbox"]["AP"], abs=1e-9)


def test_unknown_backend_is_refused(tmp_path):
    gt, _, _, _ = per_category_case()
    cfg = get_eql_cfg()
    cfg.TEST.EVAL.BACKEND = "pycocotools"
    name = test_evaluation.register(f"eqltest_fast_bad_{os.getpid()}",
                                    write_json(tmp_path / "gt.json", gt))
    with pytest.raises(ValueError, match="backend"):
        build_evaluator(cfg, name, str(tmp_path / "out"))


# ---------------------------------------------- the evaluation tests with backend "lvis"


@pytest.fixture(autouse=True)
def _lvis_backend_for_imported_tests(request, monkeypatch):
    if request.function.__module__ not in (test_evaluation.__name__, test_federated_eval.__name__):
        return
    run = lvis_evaluation._run_lvis_eval

    def lvis_only(lvis_gt, results, iou_type, max_dets, backend="lvis", index=None):
        ev = run(lvis_gt, results, iou_type, max_dets, "lvis", index)
        assert not isinstance(ev, FastLVISEval)
        return ev

    monkeypatch.setattr(lvis_evaluation, "_run_lvis_eval", lvis_only)


for _module in (test_evaluation, test_federated_eval):
    for _name in dir(_module):
        if _name.startswith("test_"):
            globals()[f"{_name}__lvis_backend"] = getattr(_module, _name)
