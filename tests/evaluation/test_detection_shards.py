"""Compact detections (DetectionArrays), their shards, and the distributed LVIS evaluation.

The columns must give back exactly the dicts they were built from (and detectron2's
``instances_to_coco_json`` of the same Instances); the cap and top-K selections must keep
what lvis-api's rules keep; evaluating the columns must give the numbers of evaluating the
dicts, with either backend; two gloo processes writing shards must give the single-process
numbers; and a shard that is missing, cut short or from another evaluation must raise an
error that names it.
"""

import copy
import json
import logging
import os

import numpy as np
import pytest
import torch

from detectron2.data import MetadataCatalog
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Boxes, BoxMode, Instances
from eql_d2.evaluation import evaluate_lvis
from eql_d2.evaluation.detections import DetectionArrays, load_shards, save_shard, shard_path
from eql_d2.evaluation.lvis_evaluation import LVISPerCategoryEvaluator, detections_of_instances
from eql_d2.evaluation.results_io import top_k_per
from helpers import run_on_gloo_workers
from lvis_cases import write_json
from test_fast_lvis_eval import lvis_eval_speed, lvis_from_dict


def case(masks=True, seed=0, images=12, cats=15):
    return lvis_eval_speed.make_lvis_case(num_images=images, num_categories=cats,
                                          dets_per_image=40, masks=masks, score_decimals=1,
                                          seed=seed)


def test_columns_give_back_the_dicts_and_the_results_file(tmp_path):
    _, results = case()
    arrays = DetectionArrays.from_dicts(results)
    assert len(arrays) == len(results) and arrays.has_masks
    assert arrays.to_dicts() == results
    index = np.array([5, 0, len(results) - 1, 5])
    assert list(arrays.take(index).dicts()) == [results[i] for i in index]
    halves = DetectionArrays.concatenate([arrays.take(np.arange(0, 7)),
                                          arrays.take(np.arange(7, len(results)))])
    assert halves.to_dicts() == results
    arrays.write_json(str(tmp_path / "r.json"), chunk=13)
    with open(tmp_path / "r.json") as f:
        assert json.load(f) == results
    # 80 bytes per detection (ids, score, box, RLE offset and size) and the RLE strings
    rle_bytes = sum(len(r["segmentation"]["counts"]) for r in results)
    assert arrays.nbytes == 80 * len(results) + 8 + rle_bytes


def test_top_k_per_category_keeps_what_the_dict_rule_keeps():
    _, results = case(masks=False)
    arrays = DetectionArrays.from_dicts(results)
    for k in (1, 3, 50):
        kept = {id(r) for r in top_k_per(results, "category_id", k)}
        assert {id(results[i]) for i in arrays.top_k_per("category_id", k)} == kept, k


def test_category_map_names_unknown_ids():
    arrays = DetectionArrays([1, 1], [0, 7], [0.5, 0.4], [[0, 0, 1, 1]] * 2)
    assert arrays.map_categories({0: 3, 7: 9}).category_id.tolist() == [3, 9]
    with pytest.raises(ValueError, match=r"\[7\]"):
        arrays.map_categories({0: 3})


def test_instances_become_the_columns_of_detectron2s_dicts():
    rng = np.random.default_rng(1)
    inst = Instances((40, 50))
    xy = rng.uniform(0, 30, (6, 2))
    inst.pred_boxes = Boxes(torch.tensor(np.c_[xy, xy + rng.uniform(1, 15, (6, 2))],
                                         dtype=torch.float32))
    inst.scores = torch.tensor(rng.uniform(0, 1, 6), dtype=torch.float32)
    inst.pred_classes = torch.tensor([3, 0, 3, 7, 1, 2])
    inst.pred_masks = torch.tensor(rng.uniform(0, 1, (6, 40, 50)) > 0.7)
    expected = instances_to_coco_json(copy.deepcopy(inst), 17)
    assert detections_of_instances(inst, 17).to_dicts() == expected


@pytest.mark.parametrize("backend", ["fast", "lvis"])
@pytest.mark.parametrize("masks", [False, True])
def test_columns_evaluate_as_the_dicts(backend, masks):
    gt_dict, results = case(masks=masks, seed=3)
    gt = lvis_from_dict(gt_dict)
    tasks = ("bbox", "segm") if masks else ("bbox",)
    kwargs = dict(iou_types=tasks, max_dets_per_image=20, ap_fixed_dets_per_class=8,
                  backend=backend)
    from_dicts = evaluate_lvis(gt, results, **kwargs)
    from_columns = evaluate_lvis(gt, DetectionArrays.from_dicts(results), **kwargs)
    for task in tasks:
        for key, value in from_dicts[task].items():
            assert from_columns[task][key] == pytest.approx(value, abs=1e-9, nan_ok=True), (task, key)


def test_missing_cut_short_and_foreign_shards_are_named(tmp_path):
    _, results = case()
    arrays = DetectionArrays.from_dicts(results)
    parts = [arrays.take(np.arange(0, 50)), arrays.take(np.arange(50, len(arrays)))]
    folder = str(tmp_path / "shards")
    for rank, part in enumerate(parts):
        save_shard(part, folder, rank, 2, token=77, image_ids=[rank])
    joined, image_ids = load_shards(folder, 2, 77)
    assert joined.to_dicts() == results and image_ids.tolist() == [0, 1]

    path = shard_path(folder, 1, 2)
    save_shard(parts[1], folder, 1, 2, token=76, image_ids=[1])  # left by an earlier evaluation
    with pytest.raises(ValueError, match=r"detections_00001_of_00002\.npz.*token"):
        load_shards(folder, 2, 77)
    save_shard(parts[1], folder, 1, 2, token=77, image_ids=[1])
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{path}.*unreadable"):
        load_shards(folder, 2, 77)
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=rf"{path}.*process 1"):
        load_shards(folder, 2, 77)


# ---------------------------------------------------------------- two gloo processes


def _instances_per_image(gt_dict, results):
    """{image_id: Instances} holding `results` (contiguous class = category id - 1)."""
    import pycocotools.mask as mask_utils

    sizes = {img["id"]: (img["height"], img["width"]) for img in gt_dict["images"]}
    out = {}
    for image_id, (h, w) in sizes.items():
        rs = [r for r in results if r["image_id"] == image_id]
        inst = Instances((h, w))
        boxes = np.array([r["bbox"] for r in rs], np.float64).reshape(-1, 4)
        inst.pred_boxes = Boxes(torch.tensor(BoxMode.convert(boxes, BoxMode.XYWH_ABS,
                                                             BoxMode.XYXY_ABS), dtype=torch.float32))
        inst.scores = torch.tensor([r["score"] for r in rs], dtype=torch.float32)
        inst.pred_classes = torch.tensor([r["category_id"] - 1 for r in rs], dtype=torch.int64)
        masks = [mask_utils.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()})
                 for r in rs]
        inst.pred_masks = torch.tensor(np.array(masks, dtype=bool).reshape(-1, h, w))
        out[image_id] = inst
    return out


def _evaluate_share(rows, gt_path, name, out_dir, shards, own_folders=False):
    gt_dict = json.load(open(gt_path))
    _, results = case(images=len(gt_dict["images"]))
    if name not in MetadataCatalog.list() or MetadataCatalog.get(name).get("json_file") is None:
        MetadataCatalog.get(name).set(json_file=gt_path, evaluator_type="lvis",
                                      thing_classes=[c["name"] for c in gt_dict["categories"]])
    logging.disable(logging.WARNING)
    per_image = _instances_per_image(gt_dict, results)
    image_ids = sorted(per_image)
    if own_folders:  # as machines that do not share the output folder
        out_dir = os.path.join(out_dir, f"rank{torch.distributed.get_rank()}")
    evaluator = LVISPerCategoryEvaluator(name, distributed=True, output_dir=out_dir if shards else None)
    evaluator.reset()
    for image_id in image_ids[rows]:
        evaluator.process([{"image_id": image_id}], [{"instances": per_image[image_id]}])
    distributed = evaluator.evaluate()
    single = None
    if torch.distributed.get_rank() == 0:
        alone = LVISPerCategoryEvaluator(name, distributed=False)
        alone.reset()
        for image_id in image_ids:
            alone.process([{"image_id": image_id}], [{"instances": per_image[image_id]}])
        single = alone.evaluate()
    return distributed, single


@pytest.mark.parametrize("shards,own_folders", [(True, False), (False, False), (True, True)])
def test_two_processes_give_the_single_process_numbers(tmp_path, shards, own_folders):
    """Shards in a shared folder, a gather without an output folder, and a gather when each
    process has its own folder (machines without a shared file system)."""
    gt_dict, _ = case()
    gt_path = write_json(tmp_path / "gt.json", gt_dict)
    out_dir = str(tmp_path / "out")
    rank0, rank1 = run_on_gloo_workers(
        _evaluate_share, len(gt_dict["images"]), gt_path=gt_path,
        name=f"eqltest_shards_{os.getpid()}_{shards}_{own_folders}", out_dir=out_dir,
        shards=shards, own_folders=own_folders)
    (distributed, single), (other, _) = rank0, rank1
    assert other is None
    assert set(distributed) == {"bbox", "segm"} and distributed == single
    assert distributed["bbox"]["AP"] > 0
    if own_folders:
        out_dir = os.path.join(out_dir, "rank0")
        assert os.listdir(os.path.join(out_dir, "..", "rank1", "detection_shards")) == []
    if shards:  # read and removed; the results file holds every detection
        assert os.listdir(os.path.join(out_dir, "detection_shards")) == []
        with open(os.path.join(out_dir, "lvis_instances_results.json")) as f:
            assert len(json.load(f)) == sum(len(i) for i in _instances_per_image(
                gt_dict, case()[1]).values())
