"""Data checks: images listed twice in a training JSON, images whose size is not their
entry's, and the Synthetic-LT generator's entry point."""

import copy
import itertools
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT

from eql_d2.data import load_lvis_format, read_lvis_categories


def _write_variant(small_synthetic, tmp_path, edit):
    with open(os.path.join(small_synthetic, "lvis_v1_train.json")) as f:
        data = json.load(f)
    edit(data)
    path = str(tmp_path / "train.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def test_two_image_entries_with_one_id_are_an_error(small_synthetic, tmp_path):
    def edit(data):
        other = copy.deepcopy(data["images"][5])
        other["coco_url"] = other["coco_url"].replace(".png", "_b.png")
        data["images"].append(other)  # another file under image 6's id

    path = _write_variant(small_synthetic, tmp_path, edit)
    for read in (read_lvis_categories, lambda p: load_lvis_format(p, small_synthetic)):
        with pytest.raises(ValueError, match=f"{path}: 1 image ids appear in more than one "
                                             r"'images' entry: 6 \(2 entries\)"):
            read(path)


def test_an_image_listed_twice_is_an_error(small_synthetic, tmp_path):
    def edit(data):
        data["images"].append(copy.deepcopy(data["images"][2]))  # the same entry again
        again = copy.deepcopy(data["images"][7])
        again["id"] = 10_000  # the same file under a new id
        data["images"].append(again)

    path = _write_variant(small_synthetic, tmp_path, edit)
    with pytest.raises(ValueError, match=f"{path}: 1 image ids .*: 3 \\(2 entries\\)"):
        read_lvis_categories(path)

    def edit_file_only(data):
        again = copy.deepcopy(data["images"][7])
        again["id"] = 10_000
        data["images"].append(again)

    path = _write_variant(small_synthetic, tmp_path, edit_file_only)
    with pytest.raises(ValueError, match=f"{path}: 1 image files are listed more than once .*"
                                         r"train/000008.png: image ids \[8, 10000\]"):
        read_lvis_categories(path)


def _loader(small_synthetic, dicts, max_failed):
    from detectron2.data import DatasetMapper

    from eql_d2.config import get_eql_cfg
    from eql_d2.data.train_loader import ResumableTrainLoader

    cfg = get_eql_cfg(os.path.join(ROOT, "configs/Synthetic-LT/Base-RCNN-R18-FPN.yaml"),
                      ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"])
    return ResumableTrainLoader(dicts, DatasetMapper(cfg, True), total_batch_size=2, seed=5,
                                max_failed_images=max_failed)


def test_image_of_another_size_than_its_entry_is_replaced(small_synthetic, caplog):
    dicts = load_lvis_format(os.path.join(small_synthetic, "lvis_v1_train.json"),
                             small_synthetic)[:4]
    wrong = dicts[1]
    wrong["width"] += 16  # the file is 64 px wide
    loader = _loader(small_synthetic, dicts, max_failed=20)
    with caplog.at_level(logging.WARNING, logger="eql_d2"):
        batches = list(itertools.islice(iter(loader), 4))  # 8 samples: every image at least once
    ids = {d["image_id"] for batch in batches for d in batch}
    assert wrong["image_id"] not in ids and len(ids) == 3
    assert loader.failed_images and all(f == wrong["file_name"] for f, _ in loader.failed_images)
    warned = [r.getMessage() for r in caplog.records if "replaced by another sample" in r.getMessage()]
    assert warned and wrong["file_name"] in warned[0] and "SizeMismatchError" in warned[0]

    with pytest.raises(RuntimeError, match="(?s)MAX_FAILED_IMAGES = 0.*"
                       + re.escape(wrong["file_name"])):
        list(itertools.islice(iter(_loader(small_synthetic, dicts, max_failed=0)), 4))


@pytest.mark.parametrize("module,option", [("eql_d2.data.synthetic", "--preset"),
                                           ("eql_d2.data.synthetic_oid", "--num-parents")])
def test_generator_runs_as_a_module_without_runpy_warning(module, option):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert option in proc.stdout
    assert "found in sys.modules" not in proc.stderr
