"""Classification data: CIFAR-100-LT from the official pickles (9502 images at IF 200),
ImageNet-LT split files (and missing images reported before training), Cutout, the mapper's
seeded augmentation and the generated Synthetic-CLS-LT."""

import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from eql_d2.config import get_eql_cfg
from eql_d2.data.classification import (ClassificationDatasetMapper, ClassificationSplit,
                                        Cutout, SyntheticClsSpec, generate_synthetic_cls_lt,
                                        load_cifar100_lt, load_imagenet_lt,
                                        load_synthetic_cls_lt, long_tailed_counts,
                                        parse_imagenet_lt_split, prepare_classification_datasets)
from eql_d2.data.train_loader import seeded_rngs
from eql_d2.engine import ClassificationTrainer


def write_fake_cifar100(root, per_class=500, test_per_class=3):
    """CIFAR-100 python pickles: classes interleaved as in the real file, each image's
    pixels encoding (label, index within its class)."""
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", per_class), ("test", test_per_class)):
        labels = np.tile(np.arange(100), n)
        rank = np.repeat(np.arange(n), 100)
        data = np.zeros((len(labels), 3072), np.uint8)
        data[:, 0], data[:, 1], data[:, 2] = labels, rank % 256, rank // 256
        with open(os.path.join(root, split), "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels.tolist(),
                         "coarse_labels": (labels // 5).tolist()}, f)
    with open(os.path.join(root, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"class{k}" for k in range(100)]}, f)


def test_cifar100_lt_profile_keeps_9502_images_and_the_first_of_each_class(tmp_path):
    root = str(tmp_path / "cifar-100-python")
    write_fake_cifar100(root)
    dicts = load_cifar100_lt(root, "train", 200)
    # the profile, written out: n_i = int(500 * 0.005^(i / 99))
    expected = [int(500 * 0.005 ** (i / 99)) for i in range(100)]
    assert sum(expected) == 9502 and expected[0] == 500 and expected[-1] == 2
    assert long_tailed_counts(500, 200, 100) == expected
    assert len(dicts) == 9502
    labels = np.array([d["label"] for d in dicts])
    assert np.bincount(labels, minlength=100).tolist() == expected
    for d in dicts:  # pixels say which image of the file it is: the first n_i of each class
        image = d["image"]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert image[0, 0, 0] == d["label"]  # the red value of pixel (0, 0): data[0]
    ranks = {}
    for d in dicts:
        row = d["image"].transpose(2, 0, 1).reshape(-1)
        ranks.setdefault(d["label"], []).append(int(row[1]) + 256 * int(row[2]))
    assert all(sorted(r) == list(range(expected[c])) for c, r in ranks.items())
    test = load_cifar100_lt(root, "test", 200)
    assert len(test) == 300 and [d["label"] for d in test] == np.tile(np.arange(100), 3).tolist()


def test_cifar100_lt_split_metadata_and_clear_errors(tmp_path):
    root = str(tmp_path / "c")
    write_fake_cifar100(root, per_class=500, test_per_class=1)
    split = ClassificationSplit("t_cifar_train", "cifar100_lt", "train", "t_cifar_train",
                                root=root, imbalance_factor=200)
    meta = split.prepare()
    assert meta.num_train_images == 9502 and meta.thing_classes[7] == "class7"
    assert [e["image_count"] for e in meta.class_image_count] == long_tailed_counts(500, 200, 100)
    with pytest.raises(FileNotFoundError, match=os.path.join(str(tmp_path), "none", "train")):
        load_cifar100_lt(str(tmp_path / "none"), "train", 200)
    with open(os.path.join(root, "train"), "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match="no 'fine_labels' entry"):
        load_cifar100_lt(root, "train", 200)


def write_imagenet_lt(tmp_path, lines, present):
    root = tmp_path / "imagenet"
    for rel in present:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (10, 20, 30)).save(path, format="JPEG")
    split = tmp_path / "ImageNet_LT_train.txt"
    split.write_text("".join(f"{line}\n" for line in lines))
    return str(split), str(root)


def test_imagenet_lt_lists_are_parsed_and_bad_lines_named(tmp_path):
    lines = ["train/n01/n01_1.JPEG 0", "train/n01/n01_2.JPEG 0", "", "train/n02/n02_1.JPEG 1"]
    split, root = write_imagenet_lt(tmp_path, lines, [])
    assert parse_imagenet_lt_split(split) == [("train/n01/n01_1.JPEG", 0),
                                              ("train/n01/n01_2.JPEG", 0),
                                              ("train/n02/n02_1.JPEG", 1)]
    dicts = load_imagenet_lt(split, root)
    assert [d["file_name"] for d in dicts] == [os.path.join(root, "train/n01/n01_1.JPEG"),
                                               os.path.join(root, "train/n01/n01_2.JPEG"),
                                               os.path.join(root, "train/n02/n02_1.JPEG")]
    entry = ClassificationSplit("t_inlt_train", "imagenet_lt", "train", "t_inlt_train",
                                split_file=split, train_split_file=split, image_root=root)
    meta = entry.prepare()
    assert meta.thing_classes == ["n01", "n02"] and meta.train_image_counts == [2, 1]
    (tmp_path / "bad.txt").write_text("a.JPEG 0\nb.JPEG x\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 2: label 'x' is not an integer"):
        parse_imagenet_lt_split(str(tmp_path / "bad.txt"))
    (tmp_path / "bad.txt").write_text("a.JPEG 0 1\n")
    with pytest.raises(ValueError, match=r"line 1: expected '<image path> <label>'"):
        parse_imagenet_lt_split(str(tmp_path / "bad.txt"))
    with pytest.raises(FileNotFoundError, match="ImageNet-LT split file not found"):
        parse_imagenet_lt_split(str(tmp_path / "absent.txt"))


def test_a_missing_imagenet_lt_image_is_reported_before_training_with_its_path(tmp_path):
    lines = ["train/n01/a.JPEG 0", "train/n01/b.JPEG 0", "train/n02/c.JPEG 1"]
    split, root = write_imagenet_lt(tmp_path, lines, ["train/n01/a.JPEG", "train/n02/c.JPEG"])
    name = "t_inlt_missing_train"
    DatasetCatalog.register(name, ClassificationSplit(name, "imagenet_lt", "train", name,
                                                      split_file=split, train_split_file=split,
                                                      image_root=root))
    MetadataCatalog.get(name).set(evaluator_type="classification")
    cfg = get_eql_cfg(opts=["MODEL.META_ARCHITECTURE", "ImageClassifier",
                            "MODEL.CLASSIFIER.NUM_CLASSES", "2", "SOLVER.IMS_PER_BATCH", "2"])
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (name,), ()
    prepare_classification_datasets(cfg)
    with pytest.raises(FileNotFoundError) as e:
        ClassificationTrainer.build_train_loader(cfg)
    assert "1 of 3 training images" in str(e.value)
    assert os.path.join(root, "train/n01/b.JPEG") in str(e.value)
    cfg.MODEL.CLASSIFIER.NUM_CLASSES = 3
    with pytest.raises(ValueError, match="MODEL.CLASSIFIER.NUM_CLASSES = 3, but dataset "
                                         f"'{name}' has 2 classes"):
        prepare_classification_datasets(cfg)


def test_cutout_covers_the_square_around_its_centre_clipped_at_the_border():
    fill = [1.0, 2.0, 3.0]
    image = torch.full((3, 12, 10), -1.0)
    cutout = Cutout(6, fill)
    for seed in range(30):
        torch.manual_seed(seed)
        cy, cx = int(torch.randint(12, ())), int(torch.randint(10, ()))
        torch.manual_seed(seed)
        out = cutout(image)
        # brute force: pixel (y, x) is cut iff cy - 3 <= y < cy + 3 and cx - 3 <= x < cx + 3
        for y in range(12):
            for x in range(10):
                inside = cy - 3 <= y < cy + 3 and cx - 3 <= x < cx + 3
                assert out[:, y, x].tolist() == (fill if inside else [-1.0] * 3)
    assert (image == -1).all()  # the input is left as it was


def test_mapper_augmentation_is_a_function_of_the_seed():
    cfg = get_eql_cfg()
    mapper = ClassificationDatasetMapper(cfg, True)
    rng = np.random.default_rng(0)
    record = {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "label": 4,
              "image_id": 0}
    outs = []
    for seed in (1, 1, 2):
        with seeded_rngs(seed):
            outs.append(mapper(record))
    assert outs[0]["label"] == 4 and outs[0]["image"].shape == (3, 32, 32)
    assert outs[0]["image"].dtype == torch.float32
    assert torch.equal(outs[0]["image"], outs[1]["image"])
    assert not torch.equal(outs[0]["image"], outs[2]["image"])
    test = ClassificationDatasetMapper(cfg, False)(record)["image"]
    assert torch.equal(test, torch.from_numpy(record["image"]).permute(2, 0, 1).float())
    cfg.INPUT.CLASSIFICATION.TRAIN_AUGMENTATIONS = ["flip", "mixup"]
    with pytest.raises(ValueError, match=r"TRAIN_AUGMENTATIONS: unknown \['mixup'\]"):
        ClassificationDatasetMapper(cfg, True)


def test_synthetic_cls_lt_has_the_profile_and_is_deterministic(tmp_path):
    spec = SyntheticClsSpec(num_classes=6, max_images=12, imbalance_factor=6,
                            test_per_class=2, seed=1)
    a = generate_synthetic_cls_lt(str(tmp_path / "a"), spec)
    b = generate_synthetic_cls_lt(str(tmp_path / "b"), spec)
    train = load_synthetic_cls_lt(a, "train")
    counts = np.bincount([d["label"] for d in train], minlength=6).tolist()
    assert counts == long_tailed_counts(12, 6, 6) == [12, 8, 5, 4, 2, 2]
    assert all(d["image"].shape == (32, 32, 3) for d in train)
    for split in ("train", "test"):
        with np.load(os.path.join(a, f"{split}.npz")) as x, \
                np.load(os.path.join(b, f"{split}.npz")) as y:
            assert np.array_equal(x["images"], y["images"])
    # every image is drawn anew (scene, placement, crop margin)
    imgs = np.stack([d["image"] for d in train])
    assert len({imgs[i].tobytes() for i in range(len(imgs))}) == len(imgs)
    assert len(load_synthetic_cls_lt(a, "test")) == 12
