"""Unusable annotations are skipped at load time, with one warning naming them."""

import json
import logging
import math

import pytest
from detectron2.data.datasets.lvis import load_lvis_json

from eql_d2.data import datasets, load_lvis_format, read_lvis_categories

GOOD_POLY = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]


def _ann(ann_id, bbox, segmentation=GOOD_POLY, image_id=1, category_id=1):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": 400.0, "segmentation": segmentation}


# id -> annotation; the ids of those that cannot be used are listed in UNUSABLE
ANNOTATIONS = [
    _ann(1, [10.0, 10.0, 20.0, 20.0]),
    _ann(2, [10.0, 10.0, 0.0, 20.0]),                  # zero width
    _ann(3, [10.0, 10.0, 20.0, -5.0]),                 # negative height
    _ann(4, [100.0, 10.0, 20.0, 20.0]),                # starts at the right edge (width 100)
    _ann(5, [90.0, 70.0, 20.0, 20.0], category_id=2),  # partly outside: kept, detectron2 clips it
    _ann(6, [10.0, 10.0, 20.0, 20.0], segmentation=[]),
    _ann(7, [10.0, 10.0, 20.0, 20.0], segmentation=[GOOD_POLY[0], []]),
    _ann(8, [10.0, 10.0, 20.0, 20.0], segmentation=[[1.0, 2.0, 3.0, 4.0]]),         # 2 points
    _ann(9, [10.0, 10.0, 20.0, 20.0], segmentation=[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]),  # odd
    _ann(10, [10.0, float("nan"), 20.0, 20.0]),
    _ann(11, [10.0, -40.0, 20.0, 40.0]),               # ends exactly at the top edge
    _ann(12, [0.0, 0.0, 50.0, 50.0], image_id=2, category_id=2),
    _ann(13, [-20.0, 5.0, 20.0, 10.0], image_id=2),    # ends exactly at the left edge
    _ann(14, [5.0, 80.0, 10.0, 10.0]),                 # starts at the bottom edge (height 80)
]
UNUSABLE = [2, 3, 4, 6, 7, 8, 9, 10, 11, 13, 14]


def _lvis(annotations):
    return {
        "images": [
            {"id": 1, "width": 100, "height": 80, "coco_url": "http://x/train2017/a.jpg",
             "neg_category_ids": [2], "not_exhaustive_category_ids": []},
            {"id": 2, "width": 50, "height": 50, "coco_url": "http://x/train2017/b.jpg"},
        ],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cat_one"}, {"id": 2, "name": "cat_two"}],
    }


def _write(tmp_path, data, name="anns.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))  # writes the NaN box as NaN, which json.load reads back
    return str(path)


def test_unusable_annotations_are_skipped_with_one_warning(tmp_path, caplog):
    path = _write(tmp_path, _lvis(ANNOTATIONS))
    with caplog.at_level(logging.WARNING, logger="eql_d2.data.datasets"):
        dicts = load_lvis_format(path, str(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "anns.json" in warnings[0] and f"skipped {len(UNUSABLE)} of {len(ANNOTATIONS)}" in warnings[0]
    assert str(UNUSABLE[:datasets.SKIPPED_IDS_SHOWN]) in warnings[0]
    for reason in ["box entirely outside the image: 4",  # ids 4, 11, 13, 14
                   "box with non-positive or non-finite size: 3",  # ids 2, 3, 10
                   "empty polygon: 2",  # ids 6, 7
                   "polygon with < 3 points or odd coordinate count: 2"]:  # ids 8, 9
        assert reason in warnings[0]

    kept = {a["id"]: a for a in ANNOTATIONS if a["id"] not in UNUSABLE}
    assert [d["image_id"] for d in dicts] == [1, 2]
    got = [(d["image_id"], a["bbox"], a["category_id"]) for d in dicts for a in d["annotations"]]
    want = [(a["image_id"], a["bbox"], a["category_id"] - 1) for a in kept.values()]
    assert got == want
    assert not any(math.isnan(v) for _, box, _ in got for v in box)


def test_kept_annotations_load_as_detectron2_loads_a_clean_file(tmp_path):
    """Reference: detectron2's own loader on the file with the unusable ids removed by hand."""
    ours = load_lvis_format(_write(tmp_path, _lvis(ANNOTATIONS)), str(tmp_path))
    clean = _write(tmp_path, _lvis([a for a in ANNOTATIONS if a["id"] not in UNUSABLE]), "clean.json")
    theirs = load_lvis_json(clean, str(tmp_path) + "/")
    assert ours == theirs
    assert ours[0]["file_name"] == str(tmp_path / "train2017" / "a.jpg")
    assert ours[0]["neg_category_ids"] == [2] and ours[1]["neg_category_ids"] == []


def test_warning_names_only_the_first_ids(tmp_path, caplog):
    bad = [_ann(100 + i, [10.0, 10.0, -1.0, 5.0]) for i in range(25)]
    path = _write(tmp_path, _lvis(bad + [_ann(1, [1.0, 1.0, 5.0, 5.0])]))
    with caplog.at_level(logging.WARNING, logger="eql_d2.data.datasets"):
        dicts = load_lvis_format(path, str(tmp_path))
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipped 25 of 26" in message
    # the ids listed (the message starts with the file's path, which may hold any number)
    shown = message.split("first ids:")[1]
    assert str(list(range(100, 100 + datasets.SKIPPED_IDS_SHOWN))) in shown
    assert str(100 + datasets.SKIPPED_IDS_SHOWN) not in shown
    assert sum(len(d["annotations"]) for d in dicts) == 1


def test_clean_file_loads_without_warning(tmp_path, caplog):
    path = _write(tmp_path, _lvis([a for a in ANNOTATIONS if a["id"] not in UNUSABLE]))
    with caplog.at_level(logging.WARNING, logger="eql_d2.data.datasets"):
        load_lvis_format(path, str(tmp_path))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_image_counts_come_from_usable_annotations(tmp_path):
    """Without image_count in the categories, only annotations that are kept count."""
    info = read_lvis_categories(_write(tmp_path, _lvis(ANNOTATIONS)))
    # category 1: image 1 (ids 1 and others skipped); image 2's id 13 is skipped
    # category 2: id 5 (image 1) and id 12 (image 2)
    assert info["class_image_count"] == [{"id": 1, "image_count": 1}, {"id": 2, "image_count": 2}]
    assert info["num_train_images"] == 2


@pytest.mark.parametrize("field, value, match", [
    ("segmentation", {"size": [80, 100], "counts": "abc"}, "annotation 1 has segmentation of type dict"),
    ("segmentation", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "annotation 1 has segmentation of type list"),
    ("bbox", [1.0, 2.0, "3", 4.0], "annotation 1 has malformed bbox"),
    ("bbox", [1.0, 2.0, 3.0], "annotation 1 has malformed bbox"),
])
def test_structural_faults_raise_naming_file_and_id(tmp_path, field, value, match):
    ann = _ann(1, [1.0, 1.0, 5.0, 5.0])
    ann[field] = value
    path = _write(tmp_path, _lvis([ann]))
    with pytest.raises(ValueError, match=f"anns.json: {match}"):
        load_lvis_format(path, str(tmp_path))


def test_missing_segmentation_and_duplicate_ids_raise(tmp_path):
    ann = _ann(1, [1.0, 1.0, 5.0, 5.0])
    del ann["segmentation"]
    with pytest.raises(ValueError, match="annotation 1 has segmentation of type NoneType"):
        load_lvis_format(_write(tmp_path, _lvis([ann])), str(tmp_path))
    dup = [_ann(7, [1.0, 1.0, 5.0, 5.0]), _ann(7, [2.0, 2.0, 5.0, 5.0], image_id=2)]
    with pytest.raises(ValueError, match="anns.json: annotation id 7 appears more than once"):
        load_lvis_format(_write(tmp_path, _lvis(dup)), str(tmp_path))
