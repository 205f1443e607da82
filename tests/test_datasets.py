import json
import os
import shutil

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from eql_d2.data import load_category_metadata, load_lvis_format, register_lvis_format


def test_dataset_dicts_carry_lvis_image_labels(small_synthetic):
    register_lvis_format("test_slt_train", os.path.join(small_synthetic, "lvis_v1_train.json"),
                         small_synthetic)
    dicts = DatasetCatalog.get("test_slt_train")
    assert all("neg_category_ids" in d and "not_exhaustive_category_ids" in d for d in dicts)
    assert any(d["neg_category_ids"] for d in dicts)
    assert any(d["not_exhaustive_category_ids"] for d in dicts)
    assert all(os.path.isfile(d["file_name"]) for d in dicts[:20])
    # detectron2 contiguous ids are LVIS ids - 1
    assert {a["category_id"] for d in dicts for a in d["annotations"]} == set(range(8))

    meta = MetadataCatalog.get("test_slt_train")
    assert len(meta.thing_classes) == 8
    assert meta.class_frequency == ["f"] * 3 + ["c"] * 3 + ["r"] * 2
    with open(os.path.join(small_synthetic, "lvis_v1_train.json")) as f:
        cats = json.load(f)["categories"]
    assert [c["image_count"] for c in meta.class_image_count] == [c["image_count"] for c in cats]
    assert meta.num_train_images == len(dicts)


def _copy_with(small_synthetic, tmp_path, edit):
    with open(os.path.join(small_synthetic, "lvis_v1_val.json")) as f:
        data = json.load(f)
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_missing_json_names_the_file(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_lvis_format(missing, str(tmp_path))


def test_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        load_lvis_format(str(bad), str(tmp_path))
    bad.write_text('{"images": [], "categories": []}')
    with pytest.raises(ValueError, match="broken.json.*'annotations'"):
        load_lvis_format(str(bad), str(tmp_path))


def test_non_contiguous_category_ids_are_rejected(small_synthetic, tmp_path):
    def renumber(data):
        data["categories"][-1]["id"] = 42
    path = _copy_with(small_synthetic, tmp_path, renumber)
    with pytest.raises(ValueError, match="bad.json.*contiguous"):
        load_lvis_format(path, small_synthetic)


def test_annotation_with_unknown_category_is_rejected(small_synthetic, tmp_path):
    def corrupt(data):
        data["annotations"][0]["category_id"] = 99
    path = _copy_with(small_synthetic, tmp_path, corrupt)
    with pytest.raises(ValueError, match="bad.json.*category_id 99"):
        load_lvis_format(path, small_synthetic)


def test_synthetic_lt_generated_on_first_use(small_synthetic, tmp_path, monkeypatch):
    """A Synthetic-LT root is used as found; a stale generator version is regenerated."""
    from eql_d2.data import datasets, synthetic

    root = str(tmp_path / "copy")
    shutil.copytree(small_synthetic, root)
    assert datasets.ensure_synthetic_lt(root) == root
    gen = os.path.join(root, "generator.json")
    with open(gen) as f:
        args = json.load(f)
    args["version"] = synthetic.GENERATOR_VERSION - 1
    with open(gen, "w") as f:
        json.dump(args, f)
    before = os.path.getmtime(os.path.join(root, "lvis_v1_train.json"))
    datasets.ensure_synthetic_lt(root)
    with open(gen) as f:
        assert json.load(f)["version"] == synthetic.GENERATOR_VERSION
    assert os.path.getmtime(os.path.join(root, "lvis_v1_train.json")) >= before
    # no temporary folders are left beside it
    assert sorted(os.listdir(tmp_path)) == ["copy"]


def test_json_image_counts_replace_a_disagreeing_registered_table(small_synthetic, caplog):
    """A count table registered beforehand (as detectron2 does for lvis_*) loses to the JSON."""
    json_file = os.path.join(small_synthetic, "lvis_v1_train.json")
    name = "test_slt_train_pre_registered"
    register_lvis_format(name, json_file, small_synthetic)
    with open(json_file) as f:
        cats = json.load(f)["categories"]
    stale = [{"id": c["id"], "image_count": c["image_count"] + 7} for c in cats]
    MetadataCatalog.get(name).set(class_image_count=stale, evaluator_type="lvis")
    with caplog.at_level("WARNING"):
        meta = load_category_metadata(name)
    assert [e["image_count"] for e in meta.class_image_count] == [c["image_count"] for c in cats]
    assert MetadataCatalog.get(name).class_image_count == meta.class_image_count
    assert meta.evaluator_type == "lvis"  # other keys survive the rebuild
    assert meta.json_file == json_file
    assert any(name in r.getMessage() and "8 categories" in r.getMessage() for r in caplog.records)
