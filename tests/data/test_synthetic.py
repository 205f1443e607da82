import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
from lvis import LVIS

from eql_d2.data import synthetic
from eql_d2.data.synthetic import SyntheticLTSpec, frequency_group

from helpers import SMALL_SPEC, load_split, tree_digest


def test_same_seed_same_bytes_other_seed_differs(small_synthetic, tmp_path):
    again = synthetic.generate(str(tmp_path / "again"), SyntheticLTSpec(**SMALL_SPEC))
    assert tree_digest(again) == tree_digest(small_synthetic)
    other = synthetic.generate(str(tmp_path / "other"), SyntheticLTSpec(**{**SMALL_SPEC, "seed": 4}))
    assert tree_digest(other) != tree_digest(small_synthetic)


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
    data = load_split(small_synthetic, "train")
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
    train = load_split(small_synthetic, "train")
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

    val = load_split(small_synthetic, "val")
    per_cat = {}
    for a in val["annotations"]:
        per_cat[a["category_id"]] = per_cat.get(a["category_id"], 0) + 1
    assert set(per_cat) == {c["id"] for c in val["categories"]}
    assert min(per_cat.values()) >= SMALL_SPEC["val_instances"]


def test_annotations_match_pixels(small_synthetic):
    """Boxes and areas describe the drawn polygons."""
    data = load_split(small_synthetic, "train")
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


# ----------------------------------------------------------------------------- federated val


def _present(data):
    present = {img["id"]: set() for img in data["images"]}
    for a in data["annotations"]:
        present[a["image_id"]].add(a["category_id"])
    return present


def _check_federated(val, fed, negatives_per_positive):
    """The federated split follows federated_labels' rule against its exhaustive split."""
    assert [i["id"] for i in fed["images"]] == [i["id"] for i in val["images"]]
    assert fed["categories"] == val["categories"]
    present = _present(val)  # every drawn object: the truth
    fed_present = _present(fed)
    assert fed_present == present  # dropping an instance keeps its category positive
    num_images = len(val["images"])
    neg_count = {c["id"]: 0 for c in val["categories"]}
    for img in fed["images"]:
        neg = img["neg_category_ids"]
        assert neg == sorted(set(neg))
        assert not set(neg) & present[img["id"]], "a negative category is on the image"
        for c in neg:
            neg_count[c] += 1
    for c, n in neg_count.items():
        positives = sum(c in p for p in present.values())
        expected = min(int(negatives_per_positive * positives + 0.5), num_images - positives)
        assert n == expected, f"category {c}: |N_c| {n}, rule gives {expected}"

    # annotations: the exhaustive ones minus one instance of each flagged category
    val_by_id = {a["id"]: a for a in val["annotations"]}
    assert all(val_by_id[a["id"]] == a for a in fed["annotations"])
    kept = {a["id"] for a in fed["annotations"]}
    dropped = {}
    for a in val["annotations"]:
        if a["id"] not in kept:
            dropped.setdefault((a["image_id"], a["category_id"]), []).append(a["id"])
    flagged = {(img["id"], c) for img in fed["images"] for c in img["not_exhaustive_category_ids"]}
    assert set(dropped) == flagged
    for (i, c), ids in dropped.items():
        same = [a["id"] for a in val["annotations"] if (a["image_id"], a["category_id"]) == (i, c)]
        assert ids == [max(same)] and len(same) >= 2
    return flagged


def test_federated_val_follows_its_rule(small_synthetic):
    val = load_split(small_synthetic, "val")
    fed = load_split(small_synthetic, "val_fed")
    # the exhaustive split verifies every absent category and flags nothing
    present = _present(val)
    for img in val["images"]:
        assert set(img["neg_category_ids"]) == set(range(1, 9)) - present[img["id"]]
        assert img["not_exhaustive_category_ids"] == []
    _check_federated(val, fed, SyntheticLTSpec().val_negatives_per_positive)


def test_federated_labels_rule_on_a_larger_split():
    """federated_labels alone, on 120 images x 25 categories (no rendering): sizes, flags,
    determinism, and negatives spread over the absent images rather than fixed ones."""
    gen = np.random.default_rng(0)
    images = [{"id": i, "neg_category_ids": [], "not_exhaustive_category_ids": []}
              for i in range(1, 121)]
    anns = []
    for img in images:
        for c in gen.choice(np.arange(1, 26), size=int(gen.integers(1, 5)), replace=False):
            for _ in range(int(gen.integers(1, 4))):
                anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": int(c)})
    val = {"images": images, "annotations": anns, "categories": [{"id": c} for c in range(1, 26)]}
    out = synthetic.federated_labels(images, anns, 25, 1.5, 0.5, np.random.default_rng(7))
    fed = {"images": out[0], "annotations": out[1], "categories": val["categories"]}
    flagged = _check_federated(val, fed, 1.5)
    assert len(flagged) > 10
    again = synthetic.federated_labels(images, anns, 25, 1.5, 0.5, np.random.default_rng(7))
    assert again == out
    other = synthetic.federated_labels(images, anns, 25, 1.5, 0.5, np.random.default_rng(8))
    assert other[0] != out[0]
    # a category's negatives are a sample of its absent images, not the first ones
    first_neg = [min(i["id"] for i in out[0] if c in i["neg_category_ids"]) for c in range(1, 26)]
    assert len(set(first_neg)) > 5


def test_federated_val_added_to_an_older_folder_is_the_same(small_synthetic, tmp_path):
    root = tmp_path / "old"
    shutil.copytree(small_synthetic, root)
    os.remove(root / "lvis_v1_val_fed.json")
    synthetic.add_federated_val(str(root))
    with open(root / "lvis_v1_val_fed.json", "rb") as a, \
            open(os.path.join(small_synthetic, "lvis_v1_val_fed.json"), "rb") as b:
        assert a.read() == b.read()


# ----------------------------------------------------------------------------- synthetic_lvis


def _small_lvis_spec(**kw):
    """The synthetic_lvis preset scaled down to a few seconds: 24 categories in 8 families of
    3 textures, 64 px."""
    return replace(synthetic.PRESETS["synthetic_lvis"], num_categories=24, shapes=4, colours=2,
                   textures=3, image_size=64, max_frequent_images=110, val_instances=3,
                   max_objects=6, max_categories_per_image=6, mean_categories_per_image=5.0,
                   val_categories_per_image=4, **kw)


@pytest.fixture(scope="module")
def small_lvis(tmp_path_factory):
    return synthetic.generate(str(tmp_path_factory.mktemp("slvis") / "a"), _small_lvis_spec())


def test_synthetic_lvis_same_seed_same_bytes(small_lvis, tmp_path):
    again = synthetic.generate(str(tmp_path / "again"), _small_lvis_spec())
    assert tree_digest(again) == tree_digest(small_lvis)
    # the vocabulary's family order depends on the seed too
    assert synthetic.family_table(_small_lvis_spec()) != synthetic.family_table(_small_lvis_spec(seed=1))


def test_synthetic_lvis_groups_sizes_and_federated_val(small_lvis):
    spec = _small_lvis_spec()
    train = load_split(small_lvis, "train")
    assert len(train["images"]) == synthetic.num_train_images(spec)
    images_of = {}
    for a in train["annotations"]:
        images_of.setdefault(a["category_id"], set()).add(a["image_id"])
    for c in train["categories"]:
        n = len(images_of[c["id"]])
        assert c["image_count"] == n
        assert c["frequency"] == ("r" if n <= 10 else "c" if n <= 100 else "f")
    groups = [c["frequency"] for c in sorted(train["categories"], key=lambda c: c["id"])]
    assert [groups.count(g) for g in "rcf"] == list(synthetic.group_sizes(24)) == [7, 9, 8]
    val = load_split(small_lvis, "val")
    per_cat = {}
    for a in val["annotations"]:
        per_cat[a["category_id"]] = per_cat.get(a["category_id"], 0) + 1
    assert min(per_cat.values()) >= spec.val_instances and len(per_cat) == 24
    _check_federated(val, load_split(small_lvis, "val_fed"), spec.val_negatives_per_positive)
    # the category names carry the family vocabulary
    table = synthetic.family_table(spec)
    names = [c["name"] for c in sorted(train["categories"], key=lambda c: c["id"])]
    assert names == [f"{colour}_{texture}_{shape}" for shape, colour, texture in table]


def test_synthetic_lvis_preset_proportions_and_neighbours():
    spec = synthetic.PRESETS["synthetic_lvis"]
    spec.validate()
    counts = synthetic.train_image_counts(spec)
    groups = [frequency_group(n) for n in counts]
    n = len(groups)
    assert [groups.count(g) for g in "rcf"] == [112, 153, 135]
    for g, lvis in synthetic.LVIS_V1_GROUP_FRACTIONS.items():
        assert abs(groups.count(g) / n - lvis) < 0.005
    assert counts == sorted(counts, reverse=True) and counts[-1] == 1 and counts[0] == 400
    assert synthetic.rfs_threshold(spec) == round(100 / synthetic.num_train_images(spec), 4)

    table = synthetic.family_table(spec)
    assert len(set(table)) == n == spec.shapes * spec.colours * spec.textures
    family_groups = {}
    for (shape, colour, _), g in zip(table, groups):
        family_groups.setdefault((shape, colour), set()).add(g)
    # every family spans the three groups: each rare category has frequent siblings that
    # differ from it by texture only
    assert len(family_groups) == spec.shapes * spec.colours
    assert all(gs == {"r", "c", "f"} for gs in family_groups.values())
    # near neighbours (two attributes of three shared) of every category
    for t in table:
        near = sum(sum(a == b for a, b in zip(t, u)) == 2 for u in table)
        assert near == (spec.shapes - 1) + (spec.colours - 1) + (spec.textures - 1)


def test_new_spec_fields_are_checked():
    with pytest.raises(ValueError, match="num_categories=30: more than shapes x colours"):
        SyntheticLTSpec(num_categories=30, shapes=2, colours=3, textures=4).validate()
    with pytest.raises(ValueError, match="textures=10"):
        SyntheticLTSpec(num_categories=30, shapes=2, colours=3, textures=10).validate()
    with pytest.raises(ValueError, match="mean_categories_per_image=0.5"):
        SyntheticLTSpec(mean_categories_per_image=0.5).validate()
    with pytest.raises(ValueError, match="val_negatives_per_positive"):
        SyntheticLTSpec(val_negatives_per_positive=-1.0).validate()
    with pytest.raises(ValueError, match="under 8 px"):
        SyntheticLTSpec(image_size=64, min_object_size=0.1).validate()


# ----------------------------------------------------------------------------- synthetic_lvis_balanced


def _small_balanced_spec(**kw):
    """_small_lvis_spec with every category on 52 train images: 24 x 52 = 1248 (category,
    image) pairs against the long-tailed curve's 1252, as the full presets' 36,000 / 35,983."""
    return replace(_small_lvis_spec(**kw), train_images_per_category=52)


@pytest.fixture(scope="module")
def small_balanced(tmp_path_factory):
    return synthetic.generate(str(tmp_path_factory.mktemp("sbal") / "a"), _small_balanced_spec())


def test_balanced_every_category_on_the_same_train_images(small_balanced, small_lvis):
    spec = _small_balanced_spec()
    train = load_split(small_balanced, "train")
    images_of = {c["id"]: set() for c in train["categories"]}
    for a in train["annotations"]:
        images_of[a["category_id"]].add(a["image_id"])
    assert {len(s) for s in images_of.values()} == {52}
    assert {c["image_count"] for c in train["categories"]} == {52}
    # 52 is in LVIS's common band, so the rare and frequent groups are empty
    assert {c["frequency"] for c in train["categories"]} == {"c"}
    # about the size of the long-tailed variant at the same scale
    long_tailed = load_split(small_lvis, "train")
    assert len(train["images"]) == synthetic.num_train_images(spec) == 250
    assert abs(len(train["images"]) - len(long_tailed["images"])) <= 0.01 * len(long_tailed["images"])
    assert (abs(len(train["annotations"]) - len(long_tailed["annotations"]))
            <= 0.05 * len(long_tailed["annotations"]))
    # the same vocabulary and val protocol as the long-tailed variant
    names = [c["name"] for c in sorted(train["categories"], key=lambda c: c["id"])]
    assert names == [c["name"] for c in sorted(long_tailed["categories"], key=lambda c: c["id"])]
    val = load_split(small_balanced, "val")
    per_cat = {}
    for a in val["annotations"]:
        per_cat[a["category_id"]] = per_cat.get(a["category_id"], 0) + 1
    assert len(per_cat) == 24 and min(per_cat.values()) >= spec.val_instances
    _check_federated(val, load_split(small_balanced, "val_fed"), spec.val_negatives_per_positive)


def test_balanced_same_seed_same_bytes_and_recorded_spec(small_balanced, tmp_path):
    again = synthetic.generate(str(tmp_path / "again"), _small_balanced_spec())
    assert tree_digest(again) == tree_digest(small_balanced)
    other = synthetic.generate(str(tmp_path / "other"), _small_balanced_spec(seed=1))
    assert tree_digest(other) != tree_digest(small_balanced)
    assert synthetic.spec_of(small_balanced) == _small_balanced_spec()


def test_long_tailed_generator_json_is_unchanged(small_lvis):
    """The new field is recorded only when set, so the long-tailed presets' files keep the
    bytes of generator version 1, and spec_of reads them (and older files) as long-tailed."""
    with open(os.path.join(small_lvis, "generator.json")) as f:
        recorded = json.load(f)
    assert "train_images_per_category" not in recorded
    assert recorded["version"] == synthetic.GENERATOR_VERSION == 1
    assert synthetic.spec_of(small_lvis) == _small_lvis_spec()
    assert not synthetic.spec_of(small_lvis).balanced


def test_balanced_preset_matches_synthetic_lvis():
    lvis = synthetic.PRESETS["synthetic_lvis"]
    spec = synthetic.PRESETS["synthetic_lvis_balanced"]
    spec.validate()
    assert replace(spec, train_images_per_category=0) == lvis
    counts = synthetic.train_image_counts(spec)
    assert counts == [90] * 400
    assert {frequency_group(n) for n in counts} == {"c"}
    lt_pairs = sum(synthetic.train_image_counts(lvis))
    assert abs(sum(counts) - lt_pairs) < 0.001 * lt_pairs
    assert (synthetic.num_train_images(spec), synthetic.num_train_images(lvis)) == (8000, 7997)


def test_balanced_spec_is_checked():
    with pytest.raises(ValueError, match="train_images_per_category=-1"):
        SyntheticLTSpec(train_images_per_category=-1).validate()
    # max_frequent_images and the three-group minimum only constrain the long-tailed curve
    SyntheticLTSpec(train_images_per_category=5, max_frequent_images=50).validate()
    SyntheticLTSpec(num_categories=1, train_images_per_category=5).validate()
    with pytest.raises(ValueError, match="num_categories=0"):
        SyntheticLTSpec(num_categories=0, train_images_per_category=5).validate()


def test_cli_balanced_preset(tmp_path, capsys):
    out = tmp_path / "cli"
    synthetic.main(["--preset", "synthetic_lvis_balanced", "--out", str(out), "--num-categories",
                    "6", "--image-size", "64", "--val-instances", "1",
                    "--train-images-per-category", "12"])
    spec = synthetic.spec_of(str(out))
    assert spec == replace(synthetic.PRESETS["synthetic_lvis_balanced"], num_categories=6,
                           image_size=64, val_instances=1, train_images_per_category=12)
    assert {c["image_count"] for c in load_split(str(out), "train")["categories"]} == {12}
    err = capsys.readouterr().err
    assert "(rare 0, common 6, frequent 0)" in err
    assert "balanced: every category on 12 train images, so all are common" in err
