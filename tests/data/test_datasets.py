import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from eql_d2.data import (datasets, load_category_metadata, load_lvis_format, register_all,
                         register_lvis_format)


@pytest.fixture
def builtin_datasets():
    """The built-in dataset names, registered as train_net.py registers them."""
    register_all()


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


# ------------------------------------------------------------ one parse per process, cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("EQL_D2_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def count_parses(monkeypatch):
    """Counts full parses of each annotation file (the module's one json.load site)."""
    counts = {}
    real = datasets._read_json

    def counting(json_file):
        counts[json_file] = counts.get(json_file, 0) + 1
        return real(json_file)

    monkeypatch.setattr(datasets, "_read_json", counting)
    return counts


def _fresh_registration(name, json_file, image_root):
    """What a new process starts from: the registration only, no metadata computed yet."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    register_lvis_format(name, json_file, image_root)


def test_each_process_parses_the_json_once(small_synthetic, tmp_path, cache_dir, count_parses):
    """train_net's order: metadata (prepare_datasets), then the dicts (the train loader)."""
    json_file = str(tmp_path / "train.json")
    shutil.copy(os.path.join(small_synthetic, "lvis_v1_train.json"), json_file)
    name = "test_one_parse"

    # local rank 0, first run: parses for the metadata and writes the cache, then the dicts
    _fresh_registration(name, json_file, small_synthetic)
    meta = load_category_metadata(name)
    assert count_parses == {json_file: 1}
    assert os.path.isfile(datasets.metadata_cache_file(json_file))
    assert str(cache_dir) in datasets.metadata_cache_file(json_file)
    first = DatasetCatalog.get(name)
    assert count_parses == {json_file: 2}
    want = dict(meta.as_dict())

    # any other process (or a later run): metadata from the cache, one parse for the dicts
    for _ in range(2):
        count_parses.clear()
        _fresh_registration(name, json_file, small_synthetic)
        meta = load_category_metadata(name)
        assert count_parses == {}
        assert meta.as_dict() == want
        assert DatasetCatalog.get(name) == first
        assert count_parses == {json_file: 1}

    # loading the dicts alone sets the metadata from the same single parse
    count_parses.clear()
    _fresh_registration(name, json_file, small_synthetic)
    assert DatasetCatalog.get(name) == first
    assert count_parses == {json_file: 1}
    assert MetadataCatalog.get(name).as_dict() == want


def test_dicts_equal_detectron2_loader(small_synthetic, cache_dir):
    """Reference: detectron2's load_lvis_json on the same (clean) file."""
    from detectron2.data.datasets.lvis import load_lvis_json

    json_file = os.path.join(small_synthetic, "lvis_v1_val.json")
    ours = load_lvis_format(json_file, small_synthetic)
    assert ours == load_lvis_json(json_file, small_synthetic + os.sep)


def test_cache_follows_the_file(small_synthetic, tmp_path, cache_dir, count_parses):
    json_file = str(tmp_path / "train.json")
    shutil.copy(os.path.join(small_synthetic, "lvis_v1_train.json"), json_file)
    name = "test_cache_follows"
    _fresh_registration(name, json_file, small_synthetic)
    load_category_metadata(name)

    # the file is rewritten with other counts: the cache no longer matches it
    with open(json_file) as f:
        data = json.load(f)
    for c in data["categories"]:
        c["image_count"] += 1
    with open(json_file, "w") as f:
        json.dump(data, f)
    count_parses.clear()
    _fresh_registration(name, json_file, small_synthetic)
    meta = load_category_metadata(name)
    assert count_parses == {json_file: 1}
    assert [e["image_count"] for e in meta.class_image_count] == [c["image_count"] for c in data["categories"]]


def test_stale_cache_is_caught_when_the_dicts_load(small_synthetic, tmp_path, cache_dir):
    """A cache entry whose key matches but whose counts do not (file rewritten in place with
    the same size and time) is caught by the check against the parse of the dicts."""
    json_file = str(tmp_path / "train.json")
    shutil.copy(os.path.join(small_synthetic, "lvis_v1_train.json"), json_file)
    name = "test_stale_cache"
    _fresh_registration(name, json_file, small_synthetic)
    load_category_metadata(name)
    cache = datasets.metadata_cache_file(json_file)
    with open(cache) as f:
        entry = json.load(f)
    entry["metadata"]["class_image_count"][0]["image_count"] += 5
    with open(cache, "w") as f:
        json.dump(entry, f)

    _fresh_registration(name, json_file, small_synthetic)
    load_category_metadata(name)
    with pytest.raises(ValueError, match=f"train.json: .*differ.*{os.path.basename(cache)}.*delete it"):
        DatasetCatalog.get(name)


def test_unwritable_cache_folder_only_costs_a_parse(small_synthetic, tmp_path, monkeypatch, caplog,
                                                    count_parses):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("EQL_D2_CACHE_DIR", str(blocker / "cache"))
    json_file = os.path.join(small_synthetic, "lvis_v1_val.json")
    name = "test_unwritable_cache"
    for _ in range(2):
        _fresh_registration(name, json_file, small_synthetic)
        with caplog.at_level("WARNING"):
            meta = load_category_metadata(name)
        assert len(meta.thing_classes) == 8
    assert count_parses == {json_file: 2}
    assert any("EQL_D2_CACHE_DIR" in r.getMessage() for r in caplog.records)


def test_importing_registers_nothing_and_register_all_does_it_once():
    """Importing eql_d2 leaves detectron2's catalogs (and numpy) as they were;
    register_all() adds the built-in names and may be called again."""
    script = """
import numpy as np
from detectron2.data import DatasetCatalog
before = DatasetCatalog["lvis_v1_val"]
import eql_d2.data, eql_d2.engine, eql_d2.evaluation, eql_d2.modeling
assert not [n for n in DatasetCatalog.list() if n.startswith("synthetic_")]
assert DatasetCatalog["lvis_v1_val"] is before
assert not hasattr(np, "float")
eql_d2.data.register_all()
eql_d2.data.register_all()
names = set(DatasetCatalog.list())
for preset in ("synthetic_lt", "synthetic_lvis", "synthetic_lvis_balanced"):
    assert {f"{preset}_{s}" for s in ("train", "val", "val_fed")} <= names, preset
assert DatasetCatalog["lvis_v1_val"].__module__ == "eql_d2.data.datasets"
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_builtin_lvis_split_uses_the_checked_loader(tmp_path, monkeypatch, cache_dir,
                                                    builtin_datasets):
    """detectron2 registers lvis_v1_val with paths relative to DETECTRON2_DATASETS (default
    ``datasets/``); eql_d2 re-registers it so that its JSON goes through load_lvis_format:
    a polygon detectron2's loader would assert on is skipped, and detectron2's name table
    (first synonyms: "horned_cow" for LVIS's "bull") is accepted."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    name = "lvis_v1_val"
    meta = MetadataCatalog.get(name)
    json_rel, root_rel = meta.json_file, meta.image_root
    if os.path.isabs(json_rel):
        pytest.skip("DETECTRON2_DATASETS is absolute here; the test writes a fake LVIS under cwd")
    monkeypatch.chdir(tmp_path)
    os.makedirs(os.path.dirname(json_rel))
    cats = [{k: c[k] for k in ("id", "name", "synonyms", "frequency")} | {"image_count": 1}
            for c in LVIS_CATEGORIES]
    poly = [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0]]
    data = {
        "images": [{"id": 5, "width": 20, "height": 20, "coco_url": "http://x/val2017/5.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 162, "bbox": [1.0, 1.0, 8.0, 8.0], "segmentation": poly},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [1.0, 1.0, 8.0, 8.0], "segmentation": [[1.0, 2.0]]},
        ],
        "categories": cats,
    }
    with open(json_rel, "w") as f:
        json.dump(data, f)
    saved = {k: v for k, v in meta.as_dict().items() if k != "name"}
    try:
        dicts = DatasetCatalog.get(name)
        assert [(a["category_id"], a["segmentation"]) for a in dicts[0]["annotations"]] == [(161, poly)]
        assert dicts[0]["file_name"] == os.path.join(root_rel + "val2017", "5.jpg")
        meta = MetadataCatalog.get(name)
        # detectron2's count table disagrees with this file's, so the JSON's entry replaced it
        assert meta.thing_classes[161] == "bull"
        assert meta.class_image_count == [{"id": c["id"], "image_count": 1} for c in cats]
        assert meta.class_frequency == [c["frequency"] for c in cats]
    finally:
        MetadataCatalog.remove(name)
        MetadataCatalog.get(name).set(**saved)


# ------------------------------------------------------------ synthetic_lvis_balanced

BALANCED_SPLITS = {"synthetic_lvis_balanced_train": "train", "synthetic_lvis_balanced_val": "val",
                   "synthetic_lvis_balanced_val_fed": "val_fed"}


def test_synthetic_preset_roots(tmp_path, monkeypatch):
    for var in datasets.SYNTHETIC_PRESET_ROOT_VARS.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2"))
    assert datasets.synthetic_preset_root("synthetic_lvis_balanced") == str(
        tmp_path / "d2" / "synthetic_lvis_balanced")
    assert datasets.synthetic_lvis_root() == str(tmp_path / "d2" / "synthetic_lvis")
    monkeypatch.setenv("EQL_D2_SYNTHETIC_LVIS_BALANCED_ROOT", str(tmp_path / "b"))
    assert datasets.synthetic_preset_root("synthetic_lvis_balanced") == str(tmp_path / "b")
    assert datasets.synthetic_lvis_root() == str(tmp_path / "d2" / "synthetic_lvis")


def test_balanced_names_resolve_and_generate_on_first_use(tmp_path, monkeypatch, cache_dir,
                                                         builtin_datasets):
    """The balanced preset's names are registered by register_all as synthetic_lvis's are;
    with its root set they generate the preset there on first use (a scaled-down one here),
    and its category metadata, one LVIS group only, serves the per-group statistics."""
    import torch
    from detectron2.utils.events import EventStorage

    from eql_d2.data import synthetic
    from eql_d2.modeling.category_frequency import frequency_groups
    from eql_d2.modeling.stats_logging import put_group_means

    for name, split in {**BALANCED_SPLITS, **{f"synthetic_lvis_{s}": s for s in
                                              ("train", "val", "val_fed")}}.items():
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "lvis"
        assert meta.json_file == os.path.join(meta.image_root, f"lvis_v1_{split}.json")
    assert MetadataCatalog.get("synthetic_lvis_balanced_train").image_root == (
        datasets.synthetic_preset_root("synthetic_lvis_balanced"))

    small = replace(synthetic.PRESETS["synthetic_lvis_balanced"], num_categories=6,
                    image_size=64, val_instances=1, train_images_per_category=12)
    monkeypatch.setitem(synthetic.PRESETS, "synthetic_lvis_balanced", small)
    root = str(tmp_path / "balanced")
    monkeypatch.setenv("EQL_D2_SYNTHETIC_LVIS_BALANCED_ROOT", root)
    saved = {name: (DatasetCatalog[name], {k: v for k, v in MetadataCatalog.get(name).as_dict().items()
                                           if k != "name"}) for name in BALANCED_SPLITS}
    try:
        for name in BALANCED_SPLITS:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        datasets.register_synthetic_presets(("synthetic_lvis_balanced",))
        meta = load_category_metadata("synthetic_lvis_balanced_train")
        assert synthetic.spec_of(root) == small
        assert meta.class_frequency == ["c"] * 6
        assert [e["image_count"] for e in meta.class_image_count] == [12] * 6
        assert meta.num_train_images == synthetic.num_train_images(small)
        assert len(DatasetCatalog.get("synthetic_lvis_balanced_train")) == meta.num_train_images
        val_fed = DatasetCatalog.get("synthetic_lvis_balanced_val_fed")
        assert val_fed and all(d["file_name"].startswith(root) for d in val_fed)
        assert len(DatasetCatalog.get("synthetic_lvis_balanced_val")) == len(val_fed)
        # the logged group means skip the empty rare and frequent groups
        groups = frequency_groups("synthetic_lvis_balanced_train", 6)
        with EventStorage(start_iter=0) as storage:
            put_group_means("g", torch.arange(6.0), groups)
            latest = storage.latest()
        assert {k for k in latest if k.startswith("g/")} == {"g/c"} and latest["g/c"][0] == 2.5
    finally:
        for name, (load, meta) in saved.items():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
            DatasetCatalog.register(name, load)
            MetadataCatalog.get(name).set(**meta)
