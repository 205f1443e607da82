"""Open Images Challenge evaluation: hand-computed cases of each rule, and agreement with a
brute-force per-class AP written here on random generated sets."""

import csv
import math
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from eql_d2.evaluation.detections import DetectionArrays
from eql_d2.evaluation.oid_evaluation import (ClassHierarchy, OIDEvaluator, OIDGroundTruth,
                                              evaluate_oid, frequency_groups,
                                              voc_average_precision)

# classes: 0 Fruit, 1 Apple, 2 Banana (Apple and Banana under Fruit), 3 Car
FRUIT, APPLE, BANANA, CAR = range(4)
TREE = ClassHierarchy(4, {APPLE: [FRUIT], BANANA: [FRUIT]})


def box(x0, y0, x1, y1, cls, group_of=False):
    return {"bbox": [x0, y0, x1, y1], "bbox_mode": BoxMode.XYXY_ABS, "category_id": cls,
            "is_group_of": int(group_of)}


def image(image_id, boxes=(), pos=(), neg=()):
    # image-level labels as dataset category ids (class index + 1)
    return {"image_id": image_id, "annotations": list(boxes),
            "pos_category_ids": [c + 1 for c in pos], "neg_category_ids": [c + 1 for c in neg]}


def dets(*rows):
    """rows: (image_id, class, score, x0, y0, x1, y1)."""
    rows = np.array(rows, np.float64).reshape(-1, 7)
    xywh = np.concatenate([rows[:, 3:5], rows[:, 5:7] - rows[:, 3:5]], axis=1)
    return DetectionArrays(rows[:, 0].astype(int), rows[:, 1].astype(int), rows[:, 2], xywh)


def run(dicts, detections, hierarchy=TREE, **kw):
    gt = OIDGroundTruth.from_dataset_dicts(dicts, hierarchy.num_classes, hierarchy)
    return evaluate_oid(gt, detections, hierarchy=hierarchy, **kw)


def test_voc_average_precision_closed_forms():
    assert voc_average_precision(np.array([1.0, 0.5]), np.array([0.5, 0.5])) == 0.5
    # P 1, 1/2, 2/3 at R 1/2, 1/2, 1: envelope 1 then 2/3
    assert voc_average_precision(np.array([1, 0.5, 2 / 3]), np.array([0.5, 0.5, 1.0])) == \
        pytest.approx(0.5 + 0.5 * 2 / 3)
    assert voc_average_precision(np.zeros(0), np.zeros(0)) == 0.0


def test_hierarchy_expansion_counts_a_child_box_for_its_parent():
    dicts = [image(1, [box(0, 0, 10, 10, APPLE)], pos=[APPLE])]
    # a Fruit detection on an apple: the apple box is also a Fruit box
    r = run(dicts, dets((1, FRUIT, 0.9, 0, 0, 10, 10)))
    assert r.ap[FRUIT] == 1.0 and r.num_positives[FRUIT] == 1
    assert r.ap[APPLE] == 0.0 and math.isnan(r.ap[BANANA])
    # an Apple detection: official rule, detections are not expanded; Fruit is missed
    r = run(dicts, dets((1, APPLE, 0.9, 0, 0, 10, 10)))
    assert r.ap[APPLE] == 1.0 and r.ap[FRUIT] == 0.0
    # with expand_detections the Apple detection counts for Fruit too
    r = run(dicts, dets((1, APPLE, 0.9, 0, 0, 10, 10)), expand_detections=True)
    assert r.ap[APPLE] == 1.0 and r.ap[FRUIT] == 1.0
    assert r.mean_ap == 1.0


def test_negative_label_expands_down_and_positive_up():
    gt = OIDGroundTruth.from_dataset_dicts(
        [image(1, pos=[APPLE]), image(2, neg=[FRUIT])], 4, TREE)
    keys = set(gt.label_keys.tolist())
    # image position 0: Apple and its parent Fruit; position 1: Fruit and its children
    assert keys == {0 * 4 + APPLE, 0 * 4 + FRUIT, 4 + FRUIT, 4 + APPLE, 4 + BANANA}


def test_detection_of_an_unverified_class_is_ignored():
    dicts = [image(1, [box(0, 0, 10, 10, BANANA)], pos=[BANANA]),
             image(2, [box(0, 0, 10, 10, CAR)], pos=[CAR])]
    # image 2 says nothing about Banana: its higher-scored Banana detection is ignored
    r = run(dicts, dets((1, BANANA, 0.5, 0, 0, 10, 10), (2, BANANA, 0.9, 20, 20, 30, 30)))
    assert r.ap[BANANA] == 1.0
    assert r.num_detections[BANANA] == 1


def test_false_positive_on_a_verified_negative_counts():
    dicts = [image(1, [box(0, 0, 10, 10, BANANA)], pos=[BANANA]), image(2, neg=[BANANA])]
    r = run(dicts, dets((1, BANANA, 0.5, 0, 0, 10, 10), (2, BANANA, 0.9, 20, 20, 30, 30)))
    # ranked: FP (0.9), TP (0.5): precision 1/2 at recall 1
    assert r.ap[BANANA] == 0.5
    # a negative Fruit label verifies Banana too (expanded down)
    dicts[1] = image(2, neg=[FRUIT])
    r = run(dicts, dets((1, BANANA, 0.5, 0, 0, 10, 10), (2, BANANA, 0.9, 20, 20, 30, 30)))
    assert r.ap[BANANA] == 0.5


def test_detections_inside_one_group_of_box_give_one_true_positive():
    dicts = [image(1, [box(0, 0, 100, 100, CAR, group_of=True), box(200, 200, 220, 220, CAR)],
                   pos=[CAR])]
    inside = [(1, CAR, s, x, x, x + 20, x + 20) for s, x in ((0.9, 5), (0.8, 40), (0.7, 70))]
    r = run(dicts, dets(*inside, (1, CAR, 0.6, 200, 200, 220, 220)))
    # one TP for the group (at 0.9), none of the other two counts, then the plain box
    assert r.num_positives[CAR] == 2
    assert r.ap[CAR] == 1.0
    # had the two others counted as false positives: 0.5 * 1 + 0.5 * 2 / 4
    # the group's score is its best detection's: a FP at 0.5 ranks above a group seen at 0.3
    dicts = [image(1, [box(0, 0, 100, 100, CAR, group_of=True)], pos=[CAR])]
    r = run(dicts, dets((1, CAR, 0.3, 10, 10, 40, 40), (1, CAR, 0.2, 50, 50, 70, 70),
                        (1, CAR, 0.5, 300, 300, 320, 320)))
    assert r.ap[CAR] == 0.5
    # a detection half outside the group box (IoA 0.4) is a false positive
    r = run(dicts, dets((1, CAR, 0.9, 90, 0, 115, 10), (1, CAR, 0.3, 10, 10, 40, 40)))
    assert r.ap[CAR] == 0.5


def test_group_of_weight_zero_ignores_group_boxes():
    dicts = [image(1, [box(0, 0, 100, 100, CAR, group_of=True), box(200, 200, 220, 220, CAR)],
                   pos=[CAR])]
    r = run(dicts, dets((1, CAR, 0.9, 5, 5, 20, 20), (1, CAR, 0.5, 200, 200, 220, 220)),
            group_of_weight=0.0)
    assert r.num_positives[CAR] == 1 and r.ap[CAR] == 1.0


def test_duplicate_detection_of_a_taken_box_is_a_false_positive():
    dicts = [image(1, [box(0, 0, 10, 10, CAR), box(9, 0, 19, 10, CAR)], pos=[CAR])]
    # the second detection's highest IoU is with the first box, already taken: a false
    # positive; the third takes the second box
    r = run(dicts, dets((1, CAR, 0.9, 0, 0, 10, 10), (1, CAR, 0.8, 1, 0, 11, 10),
                        (1, CAR, 0.7, 9, 0, 19, 10)))
    assert r.ap[CAR] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_frequency_groups_and_group_ap_over_a_known_grouping():
    counts = [50, 1, 30, 2, 40, 3, 20, 4, 10, 5]
    groups = frequency_groups(counts, 5)
    # ascending counts: (1, 3), (5, 7), (9, 8), (6, 2), (4, 0)
    assert groups.tolist() == [4, 0, 3, 0, 4, 1, 3, 1, 2, 2]
    # 10 classes, one image each with one box; class k detected with AP 1, or missed (AP 0)
    hier = ClassHierarchy(10)
    detected = [0, 1, 2, 5, 6, 9]
    dicts = [image(k + 1, [box(0, 0, 10, 10, k)], pos=[k]) for k in range(10)]
    r = run(dicts, dets(*[(k + 1, k, 0.9, 0, 0, 10, 10) for k in detected]), hier)
    ap = r.group_ap(groups, 5)
    # groups: {1, 3} -> 0.5, {5, 7} -> 0.5, {9, 8} -> 0.5, {6, 2} -> 1, {4, 0} -> 0.5
    assert ap.tolist() == [0.5, 0.5, 0.5, 1.0, 0.5]
    assert r.mean_ap == 0.6
    # EQL's Tab. 6 order: descending counts, the last group the rarest
    down = frequency_groups(counts, 5, rarest_first=False)
    assert down.tolist() == [0, 4, 1, 4, 0, 3, 1, 3, 2, 2]
    assert r.group_ap(down, 5).tolist() == [0.5, 1.0, 0.5, 0.5, 0.5]


def test_hierarchy_from_oid_json_and_cycles():
    tree = {"LabelName": "/m/root", "Subcategory": [
        {"LabelName": "/m/fruit", "Subcategory": [{"LabelName": "/m/apple"}]},
        {"LabelName": "/m/food", "Subcategory": [{"LabelName": "/m/fruit"}]},
        {"LabelName": "/m/car", "Part": [{"LabelName": "/m/wheel"}]}]}
    index = {"/m/fruit": 0, "/m/apple": 1, "/m/food": 2, "/m/car": 3}
    h = ClassHierarchy.from_oid_json(tree, index)
    assert h.ancestors == [[2], [0, 2], [], []]
    assert h.descendants[2] == [0, 1]
    with pytest.raises(ValueError, match="'/m/pear' of the hierarchy is not a class"):
        ClassHierarchy.from_oid_json({"LabelName": "r", "Subcategory": [{"LabelName": "/m/pear"}]},
                                     index, "h.json")
    with pytest.raises(ValueError, match="own ancestor"):
        ClassHierarchy(2, {0: [1], 1: [0]})


# ------------------------------------------------------------------------ brute force


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _ioa(det, g):
    iw = max(0.0, min(det[2], g[2]) - max(det[0], g[0]))
    ih = max(0.0, min(det[3], g[3]) - max(det[1], g[1]))
    return iw * ih / ((det[2] - det[0]) * (det[3] - det[1]))


def brute_force_ap(images, detections, parents, num_classes, group_of_weight=1.0):
    """Per-class AP by the challenge's rules, one image and one class at a time, in plain
    Python. images: {id: (boxes [(x0, y0, x1, y1, cls, group_of)], pos, neg)};
    detections: [(image, cls, score, x0, y0, x1, y1)]; parents: {cls: [parent]}."""
    def ancestors(c):
        out = set()
        for p in parents.get(c, ()):
            out |= {p} | ancestors(p)
        return out

    def descendants(c):
        return {k for k in range(num_classes) if c in ancestors(k)}

    scored = {k: [] for k in range(num_classes)}  # (score, weight-or-0)
    positives = [0.0] * num_classes
    for img, (boxes, pos, neg) in images.items():
        expanded = [(b[:4], c, b[5]) for b in boxes for c in [b[4], *sorted(ancestors(b[4]))]]
        verified = {c for _, c, _ in expanded}
        for c in pos:
            verified |= {c} | ancestors(c)
        for c in neg:
            verified |= {c} | descendants(c)
        for k in range(num_classes):
            plain = [b for b, c, g in expanded if c == k and not g]
            groups = [b for b, c, g in expanded if c == k and g]
            positives[k] += len(plain) + group_of_weight * len(groups)
            if k not in verified:
                continue
            mine = sorted([d for d in detections if d[0] == img and d[1] == k
                           and d[5] > d[3] and d[6] > d[4]], key=lambda d: -d[2])
            taken, group_best = set(), {}
            for d in mine:
                box_ = d[3:7]
                if plain:
                    ious = [_iou(box_, b) for b in plain]
                    j = ious.index(max(ious))
                    if ious[j] >= 0.5 and j not in taken:
                        taken.add(j)
                        scored[k].append((d[2], 1.0))
                        continue
                if groups:
                    ioas = [_ioa(box_, g) for g in groups]
                    j = ioas.index(max(ioas))
                    if ioas[j] >= 0.5:
                        group_best[j] = max(group_best.get(j, 0.0), d[2])
                        continue
                scored[k].append((d[2], 0.0))
            scored[k] += [(s, group_of_weight) for s in group_best.values() if s > 0]
    aps = []
    for k in range(num_classes):
        if positives[k] == 0:
            aps.append(float("nan"))
            continue
        ranked = sorted(scored[k], key=lambda t: -t[0])
        tp = fp = 0.0
        points = []
        for _, w in ranked:
            tp += w
            fp += w <= 0
            points.append((tp / positives[k], tp / (tp + fp)))
        # area under the precision envelope, summed over the recall steps
        ap, prev_r = 0.0, 0.0
        for i, (r, _) in enumerate(points):
            if r != prev_r:
                ap += (r - prev_r) * max(p for _, p in points[i:])
                prev_r = r
        aps.append(ap)
    return np.array(aps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_brute_force_on_random_sets(seed):
    rng = np.random.default_rng(seed)
    num_classes = 8
    parents = {2: [0], 3: [0], 4: [1], 5: [4], 6: [0, 1]}  # a DAG: 6 under two parents
    hierarchy = ClassHierarchy(num_classes, parents)
    images, dicts, rows = {}, [], []
    for img in range(1, 41):
        boxes = []
        for _ in range(rng.integers(0, 6)):
            x0, y0 = rng.uniform(0, 80, 2)
            w, h = rng.uniform(5, 40, 2)
            boxes.append((x0, y0, x0 + w, y0 + h, int(rng.integers(num_classes)),
                          bool(rng.random() < 0.2)))
        pos = sorted(set(int(c) for c in rng.integers(num_classes, size=rng.integers(0, 3))))
        neg = sorted(set(int(c) for c in rng.integers(num_classes, size=rng.integers(0, 3))))
        images[img] = (boxes, pos, neg)
        dicts.append(image(img, [box(*b[:4], b[4], b[5]) for b in boxes], pos, neg))
        for _ in range(rng.integers(0, 15)):
            if boxes and rng.random() < 0.6:  # near a ground-truth box
                b = boxes[rng.integers(len(boxes))]
                jitter = rng.normal(0, 4, 4)
                x0, y0, x1, y1 = (np.array(b[:4]) + jitter).tolist()
                c = b[4] if rng.random() < 0.7 else int(rng.integers(num_classes))
            else:
                x0, y0 = rng.uniform(0, 80, 2)
                x1, y1 = x0 + rng.uniform(-2, 40), y0 + rng.uniform(2, 40)
                c = int(rng.integers(num_classes))
            rows.append((img, c, float(rng.random()), x0, y0, x1, y1))
    detections = dets(*rows)
    gt = OIDGroundTruth.from_dataset_dicts(dicts, num_classes, hierarchy)
    for weight in (1.0, 0.5):
        got = evaluate_oid(gt, detections, hierarchy=hierarchy, group_of_weight=weight)
        want = brute_force_ap(images, rows, parents, num_classes, weight)
        assert np.array_equal(np.isnan(got.ap), np.isnan(want))
        np.testing.assert_allclose(got.ap[~np.isnan(want)], want[~np.isnan(want)], atol=1e-6)
        assert (~np.isnan(want)).sum() >= 6  # the set exercises most classes


# ------------------------------------------------------------------- DatasetEvaluator


def _register(name, dicts, counts, instances=(1, 1, 1, 1)):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(
        thing_classes=["Fruit", "Apple", "Banana", "Car"], evaluator_type="oid",
        class_parents=[[], [FRUIT], [FRUIT], []],
        class_image_count=[{"id": k + 1, "image_count": n} for k, n in enumerate(counts)],
        class_instance_count=[{"id": k + 1, "instance_count": n} for k, n in enumerate(instances)])


def _instances(rows, size=(100, 100)):
    inst = Instances(size)
    inst.pred_boxes = Boxes(torch.tensor([r[2:] for r in rows], dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    inst.pred_classes = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    return inst


def test_oid_evaluator_metrics_and_outputs(tmp_path):
    dicts = [image(1, [box(0, 0, 10, 10, APPLE)], pos=[APPLE]),
             image(2, [box(0, 0, 50, 50, CAR, group_of=True)], pos=[CAR], neg=[BANANA])]
    _register("oid_eval_test_val", dicts, [40, 10, 5, 20])
    ev = OIDEvaluator("oid_eval_test_val", output_dir=str(tmp_path), num_groups=2,
                      train_dataset_name="not_registered_train")
    ev.reset()
    ev.process([{"image_id": 1}, {"image_id": 2}],
               [{"instances": _instances([(APPLE, 0.9, 0, 0, 10, 10), (FRUIT, 0.8, 0, 0, 10, 10)])},
                {"instances": _instances([(CAR, 0.7, 5, 5, 20, 20), (CAR, 0.6, 25, 25, 40, 40),
                                          (BANANA, 0.5, 60, 60, 70, 70)])}])
    out = ev.evaluate()["bbox"]
    # Fruit 1, Apple 1, Car 1 (one group TP); Banana has no positives (its FP is not scored)
    assert out["AP"] == pytest.approx(100.0)
    # groups by counts [40, 10, 5, 20]: {Banana, Apple} and {Car, Fruit}
    assert out["AP1"] == pytest.approx(100.0) and out["AP2"] == pytest.approx(100.0)
    with open(os.path.join(tmp_path, "per_category_bbox.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["group"] for r in rows] == ["2", "1", "1", "2"]
    assert rows[2]["AP"] == "" and rows[3]["num_positives"] == "1.0"
    assert rows[3]["num_detections"] == "2"
    assert os.path.getsize(os.path.join(tmp_path, "ap_vs_train_images_bbox.png")) > 0


def test_oid_evaluator_unverified_and_missed():
    dicts = [image(1, [box(0, 0, 10, 10, APPLE)], pos=[APPLE]), image(2, pos=[CAR])]
    _register("oid_eval_test_val2", dicts, [40, 10, 5, 20], instances=[1, 90, 5, 20])
    ev = OIDEvaluator("oid_eval_test_val2", num_groups=2)
    ev.reset()
    # the Banana detection on image 1 is unverified there (ignored); Car has no positives
    ev.process([{"image_id": 1}, {"image_id": 2}],
               [{"instances": _instances([(BANANA, 0.9, 0, 0, 10, 10),
                                          (APPLE, 0.3, 0, 0, 10, 10)])},
                {"instances": _instances([(CAR, 0.7, 5, 5, 20, 20)])}])
    out = ev.evaluate()["bbox"]
    # Fruit missed (0), Apple found (1)
    assert out["AP"] == pytest.approx(50.0)
    assert out["AP1"] == pytest.approx(100.0) and out["AP2"] == pytest.approx(0.0)
    # by instances (Fruit 1, Apple 90): Fruit is in the rarer group now
    ev._group_by = "instances"
    out = ev.evaluate()["bbox"]
    assert out["AP1"] == pytest.approx(0.0) and out["AP2"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="group_by 'boxes'"):
        OIDEvaluator("oid_eval_test_val2", group_by="boxes")


def test_matching_in_small_chunks_gives_the_same_ap(monkeypatch):
    from eql_d2.evaluation import oid_evaluation

    whole = oid_evaluation._best_match
    monkeypatch.setattr(oid_evaluation, "_best_match",
                        lambda *a, **kw: whole(*a, **{**kw, "chunk": 7}))
    test_agrees_with_brute_force_on_random_sets(1)


def test_ground_truth_boxes_in_either_mode():
    xyxy = image(1, [box(10, 20, 30, 60, CAR), box(0, 0, 5, 5, APPLE, group_of=True)], pos=[CAR])
    xywh = {**xyxy, "annotations": [
        {**a, "bbox": [a["bbox"][0], a["bbox"][1], a["bbox"][2] - a["bbox"][0],
                       a["bbox"][3] - a["bbox"][1]], "bbox_mode": BoxMode.XYWH_ABS}
        for a in xyxy["annotations"]]}
    a = OIDGroundTruth.from_dataset_dicts([xyxy], 4, TREE)
    b = OIDGroundTruth.from_dataset_dicts([xywh], 4, TREE)
    assert np.array_equal(a.boxes, b.boxes) and a.boxes[0].tolist() == [10, 20, 30, 60]
    # Apple's box also a Fruit box, group-of too
    assert a.box_class.tolist() == [CAR, APPLE, FRUIT]
    assert a.box_group_of.tolist() == [False, True, True]


def _random_case(seed=3, images=24):
    """(dataset dicts, {image_id: Instances}) of a small random Open Images case."""
    rng = np.random.default_rng(seed)
    dicts, per_image = [], {}
    for img in range(1, images + 1):
        boxes = []
        for _ in range(rng.integers(1, 5)):
            x0, y0 = rng.uniform(0, 60, 2)
            boxes.append(box(x0, y0, x0 + rng.uniform(8, 35), y0 + rng.uniform(8, 35),
                             int(rng.integers(4)), bool(rng.random() < 0.2)))
        dicts.append(image(img, boxes, pos=[int(rng.integers(4))], neg=[int(rng.integers(4))]))
        rows = []
        for b in boxes:
            x0, y0, x1, y1 = (np.array(b["bbox"]) + rng.normal(0, 3, 4)).tolist()
            rows.append((b["category_id"] if rng.random() < 0.8 else int(rng.integers(4)),
                         float(rng.random()), x0, y0, x1, y1))
        per_image[img] = _instances(rows)
    return dicts, per_image


def _evaluate_share(rows, name, out_dir):
    dicts, per_image = _random_case()
    _register(name, dicts, [40, 10, 5, 20])
    evaluator = OIDEvaluator(name, distributed=True, output_dir=out_dir, num_groups=2)
    evaluator.reset()
    for image_id in sorted(per_image)[rows]:
        evaluator.process([{"image_id": image_id}], [{"instances": per_image[image_id]}])
    distributed = evaluator.evaluate()
    single = None
    if torch.distributed.get_rank() == 0:
        alone = OIDEvaluator(name, distributed=False, num_groups=2)
        alone.reset()
        for image_id in sorted(per_image):
            alone.process([{"image_id": image_id}], [{"instances": per_image[image_id]}])
        single = alone.evaluate()
    return distributed, single


def test_two_processes_give_the_single_process_numbers(tmp_path):
    from helpers import run_on_gloo_workers

    (distributed, single), (other, _) = run_on_gloo_workers(
        _evaluate_share, 24, name=f"oid_eval_test_dist_{os.getpid()}", out_dir=str(tmp_path))
    assert other == {}
    assert distributed == single and 0 < distributed["bbox"]["AP"] < 100
    assert os.path.isfile(tmp_path / "per_category_bbox.csv")
