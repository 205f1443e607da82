import hashlib
import json
import os

import pytest
from lvis import LVIS

from eql_d2.data import synthetic
from eql_d2.data.synthetic import SyntheticLTSpec, frequency_group

from conftest import SMALL_SPEC


def _tree_digest(root):
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _load(root, split):
    with open(os.path.join(root, f"lvis_v1_{split}.json")) as f:
        return json.load(f)


def test_same_seed_same_bytes_other_seed_differs(small_synthetic, tmp_path):
    again = synthetic.generate(str(tmp_path / "again"), SyntheticLTSpec(**SMALL_SPEC))
    assert _tree_digest(again) == _tree_digest(small_synthetic)
    other = synthetic.generate(str(tmp_path / "other"), SyntheticLTSpec(**{**SMALL_SPEC, "seed": 4}))
    assert _tree_digest(other) != _tree_digest(small_synthetic)


def test_json_loads_in_lvis_api(small_synthetic):
    for split in ("train", "val"):
        api = LVIS(os.path.join(small_synthetic, f"lvis_v1_{split}.json"))
        assert len(api.cats) == SMALL_SPEC["num_categories"]
        assert len(api.imgs) > 0 and len(api.anns) > 0
        for img in api.imgs.values():
            assert os.path.isfile(os.path.join(small_synthetic, img["file_name"]))
            for key in ("neg_category_ids", "not_exhaustive_category_ids", "height", "width"):
                assert key in img


def test_frequency_groups_follow_lvis_thresholds(small_synthetic):
    data = _load(small_synthetic, "train")
    images_of = {}
    instances = {}
    for a in data["annotations"]:
        images_of.setdefault(a["category_id"], set()).add(a["image_id"])
        instances[a["category_id"]] = instances.get(a["category_id"], 0) + 1
    groups = {"r": 0, "c": 0, "f": 0}
    for c in data["categories"]:
        n = len(images_of[c["id"]])
        assert c["image_count"] == n
        assert c["instance_count"] == instances[c["id"]]
        expected = "r" if n <= 10 else ("c" if n <= 100 else "f")
        assert c["frequency"] == expected == frequency_group(n)
        groups[c["frequency"]] += 1
    assert groups == {"r": 2, "c": 3, "f": 3}
    ids = sorted(c["id"] for c in data["categories"])
    assert ids == list(range(1, len(ids) + 1))


def test_default_spec_has_lvis_proportions():
    counts = synthetic.train_image_counts(SyntheticLTSpec())
    groups = [frequency_group(n) for n in counts]
    n = len(groups)
    # LVIS v1: 28% rare, 38% common, 34% frequent
    assert abs(groups.count("r") / n - 337 / 1203) < 0.03
    assert abs(groups.count("c") / n - 461 / 1203) < 0.03
    assert abs(groups.count("f") / n - 405 / 1203) < 0.03
    assert counts == sorted(counts, reverse=True)
    assert min(counts) == 1 and max(counts) == SyntheticLTSpec().max_frequent_images
    assert len(synthetic.category_table(1203)) == len(set(synthetic.category_table(1203))) == 1203


def test_federated_fields_and_val_coverage(small_synthetic):
    train = _load(small_synthetic, "train")
    present = {}
    for a in train["annotations"]:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    n_neg = n_not_exhaustive = 0
    for img in train["images"]:
        assert not set(img["neg_category_ids"]) & present[img["id"]]
        assert set(img["not_exhaustive_category_ids"]) <= present[img["id"]]
        n_neg += bool(img["neg_category_ids"])
        n_not_exhaustive += bool(img["not_exhaustive_category_ids"])
    assert n_neg > 0 and n_not_exhaustive > 0

    val = _load(small_synthetic, "val")
    per_cat = {}
    for a in val["annotations"]:
        per_cat[a["category_id"]] = per_cat.get(a["category_id"], 0) + 1
    assert set(per_cat) == {c["id"] for c in val["categories"]}
    assert min(per_cat.values()) >= SMALL_SPEC["val_instances"]


def test_annotations_match_pixels(small_synthetic):
    """Boxes and areas describe the drawn polygons."""
    data = _load(small_synthetic, "train")
    for a in data["annotations"][:200]:
        xs = a["segmentation"][0][0::2]
        ys = a["segmentation"][0][1::2]
        x, y, w, h = a["bbox"]
        assert min(xs) == pytest.approx(x, abs=0.02) and max(xs) == pytest.approx(x + w, abs=0.02)
        assert min(ys) == pytest.approx(y, abs=0.02) and max(ys) == pytest.approx(y + h, abs=0.02)
        assert 0 < a["area"] <= (w + 2) * (h + 2)


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="num_categories"):
        SyntheticLTSpec(num_categories=2).validate()
    with pytest.raises(ValueError, match="max_frequent_images"):
        SyntheticLTSpec(max_frequent_images=50).validate()
