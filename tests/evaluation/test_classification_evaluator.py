"""ClassificationEvaluator: top-1 / top-5, mean class accuracy and many / medium / few-shot
accuracy equal a brute-force computation, in one process and gathered from two; per-class
CSV and plot."""

import csv
import math
import os

import pytest
import torch
from detectron2.data import MetadataCatalog

from helpers import run_on_gloo_workers
from eql_d2.evaluation import ClassificationEvaluator
from eql_d2.evaluation.build import build_evaluator
from eql_d2.config import get_eql_cfg

NUM_CLASSES = 12
# train images per class: many (> 100), medium (20-100, both ends), few (< 20)
TRAIN_COUNTS = [500, 101, 100, 60, 20, 19, 5, 1, 150, 30, 2, 7]


def make_case(seed=0, num_images=90):
    g = torch.Generator().manual_seed(seed)
    # class 11 gets no test image
    labels = torch.randint(0, NUM_CLASSES - 1, (num_images,), generator=g)
    scores = torch.rand(num_images, NUM_CLASSES, generator=g)
    # make the true class rank high often enough that top-1 and top-5 hits both happen
    scores[torch.arange(num_images), labels] += torch.rand(num_images, generator=g) * 0.6
    return labels, scores


def brute_force(labels, scores):
    labels, scores = labels.tolist(), scores.tolist()
    ranked = [sorted(range(NUM_CLASSES), key=lambda k: -row[k]) for row in scores]
    hit1 = [r[0] == y for r, y in zip(ranked, labels)]
    hit5 = [y in r[:5] for r, y in zip(ranked, labels)]
    per_class = {}
    for y, h in zip(labels, hit1):
        per_class.setdefault(y, []).append(h)
    acc = {c: 100.0 * sum(v) / len(v) for c, v in per_class.items()}
    groups = {"many": [], "medium": [], "few": []}
    for c, a in acc.items():
        n = TRAIN_COUNTS[c]
        groups["many" if n > 100 else "medium" if n >= 20 else "few"].append(a)
    out = {"top1": 100.0 * sum(hit1) / len(hit1), "top5": 100.0 * sum(hit5) / len(hit5),
           "mean_class_top1": sum(acc.values()) / len(acc)}
    out.update({g: sum(v) / len(v) for g, v in groups.items()})
    return out, acc


def register(name):
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is None:
        meta.set(thing_classes=[f"c{k}" for k in range(NUM_CLASSES)],
                 train_image_counts=TRAIN_COUNTS, evaluator_type="classification")
    return name


def evaluate(evaluator, labels, scores, batch=7):
    evaluator.reset()
    for start in range(0, len(labels), batch):
        inputs = [{"label": int(y)} for y in labels[start:start + batch]]
        outputs = [{"scores": s} for s in scores[start:start + batch]]
        evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def test_metrics_equal_a_brute_force_computation(tmp_path):
    labels, scores = make_case()
    expected, acc = brute_force(labels, scores)
    assert 0 < expected["top1"] < expected["top5"] < 100
    evaluator = build_evaluator(get_eql_cfg(), register("t_cls_eval"), str(tmp_path))
    assert isinstance(evaluator, ClassificationEvaluator)
    got = evaluate(evaluator, labels, scores)["classification"]
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    with open(tmp_path / "per_class_accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [f"c{k}" for k in range(NUM_CLASSES)]
    assert [r["shot"] for r in rows[:8]] == ["many", "many", "medium", "medium", "medium",
                                             "few", "few", "few"]
    for k, r in enumerate(rows):
        if k in acc:
            assert float(r["top1"]) == pytest.approx(acc[k], abs=0.005)
        else:
            assert r["test_images"] == "0" and math.isnan(float(r["top1"]))
    assert os.path.getsize(tmp_path / "accuracy_vs_train_images.png") > 1000


def test_without_train_counts_there_are_no_shot_groups():
    labels, scores = make_case(seed=1)
    evaluator = ClassificationEvaluator(register("t_cls_eval"), None, distributed=False)
    evaluator.train_image_counts = None
    got = evaluate(evaluator, labels, scores)["classification"]
    assert set(got) == {"top1", "top5", "mean_class_top1"}


def _evaluate_share(rows, labels, scores):
    register("t_cls_eval")
    evaluator = ClassificationEvaluator("t_cls_eval", None)
    return evaluate(evaluator, labels[rows], scores[rows], batch=5)


def test_predictions_are_gathered_from_every_process():
    labels, scores = make_case(seed=2, num_images=60)
    expected, _ = brute_force(labels, scores)
    results = run_on_gloo_workers(_evaluate_share, len(labels), labels=labels, scores=scores)
    assert results[1] == {}
    for key, value in expected.items():
        assert results[0]["classification"][key] == pytest.approx(value, abs=1e-9), key
