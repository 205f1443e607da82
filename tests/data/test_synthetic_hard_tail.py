"""The hard-tail preset (appearance "own_factors", eql_d2.data.hard_tail): determinism,
LVIS groups, the federated labels, and categories of the tail that own their appearance."""

import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image, ImageDraw

from eql_d2.data import datasets, hard_tail, register_all, synthetic
from eql_d2.data.synthetic import PRESETS, SyntheticLTSpec, frequency_group
from helpers import load_split, tree_digest

PRESET = PRESETS["synthetic_hard_tail"]


def _small_spec(**kw):
    """The preset at 64 px with 14 categories (rare 4, common 5, frequent 5): a few
    seconds to generate."""
    small = dict(num_categories=14, image_size=64, max_frequent_images=110, val_instances=3,
                 min_object_size=0.26, max_object_size=0.45)
    return replace(PRESET, **{**small, **kw})


def _present(data):
    present = {img["id"]: set() for img in data["images"]}
    for a in data["annotations"]:
        present[a["image_id"]].add(a["category_id"])
    return present


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synthetic.generate(str(tmp_path_factory.mktemp("hard_tail") / "a"), _small_spec())


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    again = synthetic.generate(str(tmp_path / "again"), _small_spec())
    assert tree_digest(again) == tree_digest(small)
    other = synthetic.generate(str(tmp_path / "other"), _small_spec(seed=1))
    assert tree_digest(other) != tree_digest(small)
    # the looks depend on the seed too, and only on it
    assert synthetic.vocabulary(_small_spec()) == synthetic.vocabulary(_small_spec())
    assert synthetic.vocabulary(_small_spec(seed=1)) != synthetic.vocabulary(_small_spec())


def test_groups_follow_the_train_image_counts(small):
    """r / c / f from each category's train images with LVIS's thresholds (1-10, 11-100,
    > 100), the counts the spec asks for, LVIS's proportions of groups."""
    spec = _small_spec()
    train = load_split(small, "train")
    images_of = {}
    for a in train["annotations"]:
        images_of.setdefault(a["category_id"], set()).add(a["image_id"])
    counts = [len(images_of[c["id"]]) for c in sorted(train["categories"], key=lambda c: c["id"])]
    assert counts == synthetic.train_image_counts(spec)
    groups = []
    for c, n in zip(sorted(train["categories"], key=lambda c: c["id"]), counts):
        expected = "r" if n <= 10 else "c" if n <= 100 else "f"
        assert c["image_count"] == n and c["frequency"] == expected == frequency_group(n)
        groups.append(expected)
    assert (groups.count("r"), groups.count("c"), groups.count("f")) == \
        synthetic.group_sizes(spec.num_categories) == (4, 5, 5)
    assert len(train["images"]) == synthetic.num_train_images(spec)
    # the looks are formed on the same groups
    assert [lk.group for lk in synthetic.vocabulary(spec)] == groups
    with open(os.path.join(small, "generator.json")) as f:
        recorded = json.load(f)
    assert recorded["appearance"] == "own_factors" and recorded["kin_size"] == PRESET.kin_size
    assert synthetic.spec_of(small) == spec


def test_preset_groups_and_size():
    counts = synthetic.train_image_counts(PRESET)
    groups = [frequency_group(n) for n in counts]
    assert (groups.count("r"), groups.count("c"), groups.count("f")) == (17, 23, 20)
    assert max(counts) == PRESET.max_frequent_images and min(counts) == 1
    assert synthetic.num_train_images(PRESET) == 1438
    assert synthetic.rfs_threshold(PRESET) == 0.0695


def test_federated_labels(small):
    """Train: negatives absent, not-exhaustive categories present. Val: exhaustive labels,
    and the federated val follows federated_labels' rule against them."""
    train = load_split(small, "train")
    present = _present(train)
    for img in train["images"]:
        assert not set(img["neg_category_ids"]) & present[img["id"]]
        assert set(img["not_exhaustive_category_ids"]) <= present[img["id"]]
    assert any(img["neg_category_ids"] for img in train["images"])
    assert any(img["not_exhaustive_category_ids"] for img in train["images"])

    val, fed = load_split(small, "val"), load_split(small, "val_fed")
    num = len(val["categories"])
    truth = _present(val)
    for img in val["images"]:
        assert set(img["neg_category_ids"]) == set(range(1, num + 1)) - truth[img["id"]]
        assert img["not_exhaustive_category_ids"] == []
    per_cat = {}
    for a in val["annotations"]:
        per_cat[a["category_id"]] = per_cat.get(a["category_id"], 0) + 1
    assert set(per_cat) == set(range(1, num + 1))
    assert min(per_cat.values()) >= _small_spec().val_instances

    assert [i["id"] for i in fed["images"]] == [i["id"] for i in val["images"]]
    assert _present(fed) == truth  # a dropped instance keeps its category positive
    for c in range(1, num + 1):
        positives = sum(c in p for p in truth.values())
        negatives = [img["id"] for img in fed["images"] if c in img["neg_category_ids"]]
        assert not any(c in truth[i] for i in negatives)
        assert len(negatives) == min(math.floor(PRESET.val_negatives_per_positive * positives + 0.5),
                                     len(truth) - positives)
    kept = {a["id"] for a in fed["annotations"]}
    dropped = {}
    for a in val["annotations"]:
        if a["id"] not in kept:
            dropped.setdefault((a["image_id"], a["category_id"]), []).append(a["id"])
    flagged = {(img["id"], c) for img in fed["images"] for c in img["not_exhaustive_category_ids"]}
    assert set(dropped) == flagged and flagged
    for (i, c), ids in dropped.items():
        same = [a["id"] for a in val["annotations"] if (a["image_id"], a["category_id"]) == (i, c)]
        assert ids == [max(same)] and len(same) >= 2


def test_tail_factors_are_not_used_by_frequent_categories():
    """On the preset itself: no body, pattern or mark of a rare or common category belongs
    to a frequent one, by id or by value, so the tail cannot be composed of what the
    frequent categories teach; kin members share body and patterns and differ in the mark."""
    looks = synthetic.vocabulary(PRESET)
    assert len(looks) == PRESET.num_categories
    hard_tail.check_own_factors(looks)
    frequent = [lk for lk in looks if lk.group == "f"]
    tail = [lk for lk in looks if lk.group != "f"]
    assert len(tail) == 40
    frequent_ids = set().union(*(lk.factors for lk in frequent))
    frequent_bodies = {lk.harmonics for lk in frequent}
    frequent_patterns = {p for lk in frequent for p in lk.modes}
    frequent_marks = {lk.mark for lk in frequent}
    for lk in tail:
        assert not lk.factors & frequent_ids
        assert lk.harmonics not in frequent_bodies
        assert not set(lk.modes) & frequent_patterns
        assert lk.mark not in frequent_marks
        assert len(set(lk.modes)) == PRESET.modes_per_category
    kins = {}
    for lk in looks:
        kins.setdefault(lk.kin, []).append(lk)
    assert max(len(m) for m in kins.values()) == PRESET.kin_size
    for members in kins.values():
        assert len({m.group for m in members}) == 1
        assert len({(m.body, m.harmonics, m.modes) for m in members}) == 1
        assert len({m.mark.kind for m in members}) == len({m.mark.position for m in members}) \
            == len(members)
    # the names in the JSON tell a kin's members apart
    names = [synthetic._describe(lk)[0] for lk in looks]
    assert len(set(names)) == len(names)


def test_check_own_factors_refuses_a_tail_category_with_a_frequent_factor():
    looks = synthetic.vocabulary(PRESET)
    frequent = next(lk for lk in looks if lk.group == "f")
    rare = next(lk for lk in looks if lk.group == "r")
    for changed in (replace(rare, body=frequent.body), replace(rare, mode_ids=frequent.mode_ids),
                    replace(rare, mark_id=frequent.mark_id)):
        bad = [changed if lk.category == rare.category else lk for lk in looks]
        with pytest.raises(ValueError, match=f"category {rare.category + 1} "):
            hard_tail.check_own_factors(bad)


def test_annotations_describe_the_visible_parts(small):
    """Every annotation: polygons of >= 3 points inside the image, the box around them, an
    area that fits in the box; some objects run off the image (partial views)."""
    train = load_split(small, "train")
    size = _small_spec().image_size
    at_border = 0
    for a in train["annotations"]:
        xs = [x for p in a["segmentation"] for x in p[0::2]]
        ys = [y for p in a["segmentation"] for y in p[1::2]]
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
        x, y, w, h = a["bbox"]
        assert (min(xs), min(ys), max(xs), max(ys)) == (x, y, x + w, y + h)
        assert w > 0 and h > 0 and 0 <= x and x + w <= size - 1 and 0 <= y and y + h <= size - 1
        assert 24 <= a["area"] <= (w + 1) * (h + 1)
        at_border += x == 0 or y == 0 or x + w == size - 1 or y + h == size - 1
    assert at_border > 0.03 * len(train["annotations"])


def test_no_partial_views_without_truncation_and_occluders_split_objects():
    """Without partial views (truncation_prob 0) no object touches the border; occluders
    drawn over objects split some of them into several visible parts."""
    spec = _small_spec(truncation_prob=0.0, max_distractors=4)
    looks = synthetic.vocabulary(spec)
    rng = np.random.default_rng(0)
    occluded = 0
    for _ in range(40):
        _, objects = hard_tail.render_image([0, 1, 5, 9, 13], looks, spec, rng)
        for o in objects:
            x, y, w, h = o["bbox"]
            assert x > 0 and y > 0 and x + w < spec.image_size - 1 and y + h < spec.image_size - 1
            occluded += len(o["segmentation"]) > 1
    assert occluded > 0  # an occluder split some object in two


def test_render_uses_the_category_colours():
    """An object drawn alone shows the colours of one of its category's modes (up to the
    instance's brightness) or its mark's tone over most of its visible pixels."""
    spec = _small_spec(truncation_prob=0.0, max_distractors=0, image_size=96)
    looks = synthetic.vocabulary(spec)
    rng = np.random.default_rng(3)
    for k in (0, 13):
        img, objects = hard_tail.render_image([k], looks, spec, rng)
        (o,) = objects
        pixels = np.asarray(img).astype(float)
        mask_img = Image.new("L", img.size, 0)
        for p in o["segmentation"]:
            ImageDraw.Draw(mask_img).polygon(p, fill=1)
        inside = pixels[np.asarray(mask_img).astype(bool)]
        best = 0.0
        for pattern in looks[k].modes:
            ref = np.asarray(pattern.colours, float)  # [2, 3]
            # the brightness gain g in [0.85, 1.15]: pixel = g * colour, or a mark's tone
            ok = np.zeros(len(inside), bool)
            for c in ref:
                g = inside @ c / max(c @ c, 1e-6)
                ok |= (np.abs(inside - g[:, None] * c).max(1) <= 2) & (g > 0.84) & (g < 1.16)
            ok |= (inside == 20).all(1) | (inside == 240).all(1)  # the mark's tones
            best = max(best, ok.mean())
        assert best > 0.8


def test_own_factor_fields_are_checked():
    with pytest.raises(ValueError, match="appearance='x'"):
        SyntheticLTSpec(appearance="x").validate()
    with pytest.raises(ValueError, match="shapes, colours and textures must be 0"):
        replace(PRESET, shapes=4, colours=4, textures=4).validate()
    with pytest.raises(ValueError, match="under 16 px"):
        replace(PRESET, min_object_size=0.1).validate()
    for key, value in (("modes_per_category", 0), ("kin_size", 0), ("max_distractors", -1),
                       ("min_visible", 0.1), ("truncation_prob", 1.5), ("deformation", 0.5)):
        with pytest.raises(ValueError, match=key):
            replace(PRESET, **{key: value}).validate()
    PRESET.validate()


def test_registered_and_generated_on_first_use(tmp_path, monkeypatch):
    """register_all registers synthetic_hard_tail_{train,val,val_fed} in the folder named by
    $EQL_D2_SYNTHETIC_HARD_TAIL_ROOT, and the preset is generated there on first use."""
    register_all()
    root = datasets.synthetic_preset_root("synthetic_hard_tail")
    for split in ("train", "val", "val_fed"):
        name = f"synthetic_hard_tail_{split}"
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "lvis"
        assert meta.json_file == os.path.join(root, f"lvis_v1_{split}.json")
    monkeypatch.setenv("EQL_D2_SYNTHETIC_HARD_TAIL_ROOT", str(tmp_path / "ht"))
    assert datasets.synthetic_preset_root("synthetic_hard_tail") == str(tmp_path / "ht")
    small = _small_spec(num_categories=6, max_frequent_images=101, val_instances=1)
    monkeypatch.setitem(synthetic.PRESETS, "synthetic_hard_tail", small)
    made = datasets.ensure_synthetic_preset("synthetic_hard_tail")
    assert made == str(tmp_path / "ht") and synthetic.spec_of(made) == small
    assert os.path.isfile(os.path.join(made, "lvis_v1_val_fed.json"))


def test_pretraining_preset_is_balanced_and_owns_its_looks(tmp_path):
    """synthetic_hard_tail_pretrain: the hard-tail images with 200 categories on 40 train
    images each, whose looks (drawn from seed 1000) are none of the hard-tail seeds'
    categories' bodies, patterns or marks; small, it generates every category on exactly
    its number of train images."""
    pretrain = PRESETS["synthetic_hard_tail_pretrain"]
    assert pretrain.balanced and pretrain.own_factors
    assert (pretrain.num_categories, pretrain.train_images_per_category) == (200, 40)
    assert (pretrain.image_size, pretrain.min_object_size, pretrain.max_object_size,
            pretrain.max_distractors) == (PRESET.image_size, PRESET.min_object_size,
                                          PRESET.max_object_size, PRESET.max_distractors)
    assert synthetic.num_train_images(pretrain) == 2667
    looks = synthetic.vocabulary(pretrain)
    for seed in (0, 1, 2):
        tail = synthetic.vocabulary(replace(PRESET, seed=seed))
        assert not {lk.harmonics for lk in looks} & {lk.harmonics for lk in tail}
        assert not {p for lk in looks for p in lk.modes} & {p for lk in tail for p in lk.modes}
    small = replace(pretrain, num_categories=8, train_images_per_category=4, image_size=64,
                    val_instances=1, min_object_size=0.26, max_object_size=0.45)
    root = synthetic.generate(str(tmp_path / "p"), small)
    with open(os.path.join(root, "lvis_v1_train.json")) as f:
        data = json.load(f)
    images_of = {c["id"]: 0 for c in data["categories"]}
    for cats in _present(data).values():
        for c in cats:
            images_of[c] += 1
    assert set(images_of.values()) == {4}
    assert {c["frequency"] for c in data["categories"]} == {frequency_group(4)} == {"r"}
