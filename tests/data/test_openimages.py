"""Open Images loading: the challenge CSVs and the COCO-style JSON give the same dataset
dicts; malformed rows are errors naming file and line; image-level labels reach the EQL
masks as LVIS's do; metadata on first access."""

import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from eql_d2.data.image_labels import image_label_masks
from eql_d2.data.openimages import (BBOX_HEADER, LABELS_HEADER, builtin_openimages_files,
                                    convert_to_json, load_oid_csv, load_oid_json, main,
                                    register_openimages)

CLASSES = [("/m/fruit", "Fruit"), ("/m/apple", "Apple"), ("/m/banana", "Banana"), ("/m/car", "Car")]
HIERARCHY = {"LabelName": "/m/0bl9f", "Subcategory": [
    {"LabelName": "/m/fruit",
     "Subcategory": [{"LabelName": "/m/apple"}, {"LabelName": "/m/banana"}]},
    {"LabelName": "/m/car"}]}
SIZES = {"000a": (40, 30), "000b": (20, 50), "000c": (32, 32)}  # ImageID -> (width, height)
BOXES = [  # ImageID, LabelName, XMin, XMax, YMin, YMax, IsGroupOf
    ("000b", "/m/car", "0.1", "0.6", "0.2", "0.9", "1"),
    ("000a", "/m/apple", "0.0", "0.5", "0.25", "0.75", "0"),
    ("000a", "/m/apple", "0.3", "1.0", "0.1", "0.3", "0"),
    ("000b", "/m/banana", "0.05", "0.35", "0.0", "0.5", "0"),
]
LABELS = [  # ImageID, LabelName, Confidence
    ("000a", "/m/apple", "1"), ("000a", "/m/car", "0"), ("000b", "/m/car", "1"),
    ("000b", "/m/fruit", "1"), ("000c", "/m/banana", "0"),
]


def write_csv(path, header, rows):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join(r) + "\n")


def box_rows(rows):
    return [(i, "xclick", label, "1", x0, x1, y0, y1, "0", "0", g, "0", "0")
            for i, label, x0, x1, y0, y1, g in rows]


@pytest.fixture
def oid(tmp_path):
    root = tmp_path / "openimages"
    images = root / "validation"
    images.mkdir(parents=True)
    for image_id, size in SIZES.items():
        Image.new("RGB", size, (90, 120, 40)).save(images / f"{image_id}.jpg")
    files = {"classes_csv": str(root / "classes.csv"), "hierarchy_json": str(root / "h.json"),
             "bbox_csv": str(root / "bbox.csv"), "labels_csv": str(root / "labels.csv")}
    with open(files["classes_csv"], "w") as f:
        f.write("".join(f"{m},{n}\n" for m, n in CLASSES))
    with open(files["hierarchy_json"], "w") as f:
        json.dump(HIERARCHY, f)
    write_csv(files["bbox_csv"], BBOX_HEADER, box_rows(BOXES))
    write_csv(files["labels_csv"], LABELS_HEADER, [(i, "verification", m, c) for i, m, c in LABELS])
    return root, str(images), files


def load_csv(images, files):
    return load_oid_csv(files["bbox_csv"], files["labels_csv"], files["classes_csv"], images)


def test_csv_dicts(oid):
    _, images, files = oid
    dicts = load_csv(images, files)
    assert [d["oid_image_id"] for d in dicts] == ["000a", "000b", "000c"]
    assert [d["image_id"] for d in dicts] == [1, 2, 3]
    a, b, c = dicts
    assert (a["width"], a["height"]) == (40, 30)
    assert a["file_name"] == os.path.join(images, "000a.jpg")
    # XYWH in pixels, file order within the image
    assert [x["bbox"] for x in a["annotations"]] == [
        [0.0, 0.25 * 30, 0.5 * 40, 0.5 * 30],
        [0.3 * 40, 0.1 * 30, (1.0 - 0.3) * 40, (0.3 - 0.1) * 30]]
    assert [x["category_id"] for x in b["annotations"]] == [3, 2]
    assert [x["is_group_of"] for x in b["annotations"]] == [1, 0]
    assert a["pos_category_ids"] == [2] and a["neg_category_ids"] == [4]
    # Fruit is positive on 000b without a Fruit box: present but not boxed
    assert b["pos_category_ids"] == [1, 4] and b["not_exhaustive_category_ids"] == [1]
    assert c["annotations"] == [] and c["neg_category_ids"] == [3]


def test_csv_and_json_forms_give_the_same_dicts(oid, tmp_path):
    root, images, files = oid
    out = str(tmp_path / "val.json")
    from_csv = convert_to_json(files["bbox_csv"], files["labels_csv"], files["classes_csv"],
                               images, out)
    from_json = load_oid_json(out, images)
    assert from_json == from_csv == load_csv(images, files)
    with open(out) as f:
        data = json.load(f)
    assert [c["image_count"] for c in data["categories"]] == [0, 1, 1, 1]
    assert [c["instance_count"] for c in data["categories"]] == [0, 2, 1, 1]
    assert data["annotations"][0]["isgroupof"] == 0 and data["annotations"][2]["isgroupof"] == 1


def test_image_labels_reach_the_eql_masks_as_lvis_do(oid):
    _, images, files = oid
    b = load_csv(images, files)[1]
    verified, not_exhaustive = image_label_masks(b, 4)
    # boxes (Banana, Car) and no verified negatives; Fruit positive without a box
    assert verified.tolist() == [False, False, True, True]
    assert not_exhaustive.tolist() == [True, False, False, False]
    a = load_csv(images, files)[0]
    verified, _ = image_label_masks(a, 4)
    assert verified.tolist() == [False, True, False, True]  # Apple box, Car verified absent


@pytest.mark.parametrize("row, line, message", [
    (("000a", "/m/pear", "0.1", "0.2", "0.1", "0.2", "0"), 4, "unknown class '/m/pear'"),
    (("000a", "/m/apple", "0.1", "1.2", "0.1", "0.2", "0"), 4, "outside \\[0, 1\\]"),
    (("000a", "/m/apple", "0.5", "0.2", "0.1", "0.2", "0"), 4, "min > max"),
    (("000a", "/m/apple", "0.1", "0.2", "0.1", "0.2", "2"), 4, "IsGroupOf must be 0 or 1"),
])
def test_malformed_box_rows_name_file_and_line(oid, row, line, message):
    _, images, files = oid
    write_csv(files["bbox_csv"], BBOX_HEADER, box_rows(BOXES[:2] + [row] + BOXES[2:]))
    with pytest.raises(ValueError, match=f"bbox.csv:{line}: .*{message}"):
        load_csv(images, files)


def test_malformed_label_rows_and_missing_image(oid):
    _, images, files = oid
    write_csv(files["labels_csv"], LABELS_HEADER,
              [(i, "v", m, c) for i, m, c in LABELS] + [("000a", "v", "/m/dog", "1")])
    with pytest.raises(ValueError, match="labels.csv:7: unknown class '/m/dog'"):
        load_csv(images, files)
    write_csv(files["labels_csv"], LABELS_HEADER, [(i, "v", m, c) for i, m, c in LABELS])
    write_csv(files["bbox_csv"], BBOX_HEADER,
              box_rows(BOXES + [("000z", "/m/car", "0.1", "0.2", "0.1", "0.2", "0")]))
    with pytest.raises(FileNotFoundError, match="bbox.csv:6: image not found: .*000z.jpg"):
        load_csv(images, files)
    write_csv(files["bbox_csv"], ["ImageID", "LabelName"], [])
    with pytest.raises(ValueError, match="bbox.csv:1: header"):
        load_csv(images, files)


def test_malformed_json_entries(oid, tmp_path):
    _, images, files = oid
    out = str(tmp_path / "val.json")
    convert_to_json(files["bbox_csv"], files["labels_csv"], files["classes_csv"], images, out)
    with open(out) as f:
        good = json.load(f)

    def load(edit):
        data = json.loads(json.dumps(good))
        edit(data)
        with open(out, "w") as f:
            json.dump(data, f)
        return load_oid_json(out, images)

    with pytest.raises(ValueError, match=r"annotations\[1\] \(id 2\): unknown category_id 9"):
        load(lambda d: d["annotations"][1].update(category_id=9))
    with pytest.raises(ValueError, match=r"annotations\[0\] \(id 1\): box .* outside the image"):
        load(lambda d: d["annotations"][0].update(bbox=[30, 0, 20, 10]))
    with pytest.raises(FileNotFoundError,
                       match=r"images\[2\] \(id 3\): image not found: .*gone.jpg"):
        load(lambda d: d["images"][2].update(file_name="gone.jpg"))


def test_registered_split_metadata_on_first_access(oid, tmp_path, monkeypatch):
    monkeypatch.setenv("EQL_D2_CACHE_DIR", str(tmp_path / "cache"))
    _, images, files = oid
    name = "oid_test_split"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    register_openimages(name, images, files["classes_csv"], files["hierarchy_json"],
                        bbox_csv=files["bbox_csv"], labels_csv=files["labels_csv"])
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "oid"
    assert meta.thing_classes == ["Fruit", "Apple", "Banana", "Car"]
    assert meta.class_parents == [[], [0], [0], []]
    assert [c["image_count"] for c in meta.class_image_count] == [0, 1, 1, 1]
    assert [c["instance_count"] for c in meta.class_instance_count] == [0, 2, 1, 1]
    assert meta.num_train_images == 2 and meta.class_frequency == ["r"] * 4
    assert len(DatasetCatalog.get(name)) == 3
    assert os.listdir(tmp_path / "cache")  # cached for the other processes
    with pytest.raises(AttributeError):
        meta.not_a_key  # noqa: B018


def test_convert_command_writes_the_json_of_the_builtin_layout(oid):
    root, images, files = oid
    builtin = builtin_openimages_files(str(root), "validation")
    os.makedirs(os.path.dirname(builtin["classes_csv"]))
    for key in ("classes_csv", "hierarchy_json", "bbox_csv", "labels_csv"):
        os.rename(files[key], builtin[key])
    main(["convert", "--root", str(root), "--split", "validation"])
    from_json = load_oid_json(builtin["json_file"], images)
    assert from_json == load_oid_csv(builtin["bbox_csv"], builtin["labels_csv"],
                                     builtin["classes_csv"], images)
