#!/usr/bin/env python
"""Challenge-style ensembles: run or read N members, merge them, cap, write, evaluate.

A member is either a model (config + weights, run on the dataset, optionally with
test-time augmentation) or an existing LVIS results JSON:

    python tools/ensemble.py --dataset synthetic_lt_val --output-dir output/ensemble \\
        --member config=configs/Synthetic-LT/EQL/mask_rcnn_R18_FPN_eqlv2.yaml,weights=A.pth \\
        --member config=configs/Synthetic-LT/atss_R18_FPN_efl.yaml,weights=B.pth,tta=1 \\
        --member results=old_run/lvis_instances_results.json,weight=0.5 \\
        --method wbf --iou-thr 0.6 --tta-min-sizes 128 160 192

Member options (comma-separated key=value): ``config``+``weights`` or ``results``;
``weight`` (default 1); ``tta`` (0/1: horizontal flip and the --tta-min-sizes scales);
``calib`` (none | quantile: scores -> rank quantiles within the member); ``name``.

Model members run with detectron2's ``launch`` (``--num-gpus``, ``--num-machines``,
``--machine-rank``, ``--dist-url`` as in train_net.py); ``--opts`` go to every model
member's config (e.g. ``MODEL.DEVICE cuda``). With only results members, ``--json-file``
(annotation or image-info JSON, e.g. LVIS test-dev's) can replace ``--dataset``.

Writes into --output-dir:
- ``members/<name>/lvis_instances_results.json`` for model members (and each member's
  per-category evaluation there when ground truth exists);
- ``ensemble_results.json``: merged results, at most --max-dets per image (or, with
  --ap-fixed, the top --ap-fixed-dets-per-class per category and no per-image cap); a list
  ``lvis.LVISResults`` reads, ready to zip and submit for test-dev;
- ``inference/``: the ensemble's per-category CSV and plots; ``metrics.json`` last, with
  every member under ``members`` (``{}`` for one without detections, which is warned about)
  and its detection count under ``settings``.
Files appear only when complete (written under a temporary name, then renamed). Results
files with a non-finite score or box, or a box of negative size, are refused naming the
file and the detection; model members' weights must fit their config's model
(``MODEL.WEIGHTS_PARTIAL``, e.g. in --opts, loads what fits).
"""

import argparse
import logging
import os
import time
from collections import OrderedDict

from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import launch
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import eql_d2.modeling  # noqa: F401  (registers eql_d2's models)
from eql_d2.config import get_eql_cfg
from eql_d2.data import load_category_metadata, register_all
from eql_d2.engine.ema import load_prediction_weights
from eql_d2.engine.trainer import NUM_CLASSES_KEYS, prepare_datasets
from eql_d2.evaluation import LVISPerCategoryEvaluator, evaluate_lvis, read_lvis_results
from eql_d2.evaluation.ensemble import (METHODS, calibrate_quantile, cap_per_image,
                                        merge_results)
from eql_d2.evaluation.lvis_evaluation import top_k_per_category
from eql_d2.evaluation.tta import build_tta_model
from eql_d2.utils.io import write_json_atomic

logger = logging.getLogger("eql_d2.ensemble")

MEMBER_KEYS = {"config", "weights", "results", "weight", "tta", "calib", "name"}


def parse_member(text, index):
    """'key=value,...' -> dict with kind "model" or "results"; errors name the member."""
    where = f"--member #{index} ({text!r})"
    spec = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in MEMBER_KEYS:
            raise ValueError(f"{where}: '{part}' is not one of {sorted(MEMBER_KEYS)} as key=value")
        spec[key] = value.strip()
    if "results" in spec:
        if "config" in spec or "weights" in spec:
            raise ValueError(f"{where}: give either results=... or config=...,weights=..., not both")
        spec["kind"] = "results"
        default_name = os.path.splitext(os.path.basename(spec["results"]))[0]
    elif "config" in spec and "weights" in spec:
        spec["kind"] = "model"
        default_name = os.path.splitext(os.path.basename(spec["config"]))[0]
    else:
        raise ValueError(f"{where}: needs results=FILE or both config=FILE and weights=FILE")
    try:
        spec["weight"] = float(spec.get("weight", 1.0))
    except ValueError:
        raise ValueError(f"{where}: weight must be a number") from None
    if not spec["weight"] > 0:
        raise ValueError(f"{where}: weight must be > 0")
    if spec.get("tta", "0") not in ("0", "1"):
        raise ValueError(f"{where}: tta must be 0 or 1")
    spec["tta"] = spec.get("tta", "0") == "1"
    if spec["tta"] and spec["kind"] == "results":
        raise ValueError(f"{where}: tta applies to model members only")
    spec["calib"] = spec.get("calib", "none")
    if spec["calib"] not in ("none", "quantile"):
        raise ValueError(f"{where}: calib must be none or quantile")
    spec["name"] = spec.get("name") or f"m{index}_{default_name}{'_tta' if spec['tta'] else ''}"
    for key in ("config", "weights", "results"):
        if key in spec and not os.path.isfile(spec[key]):
            raise FileNotFoundError(f"{where}: {key} file not found: {spec[key]}")
    return spec


def member_cfg(spec, args):
    cfg = get_eql_cfg(spec["config"], args.opts)
    cfg.MODEL.WEIGHTS = spec["weights"]
    cfg.DATASETS.TEST = (args.dataset,)
    cfg.OUTPUT_DIR = os.path.join(args.output_dir, "members", spec["name"])
    if args.tta_min_sizes:
        cfg.TEST.AUG.MIN_SIZES = tuple(args.tta_min_sizes)
    if args.tta_max_size:
        cfg.TEST.AUG.MAX_SIZE = args.tta_max_size
    cfg.TEST.AUG.FLIP = not args.no_tta_flip
    cfg.freeze()
    return cfg


def _training_categories(name):
    """Category names of training set `name`, or None when they cannot be had without it:
    names already registered, else read from its JSON if that is on disk. A member runs
    from its config and weights alone, so a training set that is gone is no error."""
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is None:
        json_file = meta.get("json_file")
        if not json_file or not os.path.isfile(json_file):
            return None
        meta = load_category_metadata(name)
    names = meta.get("thing_classes")
    return None if names is None else list(names)


def check_model_member(spec, cfg, dataset_names, dataset_source):
    """Raise ValueError unless the member's model predicts the dataset's categories: its
    class count, and the category names of its training sets where those can be read."""
    where = f"member '{spec['name']}' ({spec['config']})"
    key = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    if key is None:
        raise ValueError(f"{where}: unknown meta-architecture {cfg.MODEL.META_ARCHITECTURE}; "
                         f"known: {sorted(NUM_CLASSES_KEYS)}")
    node = cfg
    for part in key.split("."):
        node = node[part]
    if node != len(dataset_names):
        raise ValueError(f"{where}: {key} = {node}, but {dataset_source} has "
                         f"{len(dataset_names)} categories")
    for train in cfg.DATASETS.TRAIN:
        names = _training_categories(train)
        if names is None:
            logger.info("%s: the categories of its training set '%s' are not available; "
                        "only their number is checked", where, train)
        elif names != list(dataset_names):
            diff = next((i for i, (a, b) in enumerate(zip(names, dataset_names)) if a != b),
                        min(len(names), len(dataset_names)))
            raise ValueError(
                f"{where}: trained on '{train}', whose categories differ from {dataset_source} "
                f"(first difference at category id {diff + 1}: "
                f"{names[diff] if diff < len(names) else None!r} vs "
                f"{dataset_names[diff] if diff < len(dataset_names) else None!r})")


def _setup_logging(args):
    for name in ("eql_d2", "detectron2"):
        setup_logger(args.output_dir, distributed_rank=comm.get_rank(), name=name)


def run_model_members(args):
    """Inference of every model member on args.dataset (inside detectron2's launch), then
    merging on the main process."""
    register_all()  # again: launch may have started this process afresh
    _setup_logging(args)
    specs = [s for s in args.specs if s["kind"] == "model"]
    for n, spec in enumerate(specs):
        cfg = member_cfg(spec, args)
        logger.info("Member %d/%d '%s': %s with %s%s", n + 1, len(specs), spec["name"],
                    spec["config"], spec["weights"], " + TTA" if spec["tta"] else "")
        prepare_datasets(cfg, training=False)
        model = build_model(cfg)
        load_prediction_weights(cfg, model, spec["weights"])
        model.eval()
        if spec["tta"]:
            model = build_tta_model(cfg, model)
        evaluator = LVISPerCategoryEvaluator(
            args.dataset, output_dir=cfg.OUTPUT_DIR, max_dets_per_image=args.max_dets,
            ap_fixed_dets_per_class=args.ap_fixed_dets_per_class if args.ap_fixed else 0,
            train_dataset_name=cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None,
            evaluate=args.eval_members)
        results = inference_on_dataset(model, build_detection_test_loader(cfg, args.dataset),
                                       evaluator)
        # every process sets the path; only the main one reads it
        spec["results"] = os.path.join(cfg.OUTPUT_DIR, "lvis_instances_results.json")
        spec["metrics"] = results or None
        comm.synchronize()
    if comm.is_main_process():
        merge_and_write(args, load_ground_truth(args), args.specs)


def load_ground_truth(args):
    from lvis import LVIS

    if args.dataset:
        json_file = load_category_metadata(args.dataset).get("json_file")
        if json_file is None:
            raise ValueError(f"Dataset '{args.dataset}' has no json_file in its metadata")
    else:
        json_file = args.json_file
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"Annotation JSON not found: {json_file}")
    gt = LVIS(json_file)
    gt.json_file = json_file
    return gt


class _Progress:
    def __init__(self, what, every_s=10.0):
        self.what, self.every_s, self.last = what, every_s, time.perf_counter()

    def __call__(self, done, total):
        now = time.perf_counter()
        if done == total or now - self.last >= self.every_s:
            logger.info("%s: %d/%d images", self.what, done, total)
            self.last = now


def merge_and_write(args, gt, specs):
    source = gt.json_file
    image_ids, cat_ids = gt.get_img_ids(), gt.get_cat_ids()
    has_gt = len(gt.get_ann_ids()) > 0
    members, metrics = [], OrderedDict(members=OrderedDict())
    for spec in specs:
        results = read_lvis_results(spec["results"], image_ids, cat_ids, source)
        logger.info("Member '%s': %d detections from %s", spec["name"], len(results), spec["results"])
        spec["num_detections"] = len(results)
        if spec["calib"] == "quantile":
            results = calibrate_quantile(results)
        members.append(results)
        if not results:
            logger.warning("Member '%s' has no detections (%s is an empty list): it adds "
                           "nothing to the ensemble", spec["name"], spec["results"])
            metrics["members"][spec["name"]] = spec.get("metrics") or {}
        elif spec.get("metrics") is not None:
            metrics["members"][spec["name"]] = spec["metrics"]
        elif has_gt and args.eval_members:
            metrics["members"][spec["name"]] = evaluate_lvis(
                gt, results, _tasks(results), max_dets_per_image=args.max_dets,
                ap_fixed_dets_per_class=args.ap_fixed_dets_per_class if args.ap_fixed else 0,
                output_dir=os.path.join(args.output_dir, "members", spec["name"]),
                title=spec["name"])

    images = {i: (img["width"], img["height"]) for i, img in gt.imgs.items()}
    merged = merge_results(members, images, method=args.method,
                           weights=[s["weight"] for s in specs], iou_thr=args.iou_thr,
                           skip_box_thr=args.skip_box_thr, sigma=args.sigma,
                           conf_type=args.conf_type, progress=_Progress(f"Merging ({args.method})"))
    if args.ap_fixed:
        merged = top_k_per_category(merged, args.ap_fixed_dets_per_class)
    else:
        merged = cap_per_image(merged, args.max_dets)
    merged.sort(key=lambda r: (r["image_id"], -r["score"]))
    out_json = os.path.join(args.output_dir, "ensemble_results.json")
    write_json_atomic(out_json, merged, allow_nan=False)
    logger.info("Wrote %d detections to %s", len(merged), out_json)

    if has_gt and merged:
        metrics["ensemble"] = evaluate_lvis(
            gt, merged, _tasks(merged), max_dets_per_image=args.max_dets,
            ap_fixed_dets_per_class=args.ap_fixed_dets_per_class if args.ap_fixed else 0,
            output_dir=os.path.join(args.output_dir, "inference"), title="ensemble")
        for name, m in list(metrics["members"].items()) + [("ensemble", metrics["ensemble"])]:
            for task, vals in m.items():
                logger.info("[%s %s] AP %.2f  AP50 %.2f  APr %.2f  APc %.2f  APf %.2f", name, task,
                            vals["AP"], vals["AP50"], vals["APr"], vals["APc"], vals["APf"])
    elif not has_gt:
        logger.info("%s has no annotations: results written, nothing evaluated", source)
    metrics["settings"] = {
        "members": [{k: v for k, v in s.items() if k != "metrics"} for s in specs],
        "method": args.method, "iou_thr": args.iou_thr, "skip_box_thr": args.skip_box_thr,
        "sigma": args.sigma, "conf_type": args.conf_type, "max_dets": args.max_dets,
        "ap_fixed": args.ap_fixed, "ap_fixed_dets_per_class": args.ap_fixed_dets_per_class,
    }
    write_json_atomic(os.path.join(args.output_dir, "metrics.json"), metrics)
    return metrics


def _tasks(results):
    return ("bbox", "segm") if all("segmentation" in r for r in results) else ("bbox",)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--member", action="append", required=True,
                   help="one member (repeat): config=...,weights=... or results=...")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--dataset", help="registered LVIS-type dataset (e.g. synthetic_lt_val)")
    where.add_argument("--json-file", help="annotation / image-info JSON (results members only)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--method", choices=METHODS, default="wbf")
    p.add_argument("--iou-thr", type=float, default=0.6, help="NMS / WBF IoU threshold")
    p.add_argument("--skip-box-thr", type=float, default=0.0,
                   help="WBF: ignore inputs below this score; soft-NMS: drop below it")
    p.add_argument("--sigma", type=float, default=0.5, help="Gaussian soft-NMS sigma")
    p.add_argument("--conf-type", default="avg",
                   choices=["avg", "max", "box_and_model_avg", "absent_model_aware_avg"],
                   help="WBF fused-score rule")
    p.add_argument("--max-dets", type=int, default=300, help="detections per image (LVIS: 300)")
    p.add_argument("--ap-fixed", action="store_true",
                   help="no per-image cap; keep the top --ap-fixed-dets-per-class per category")
    p.add_argument("--ap-fixed-dets-per-class", type=int, default=10000)
    p.add_argument("--tta-min-sizes", type=int, nargs="+",
                   help="TTA short-edge sizes (default: the member config's TEST.AUG.MIN_SIZES)")
    p.add_argument("--tta-max-size", type=int, help="TTA max size (default TEST.AUG.MAX_SIZE)")
    p.add_argument("--no-tta-flip", action="store_true", help="TTA without horizontal flip")
    p.add_argument("--no-eval-members", dest="eval_members", action="store_false",
                   help="do not evaluate members one by one")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs per machine")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="KEY VALUE pairs for every model member's config")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    register_all()
    specs = [parse_member(text, i) for i, text in enumerate(args.member)]
    names = [s["name"] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Member names must differ, got {names} (set name=... per member)")
    model_specs = [s for s in specs if s["kind"] == "model"]
    if model_specs and not args.dataset:
        raise ValueError("Model members run on a registered dataset: use --dataset, not --json-file")
    if args.max_dets <= 0 or args.ap_fixed_dets_per_class <= 0:
        raise ValueError("--max-dets and --ap-fixed-dets-per-class must be positive")
    gt = load_ground_truth(args)
    dataset_names = [c["name"] for c in sorted(gt.dataset["categories"], key=lambda c: c["id"])]
    for spec in model_specs:
        check_model_member(spec, member_cfg(spec, args), dataset_names, gt.json_file)
    # results members are checked before any model runs, so a bad file costs nothing
    for spec in specs:
        if spec["kind"] == "results":
            read_lvis_results(spec["results"], gt.get_img_ids(), gt.get_cat_ids(), gt.json_file)
    # everything checked: from here on the output folder fills
    os.makedirs(args.output_dir, exist_ok=True)
    args.specs = specs
    if model_specs:
        launch(run_model_members, args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
    else:
        _setup_logging(args)
        merge_and_write(args, gt, specs)


if __name__ == "__main__":
    main()
