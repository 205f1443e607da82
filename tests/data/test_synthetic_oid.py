"""Synthetic-OID: challenge files that load with the Open Images loader, a hierarchy with
parents, group-of boxes over several instances, verified labels consistent with the boxes;
deterministic; generated once."""

import csv
import json
import os

import pytest

from eql_d2.data import openimages, synthetic_oid
from eql_d2.data.synthetic_oid import SyntheticOIDSpec, ensure_synthetic_oid

SPEC = SyntheticOIDSpec(num_leaves=12, num_parents=3, image_size=64, max_frequent_images=110,
                        val_instances=2, group_of_prob=0.6, parent_label_prob=0.2, seed=3)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return ensure_synthetic_oid(str(tmp_path_factory.mktemp("soid") / "synthetic_oid"), SPEC)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_classes_and_hierarchy(root):
    files = openimages.builtin_openimages_files(root, "train")
    mids, names = openimages.read_class_descriptions(files["classes_csv"])
    assert len(mids) == 15 and names[:3] == ["circle", "square", "triangle"]
    parents = openimages.read_class_parents(files["hierarchy_json"], mids)
    # leaves of the first three shapes sit under their shape; the others are roots
    for k, name in enumerate(names[3:], 3):
        shape = name.rsplit("_", 1)[1]
        assert parents[k] == ([names.index(shape)] if shape in names[:3] else [])
    assert parents[:3] == [[], [], []]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_boxes_labels_and_group_of(root, split):
    files = openimages.builtin_openimages_files(root, split)
    folder = os.path.join(root, "train" if split == "train" else "val")
    dicts = openimages.load_oid_csv(files["bbox_csv"], files["labels_csv"], files["classes_csv"],
                                    folder, ".png")
    with open(os.path.join(root, f"lvis_v1_{'train' if split == 'train' else 'val'}.json")) as f:
        base = json.load(f)
    assert len(dicts) == len(base["images"])
    anns = [a for d in dicts for a in d["annotations"]]
    group_of = [a for a in anns if a["is_group_of"]]
    assert group_of and len(group_of) < len(anns)
    coarse = [a for a in anns if a["category_id"] < SPEC.num_parents]
    if split == "train":
        assert coarse  # leaf instances labelled with their parent
    base_instances = {}
    for a in base["annotations"]:
        key = (a["image_id"], a["category_id"] - 1 + SPEC.num_parents)
        base_instances[key] = base_instances.get(key, 0) + 1
    for d in dicts:
        boxed = {a["category_id"] for a in d["annotations"]}
        pos = {c - 1 for c in d["pos_category_ids"]}
        neg = {c - 1 for c in d["neg_category_ids"]}
        assert pos == boxed and not (neg & boxed) and d["not_exhaustive_category_ids"] == []
        for a in d["annotations"]:
            if a["is_group_of"]:  # a union over 2+ instances of one leaf class
                assert base_instances[(int(d["oid_image_id"]), a["category_id"])] >= 2
    # verified negatives of a parent: none of its leaves on the image
    mids, _ = openimages.read_class_descriptions(files["classes_csv"])
    parents = openimages.read_class_parents(files["hierarchy_json"], mids)
    for d in dicts:
        boxed = {a["category_id"] for a in d["annotations"]}
        for q in (c - 1 for c in d["neg_category_ids"] if c <= SPEC.num_parents):
            assert not any(q in parents[c] for c in boxed)


def test_deterministic_and_generated_once(root, tmp_path, monkeypatch):
    files = openimages.builtin_openimages_files(root, "validation")
    with open(files["bbox_csv"], "rb") as f:
        first = f.read()
    calls = []
    monkeypatch.setattr(synthetic_oid, "generate", lambda *a, **kw: calls.append(a))
    assert ensure_synthetic_oid(root, SPEC) == root and not calls
    assert ensure_synthetic_oid(root) == root and not calls  # the recorded spec
    monkeypatch.undo()
    again = synthetic_oid.generate(str(tmp_path / "again"), SPEC)
    with open(openimages.builtin_openimages_files(again, "validation")["bbox_csv"], "rb") as f:
        assert f.read() == first


def test_registered_names_build_the_oid_evaluator(root, monkeypatch, tmp_path):
    from detectron2.data import DatasetCatalog

    from eql_d2.config import get_eql_cfg
    from eql_d2.evaluation import OIDEvaluator, build_evaluator

    monkeypatch.setenv("EQL_D2_CACHE_DIR", str(tmp_path / "cache"))
    for name in openimages.SYNTHETIC_OID_SPLITS:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
    openimages.register_synthetic_oid(root)
    cfg = get_eql_cfg(os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                   "Synthetic-OID", "EQL", "faster_rcnn_R18_FPN_eql.yaml"))
    evaluator = build_evaluator(cfg, "synthetic_oid_val", str(tmp_path))
    assert isinstance(evaluator, OIDEvaluator)
    # the groups come from the train split's image counts, read from its files on first use
    counts = evaluator._train_counts()
    assert len(counts) == 15 and counts.sum() > 0
    assert len(DatasetCatalog.get("synthetic_oid_val")) > 0
