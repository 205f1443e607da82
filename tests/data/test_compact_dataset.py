"""The compact form of LVIS-format training sets: the same dicts, errors, metadata, repeat
factors and sample stream as the JSON's dataset dicts, a cache that is never trusted when
incomplete or stale, and one conversion per machine."""

import json
import logging
import os
import pickle
import random

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.samplers import RepeatFactorTrainingSampler

from eql_d2.config import get_eql_cfg
from eql_d2.data import compact, datasets, load_lvis_format, register_lvis_format
from eql_d2.data.compact import CompactDataset, compact_cache_dir, load_compact
from eql_d2.data.train_loader import ResumableTrainLoader, global_batches

from helpers import free_port


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("EQL_D2_CACHE_DIR", str(folder))
    return folder


def random_lvis(seed, num_images=40, num_categories=12, image_counts=True, annotations_first=True):
    """An LVIS-format file's content with what the loader must carry exactly: image ids out of
    order and with gaps, annotations of an image scattered through the file, integer and
    long float coordinates, several polygons per annotation, images without annotations or
    without image-level labels, Zipf-like categories, and a few unusable annotations."""
    rng = random.Random(seed)
    ids = rng.sample(range(1, 10 * num_images), num_images)
    images = []
    for k, i in enumerate(ids):
        w, h = rng.choice([(64, 48), (48, 64), (50, 50)])
        img = {"id": i, "width": w, "height": h, "coco_url": f"http://x/train2017/{i:08d}.jpg"}
        if k % 7:
            img["neg_category_ids"] = sorted(rng.sample(range(1, num_categories + 1), k % 4))
            img["not_exhaustive_category_ids"] = [rng.randint(1, num_categories)] if k % 3 else []
        images.append(img)
    weights = [1 / (c + 1) ** 1.2 for c in range(num_categories)]
    annotations = []
    for ann_id in rng.sample(range(1, 100000), 6 * num_images):
        img = rng.choice(images[: num_images - 5])  # the last five images have none
        x, y = rng.uniform(0, img["width"] - 5), rng.uniform(0, img["height"] - 5)
        w, h = rng.uniform(1, img["width"] - x), rng.uniform(1, img["height"] - y)
        bbox = [x, y, w, h] if ann_id % 5 else [int(x), int(y), max(int(w), 1), max(int(h), 1)]
        polys = [[v for _ in range(rng.randint(3, 9))
                  for v in (rng.uniform(x, x + w), rng.uniform(y, y + h))]
                 for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        if ann_id % 11 == 0:
            polys[0] = [round(v) for v in polys[0]]
        if ann_id % 17 == 0:
            bbox[2] = 0.0  # skipped: zero width
        annotations.append({"id": ann_id, "image_id": img["id"], "bbox": bbox, "area": w * h,
                            "category_id": rng.choices(range(1, num_categories + 1), weights)[0],
                            "segmentation": polys, "iscrowd": 0})
    categories = [{"id": c, "name": f"cat_{c}", "synonyms": [f"cat_{c}"],
                   "frequency": "rcf"[c % 3]} for c in range(1, num_categories + 1)]
    if image_counts:
        for c in categories:
            c["image_count"] = c["id"] * 3
    order = ("info", "annotations", "images", "categories") if annotations_first else \
        ("info", "images", "categories", "annotations")
    content = {"info": {"description": "generated"}, "images": images,
               "annotations": annotations, "categories": categories}
    return {k: content[k] for k in order}


def write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def as_dataset(json_file, image_root):
    c = load_compact(json_file)
    return CompactDataset([(c, image_root, np.arange(c.num_images))])


@pytest.mark.parametrize("seed, image_counts, annotations_first",
                         [(0, True, True), (1, False, False), (2, False, True)])
def test_lazy_dicts_equal_the_json_loaders(tmp_path, seed, image_counts, annotations_first):
    path = write(tmp_path / "train.json", random_lvis(seed, image_counts=image_counts,
                                                     annotations_first=annotations_first))
    ref = load_lvis_format(path, str(tmp_path))
    ds = as_dataset(path, str(tmp_path))
    assert len(ds) == len(ref) and list(ds) == ref
    assert ds[-1] == ref[-1] and ds[3:7] == ref[3:7]
    for d in (ds[0], ds[len(ds) // 2]):
        for a in d["annotations"]:
            assert all(type(v) is float for p in a["segmentation"] for v in p)
    info = datasets._category_metadata(datasets._read_lvis(path))
    assert load_compact(path).category_metadata() == info
    # a data-loader worker started by spawn maps the same files again
    assert pickle.loads(pickle.dumps(ds))[5] == ref[5]


def test_small_synthetic_lt_equals_its_dicts(small_synthetic, tmp_path):
    path = os.path.join(small_synthetic, "lvis_v1_train.json")
    assert list(as_dataset(path, small_synthetic)) == load_lvis_format(path, small_synthetic)


def _faults():
    """name -> (edit of random_lvis(0)'s content, or the file's text)"""
    def edit(fn):
        def apply(data):
            fn(data)
            return json.dumps(data)
        return apply
    ann = lambda d: d["annotations"][3]  # noqa: E731
    return {
        "unknown image": edit(lambda d: ann(d).update(image_id=-5)),
        "unknown category": edit(lambda d: ann(d).update(category_id=99)),
        "duplicate annotation id": edit(lambda d: ann(d).update(id=d["annotations"][1]["id"])),
        "malformed bbox": edit(lambda d: ann(d).update(bbox=[1.0, "2", 3.0, 4.0])),
        "RLE": edit(lambda d: ann(d).update(segmentation={"size": [4, 4], "counts": "ab"})),
        "flat polygon": edit(lambda d: ann(d).update(segmentation=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
        "no segmentation": edit(lambda d: ann(d).pop("segmentation")),
        "duplicate image id": edit(lambda d: d["images"][2].update(id=d["images"][1]["id"])),
        "duplicate image file": edit(lambda d: d["images"][2].update(coco_url=d["images"][1]["coco_url"])),
        "image without coco_url": edit(lambda d: d["images"][4].pop("coco_url")),
        "image without height": edit(lambda d: d["images"][4].pop("height")),
        "category ids": edit(lambda d: d["categories"][-1].update(id=40)),
        "category without name": edit(lambda d: d["categories"][0].pop("name")),
        "no annotations": edit(lambda d: d.pop("annotations")),
        "annotations as object": edit(lambda d: d.update(annotations={"item": ann(d)})),
        "images as object": edit(lambda d: d.update(images={})),
        "top-level list": lambda data: json.dumps([data]),
        "not JSON": lambda data: json.dumps(data)[:-200],
        "trailing data": lambda data: json.dumps(data) + "{}",
    }


@pytest.mark.parametrize("fault", list(_faults()))
def test_faults_raise_the_json_loaders_errors(tmp_path, fault):
    path = tmp_path / "bad.json"
    path.write_text(_faults()[fault](random_lvis(0)))
    with pytest.raises(ValueError) as theirs:
        load_lvis_format(str(path), str(tmp_path))
    with pytest.raises(ValueError) as ours:
        load_compact(str(path))
    assert str(ours.value) == str(theirs.value)
    assert str(path) in str(ours.value)
    assert not os.path.exists(compact_cache_dir(str(path)))
    assert not os.listdir(os.path.dirname(compact_cache_dir(str(path))))  # no partial folder


def test_skipped_annotations_warn_as_the_json_loader(tmp_path, caplog):
    """The same skipped annotations and warning, also for a file with NaN and Infinity
    numbers, which the streaming parser leaves to the full parser."""
    data = random_lvis(1)
    data["annotations"][0]["bbox"][3] = float("nan")
    data["annotations"][1]["bbox"][0] = float("inf")
    data["annotations"][2]["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]
    data["annotations"][4]["bbox"] = [1000.0, 5.0, 10.0, 10.0]
    for name, content in (("finite.json", random_lvis(1)), ("non_finite.json", data)):
        path = write(tmp_path / name, content)
        messages = []
        for load in (lambda: load_lvis_format(path, str(tmp_path)),
                     lambda: list(as_dataset(path, str(tmp_path)))):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="eql_d2.data.datasets"):
                dicts = load()
            messages.append([r.getMessage() for r in caplog.records
                             if r.name == "eql_d2.data.datasets"])
            assert dicts == load_lvis_format(path, str(tmp_path))
        assert messages[0] == messages[1] and len(messages[0]) == 1
        assert "skipped" in messages[0][0]


def test_incomplete_or_stale_cache_is_rebuilt(tmp_path, monkeypatch, caplog):
    path = tmp_path / "train.json"
    write(path, random_lvis(3))
    conversions = []
    convert_into = compact._convert_into
    monkeypatch.setattr(compact, "_convert_into",
                        lambda *a: conversions.append(a[0]) or convert_into(*a))
    ref = load_lvis_format(str(path), str(tmp_path))
    folder = compact_cache_dir(str(path))
    assert list(as_dataset(str(path), str(tmp_path))) == ref and len(conversions) == 1
    assert folder.startswith(os.environ["EQL_D2_CACHE_DIR"])
    assert sorted(os.listdir(tmp_path)) == ["cache", "train.json"]  # nothing beside the JSON
    assert list(as_dataset(str(path), str(tmp_path))) == ref and len(conversions) == 1

    def damaged(fn):
        fn()
        with caplog.at_level(logging.WARNING, logger="eql_d2.data.compact"):
            assert list(as_dataset(str(path), str(tmp_path))) == ref
        return len(conversions)

    coords = os.path.join(folder, "coords.bin")
    assert damaged(lambda: os.truncate(coords, os.path.getsize(coords) - 8)) == 2
    assert "coords.bin holds" in caplog.text
    assert damaged(lambda: os.remove(os.path.join(folder, "bbox.bin"))) == 3
    meta = os.path.join(folder, "meta.json")
    assert damaged(lambda: open(meta, "w").write('{"key": {"json_f')) == 4
    assert damaged(lambda: os.remove(meta)) == 5  # a folder without meta.json: never complete

    # the same size, another modification time
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert list(as_dataset(str(path), str(tmp_path))) == ref and len(conversions) == 6
    # another content
    changed = random_lvis(4)
    write(path, changed)
    assert list(as_dataset(str(path), str(tmp_path))) == load_lvis_format(str(path), str(tmp_path))
    assert len(conversions) == 7


def test_cut_off_conversion_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    path = write(tmp_path / "train.json", random_lvis(5))

    def fail(self):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(compact._Writer, "finish", fail)
    with pytest.raises(OSError, match="EQL_D2_CACHE_DIR"):
        load_compact(path)
    assert not os.path.exists(compact_cache_dir(path))
    monkeypatch.undo()
    monkeypatch.setenv("EQL_D2_CACHE_DIR", str(tmp_path / "cache"))
    assert list(as_dataset(path, str(tmp_path))) == load_lvis_format(path, str(tmp_path))


def _register(name, path, root):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_lvis_format(name, path, root)


@pytest.mark.parametrize("sqrt", [True, False])
def test_repeat_factors_and_sample_stream_equal_detectron2s(tmp_path, sqrt):
    data = random_lvis(6, num_images=300, num_categories=60)
    path = write(tmp_path / "train.json", data)
    _register("compact_rfs_train", path, str(tmp_path))
    ours = compact.compact_detection_dataset(["compact_rfs_train"], filter_empty=True)
    theirs = get_detection_dataset_dicts(["compact_rfs_train"], filter_empty=True)
    assert len(ours) == len(theirs) <= 295 and list(ours) == theirs
    for thresh in (0.02, 0.1, 0.5):
        expect = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            theirs, thresh, sqrt=sqrt)
        got = ours.repeat_factors(thresh, sqrt=sqrt)
        assert got.dtype == expect.dtype and torch.equal(got, expect)
        assert got.max() > 1
    args = dict(total_batch_size=4, seed=13, sampler="RepeatFactorTrainingSampler",
                repeat_factors=expect, aspect_ratio_grouping=True)
    a = ResumableTrainLoader(ours, None, **args)
    b = ResumableTrainLoader(theirs, None, **args)
    assert np.array_equal(a.landscape, b.landscape) and a.landscape.any() and not a.landscape.all()
    stream = lambda loader: global_batches(loader._index_stream(), 4, loader.landscape)  # noqa: E731
    assert [next(s) for s in [stream(a)] for _ in range(200)] == \
        [next(s) for s in [stream(b)] for _ in range(200)]
    # the workers' dataset is the compact one itself, not a copy
    assert a._dataset._lst is ours and a._dataset[7] == b._dataset[7]


def test_train_loader_of_the_trainer_reads_the_compact_form(small_synthetic, tmp_path):
    from eql_d2.engine import Trainer, prepare_datasets

    path = os.path.join(small_synthetic, "lvis_v1_train.json")
    _register("compact_trainer_train", path, small_synthetic)
    loaders = []
    for on in (True, False):
        cfg = get_eql_cfg(None, [
            "DATASETS.TRAIN", "('compact_trainer_train',)", "DATASETS.TEST", "()",
            "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler",
            "DATALOADER.REPEAT_THRESHOLD", "0.1", "SOLVER.IMS_PER_BATCH", "2", "SEED", "3",
            "MODEL.ROI_HEADS.NUM_CLASSES", "8",
            "DATALOADER.COMPACT_DATASET", str(on), "DATALOADER.NUM_WORKERS", "0"])
        prepare_datasets(cfg)
        loaders.append(Trainer.build_train_loader(cfg))
    ours, theirs = loaders
    assert isinstance(ours._dataset._lst, CompactDataset)
    assert not isinstance(theirs._dataset._lst, CompactDataset)
    assert torch.equal(ours.repeat_factors, theirs.repeat_factors)
    assert ours.images_per_epoch == theirs.images_per_epoch
    first = [next(iter(loader)) for loader in loaders]
    assert [d["image_id"] for d in first[0]] == [d["image_id"] for d in first[1]]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(*first))


def _rank_main(path, root, out_dir):
    from detectron2.utils import comm

    from eql_d2.engine import Trainer, prepare_datasets

    parses = []
    convert_into, read_json = compact._convert_into, datasets._read_json
    compact._convert_into = lambda *a: parses.append("stream") or convert_into(*a)
    datasets._read_json = lambda *a: parses.append("json.load") or read_json(*a)
    register_lvis_format("compact_launch_train", path, root)
    cfg = get_eql_cfg(None, ["DATASETS.TRAIN", "('compact_launch_train',)",
                             "DATASETS.TEST", "()", "MODEL.ROI_HEADS.NUM_CLASSES", "12"])
    prepare_datasets(cfg)
    dataset = Trainer.build_train_dataset(cfg)
    meta = MetadataCatalog.get("compact_launch_train")
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.pkl"), "wb") as f:
        pickle.dump({"local_rank": comm.get_local_rank(), "parses": parses,
                     "type": type(dataset).__name__, "dicts": list(dataset),
                     "class_image_count": meta.class_image_count}, f)


def test_two_processes_parse_once_and_hold_the_same_dicts(tmp_path):
    from detectron2.engine import launch

    path = write(tmp_path / "train.json", random_lvis(7))
    launch(_rank_main, 2, dist_url=f"tcp://127.0.0.1:{free_port()}",
           args=(path, str(tmp_path), str(tmp_path)))
    ranks = []
    for r in range(2):
        with open(tmp_path / f"rank{r}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    assert [r["local_rank"] for r in ranks] == [0, 1]
    assert [r["parses"] for r in ranks] == [["stream"], []]
    assert [r["type"] for r in ranks] == ["CompactDataset"] * 2
    expect = [d for d in load_lvis_format(path, str(tmp_path)) if d["annotations"]]
    assert ranks[0]["dicts"] == ranks[1]["dicts"] == expect
    assert ranks[0]["class_image_count"] == ranks[1]["class_image_count"]
