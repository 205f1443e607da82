"""LVIS evaluation that shows each category: standard AP, optional AP-fixed, per-category CSV
and plots.

:func:`evaluate_lvis` runs one LVIS evaluation per task (bbox, segm) and reads both the
summary numbers detectron2 reports (AP, AP50, AP75, APs/m/l, APr/c/f) and the per-category
AP out of that same run. :class:`LVISPerCategoryEvaluator` is detectron2's LVISEvaluator
with that evaluation in place of its own, so ``--eval-only`` and evaluation during training
also write, per task, into the evaluator's output folder:

- ``per_category_<task>.csv``: category_id, name, frequency, train_image_count, AP,
  num_detections (and AP_fixed, num_detections_fixed with AP-fixed);
- ``ap_vs_train_images_<task>.png``: per-category AP against train image count (log x);
- ``ap_by_frequency_<task>.png``: AP, APr, APc, APf (and their AP-fixed values).

Two backends give the same numbers (``backend``, config ``TEST.EVAL.BACKEND``): "fast"
(:class:`~eql_d2.evaluation.fast_lvis.FastLVISEval`, faster-coco-eval's C++ matching and
accumulation with lvis-api's rules) and "lvis" (``lvis.LVISEval`` itself, the reference).

AP-fixed is Dave et al., "Evaluating Large-Vocabulary Object Detectors: The Devil is in the
Details" (2021): no per-image cap, and only the top K (10,000) detections of each category
over the whole dataset are kept; it is reported beside standard AP as ``AP-fixed``,
``APr-fixed``, ... in the same task dict.
"""

import contextlib
import copy
import csv
import itertools
import logging
import math
import os
from collections import Counter, OrderedDict

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import LVISEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from ..utils.io import atomic_write
from .detections import DetectionArrays, load_shards, save_shard, shard_path
from .plots import plot_ap_by_frequency, plot_ap_vs_train_images
from .results_io import top_k_per

__all__ = [
    "LVIS_BACKENDS",
    "LVIS_METRICS",
    "LVISPerCategoryEvaluator",
    "evaluate_lvis",
    "numpy_float_alias",
    "per_category_ap",
    "read_per_category_ap",
    "top_k_per_category",
    "train_image_counts_from_metadata",
]

logger = logging.getLogger(__name__)

LVIS_BACKENDS = ("fast", "lvis")
LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
CSV_FIELDS = ["category_id", "name", "frequency", "train_image_count", "AP", "num_detections"]


def top_k_per_category(results, k):
    """The `k` highest-scoring detections of each category over the whole result list."""
    return top_k_per(results, "category_id", k)


@contextlib.contextmanager
def numpy_float_alias():
    """``np.float`` (= ``float``) for the length of the block, when numpy lacks it.

    lvis 0.5.3, the version detectron2's LVISEvaluator is written for, calls ``np.float``
    in ``LVISEval.accumulate``; numpy 1.24 removed that alias. It is added around the LVIS
    call only and removed afterwards, so no other code sees a patched numpy.
    """
    if hasattr(np, "float"):
        yield
        return
    np.float = float
    try:
        yield
    finally:
        del np.float


def _fast_backend_usable(lvis_gt):
    """Whether the "fast" backend can evaluate `lvis_gt` here; says why not."""
    from .fast_lvis import supports

    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        logger.warning("TEST.EVAL.BACKEND fast needs the faster-coco-eval package "
                       "(tools/install.sh installs it); evaluating with lvis-api")
        return False
    if not supports(lvis_gt):
        logger.warning("The ground truth has 'ignore' flags, which only lvis-api honours; "
                       "evaluating with lvis-api")
        return False
    return True


def _run_lvis_eval(lvis_gt, results, iou_type, max_dets, backend="lvis", index=None):
    """One evaluation run; `max_dets` < 0 removes the per-image cap. `results`: a results list
    or :class:`DetectionArrays` (then `index` may select some of them). Returns the LVISEval
    (backend "lvis") or the FastLVISEval ("fast") after run()."""
    if backend not in LVIS_BACKENDS:
        raise ValueError(f"LVIS evaluation backend {backend!r}: expected one of {LVIS_BACKENDS}")
    if backend == "fast" and _fast_backend_usable(lvis_gt):
        from .fast_lvis import FastLVISEval

        fast_eval = FastLVISEval(lvis_gt, results, iou_type, max_dets, index=index)
        fast_eval.run()
        return fast_eval

    from lvis import LVISEval, LVISResults

    if isinstance(results, DetectionArrays):
        # as detectron2: without a bbox, LVIS takes the mask area for the s/m/l ranges
        results = list(results.dicts(index, bbox=iou_type == "bbox" or not results.has_masks))
    else:
        # LVISResults writes ids, areas and (for boxes) polygons into the dicts it gets
        results = [dict(r) for r in results]
        if iou_type == "segm":
            for r in results:
                r.pop("bbox", None)
    lvis_dt = LVISResults(lvis_gt, results, max_dets=max_dets)
    lvis_eval = LVISEval(lvis_gt, lvis_dt, iou_type)
    lvis_eval.params.max_dets = max_dets
    with numpy_float_alias():
        lvis_eval.run()
    return lvis_eval


def per_category_ap(lvis_eval):
    """{category_id: AP in [0, 1], NaN without ground truth} from an LVISEval after run().

    The mean over IoU thresholds and recall thresholds of ``eval["precision"]`` for area
    "all", entries of -1 (no ground truth) left out: what LVISEval averages into AP.
    """
    precision = lvis_eval.eval["precision"]  # [T, R, K, A]
    all_area = lvis_eval.params.area_rng_lbl.index("all")
    out = {}
    for k, cat_id in enumerate(lvis_eval.params.cat_ids):
        p = precision[:, :, k, all_area]
        p = p[p > -1]
        out[cat_id] = float(np.mean(p)) if p.size else float("nan")
    return out


def _evaluate_task(lvis_gt, results, iou_type, max_dets, backend, index=None):
    """(metrics in percent, per-category AP in [0, 1], detections per category)."""
    if len(results) == 0 or (index is not None and len(index) == 0):
        return ({m: float("nan") for m in LVIS_METRICS},
                {c: float("nan") for c in lvis_gt.get_cat_ids()}, Counter())
    lvis_eval = _run_lvis_eval(lvis_gt, results, iou_type, max_dets, backend, index)
    lvis_eval.print_results()
    summary = lvis_eval.get_results()
    metrics = {m: float(summary[m] * 100) for m in LVIS_METRICS}
    if hasattr(lvis_eval, "num_detections"):
        counts = lvis_eval.num_detections
    else:
        counts = Counter(a["category_id"] for a in lvis_eval.lvis_dt.dataset["annotations"])
    return metrics, per_category_ap(lvis_eval), counts


def _train_counts_from_gt(lvis_gt):
    return {c["id"]: c.get("image_count") for c in lvis_gt.dataset["categories"]}


def train_image_counts_from_metadata(train_dataset_name, lvis_gt):
    """{category_id: train images} from a training dataset's ``class_image_count``, or None
    when that dataset has no counts or other category names than `lvis_gt`.

    Reads the MetadataCatalog only: evaluation without the training data (``--eval-only``
    of a model whose training set is not loaded, registered or on disk) gets None, and the
    evaluated JSON's ``image_count`` is used instead."""
    if not train_dataset_name:
        return None
    meta = MetadataCatalog.get(train_dataset_name)
    counts, names = meta.get("class_image_count"), meta.get("thing_classes")
    gt_names = [c["name"] for c in sorted(lvis_gt.dataset["categories"], key=lambda c: c["id"])]
    if counts is None or names is None or list(names) != gt_names:
        return None
    return {c["id"]: c["image_count"] for c in counts}


def _write_csv(rows, fields, path):
    with atomic_write(path) as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if isinstance(r[k], float) and math.isnan(r[k])
                                 else round(r[k], 4) if isinstance(r[k], float) else r[k])
                             for k in fields})


def read_per_category_ap(path):
    """{category_id: (frequency group, AP in %)} from a ``per_category_<task>.csv`` written by
    :func:`evaluate_lvis`, categories without an AP (no ground truth: empty, NaN or negative)
    left out."""
    out = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category_id", "frequency", "AP"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a per-category AP table (no column "
                             f"{', '.join(sorted(missing))})")
        for row in reader:
            ap = float(row["AP"]) if row["AP"] not in ("", "nan") else math.nan
            if not math.isnan(ap) and ap >= 0:
                out[int(row["category_id"])] = (row["frequency"], ap)
    return out


def evaluate_lvis(lvis_gt, results, iou_types=("bbox",), *, max_dets_per_image=300,
                  ap_fixed_dets_per_class=0, train_image_counts=None, output_dir=None,
                  title="", backend="fast"):
    """Evaluate LVIS-format `results` against `lvis_gt` (an ``lvis.LVIS``).

    Args:
        results: list of LVIS result dicts or :class:`DetectionArrays`, category ids as in
            the annotation JSON.
        iou_types: tasks, "bbox" and/or "segm".
        max_dets_per_image: per-image cap of standard AP (LVIS: 300).
        ap_fixed_dets_per_class: K > 0 also computes AP-fixed (no per-image cap, top K per
            category over the dataset), reported as "<metric>-fixed".
        train_image_counts: {category_id: train images} for the CSV and plot; default the
            ``image_count`` field of the annotation JSON's categories.
        output_dir: where the per-category CSV and PNG plots go (None: not written).
        title: prefix of the plot titles (e.g. the dataset name).
        backend: "fast" (faster-coco-eval with lvis-api's rules) or "lvis" (lvis-api);
            both give the same numbers.

    Returns:
        OrderedDict {task: {metric: value in percent}}, metrics as detectron2 names them.
        The evaluation runs once per task (twice with AP-fixed).
    """
    counts = train_image_counts or _train_counts_from_gt(lvis_gt)
    cats = sorted(lvis_gt.dataset["categories"], key=lambda c: c["id"])
    fixed = fixed_index = None
    if ap_fixed_dets_per_class > 0:
        if isinstance(results, DetectionArrays):
            fixed, fixed_index = results, results.top_k_per("category_id", ap_fixed_dets_per_class)
        else:
            fixed = top_k_per_category(results, ap_fixed_dets_per_class)
    out = OrderedDict()
    for task in iou_types:
        logger.info("Evaluating %s with at most %d detections per image", task, max_dets_per_image)
        metrics, cat_ap, num_dets = _evaluate_task(lvis_gt, results, task, max_dets_per_image, backend)
        fields = list(CSV_FIELDS)
        if fixed is not None:
            logger.info("Evaluating %s AP-fixed: no per-image cap, top %d per category",
                        task, ap_fixed_dets_per_class)
            m_fixed, cat_ap_fixed, num_fixed = _evaluate_task(lvis_gt, fixed, task, -1, backend,
                                                                fixed_index)
            metrics.update({f"{k}-fixed": v for k, v in m_fixed.items()})
            fields += ["AP_fixed", "num_detections_fixed"]
        logger.info("Evaluation results for %s: \n%s", task, create_small_table(metrics))
        out[task] = metrics
        if output_dir is None:
            continue
        rows = []
        for c in cats:
            row = {"category_id": c["id"], "name": c["name"], "frequency": c.get("frequency", ""),
                   "train_image_count": counts.get(c["id"]) if counts.get(c["id"]) is not None else "",
                   "AP": cat_ap[c["id"]] * 100, "num_detections": num_dets[c["id"]]}
            if fixed is not None:
                row["AP_fixed"] = cat_ap_fixed[c["id"]] * 100
                row["num_detections_fixed"] = num_fixed[c["id"]]
            rows.append(row)
        _write_csv(rows, fields, os.path.join(output_dir, f"per_category_{task}.csv"))
        head = f"{title} {task}".strip()
        plot_ap_vs_train_images(
            rows, os.path.join(output_dir, f"ap_vs_train_images_{task}.png"),
            f"{head}: AP {metrics['AP']:.1f} (APr {metrics['APr']:.1f}, "
            f"APc {metrics['APc']:.1f}, APf {metrics['APf']:.1f})")
        plot_ap_by_frequency(metrics, os.path.join(output_dir, f"ap_by_frequency_{task}.png"),
                             f"{head}: AP by frequency group")
    return out


def detections_of_instances(instances, image_id):
    """:class:`DetectionArrays` of one image's predicted ``Instances`` (on the CPU), with the
    values detectron2's ``instances_to_coco_json`` gives: float32 boxes as XYWH, float32
    scores, contiguous class indices, one compressed RLE per mask."""
    n = len(instances)
    boxes = BoxMode.convert(instances.pred_boxes.tensor.numpy(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
    masks = {}
    if instances.has("pred_masks"):
        import pycocotools.mask as mask_utils

        rles = [mask_utils.encode(np.array(m[:, :, None], order="F", dtype="uint8"))[0]
                for m in instances.pred_masks]
        lengths = [len(r["counts"]) for r in rles]
        masks = dict(rle_counts=np.frombuffer(b"".join(r["counts"] for r in rles), np.uint8),
                     rle_offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
                     rle_size=np.array([r["size"] for r in rles], np.int64).reshape(-1, 2))
    return DetectionArrays(np.full(n, image_id), instances.pred_classes.numpy(),
                           instances.scores.numpy(), boxes, **masks)


class LVISPerCategoryEvaluator(LVISEvaluator):
    """detectron2's LVISEvaluator whose evaluation also writes per-category outputs, and
    whose detections stay compact from the model to the evaluation.

    Each process keeps its detections as :class:`~eql_d2.evaluation.detections.DetectionArrays`
    (not one dict per detection). In a distributed evaluation with an ``output_dir`` every
    process writes them to a shard, ``<output_dir>/detection_shards/``, and the main process
    reads the shards (removed afterwards; a cut-short or foreign shard is an error that names
    it) instead of gathering everyone's predictions through its memory. Without an
    ``output_dir``, or when some process does not see every shard (an output folder per
    machine), the compact arrays are gathered instead. ``lvis_instances_results.json`` is
    written from them chunk by chunk.

    Args (besides LVISEvaluator's):
        max_dets_per_image: per-image cap of standard AP (LVIS: 300).
        ap_fixed_dets_per_class: K > 0 also reports AP-fixed (see module docstring).
        train_dataset_name: dataset whose ``class_image_count`` gives the train image count
            of each category (default: the ``image_count`` of the evaluated JSON's
            categories, which LVIS val carries from train).
        per_category_outputs: write the CSV and plots into ``output_dir``.
        evaluate: False only writes the results file (as for a split without annotations).
        backend: "fast" or "lvis" (see :func:`evaluate_lvis`).
    """

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *,
                 max_dets_per_image=300, ap_fixed_dets_per_class=0, train_dataset_name=None,
                 per_category_outputs=True, evaluate=True, backend="fast"):
        if backend not in LVIS_BACKENDS:
            raise ValueError(f"LVIS evaluation backend {backend!r}: expected one of {LVIS_BACKENDS}")
        super().__init__(dataset_name, tasks, distributed, output_dir,
                         max_dets_per_image=max_dets_per_image)
        self._do_evaluation = self._do_evaluation and evaluate
        self._dataset_name = dataset_name
        self._ap_fixed_dets_per_class = ap_fixed_dets_per_class
        self._train_dataset_name = train_dataset_name
        self._per_category_outputs = per_category_outputs
        self._backend = backend

    def reset(self):
        self._predictions = []  # DetectionArrays, one per image with instances
        self._image_ids = []
        self._proposals = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            self._image_ids.append(inp["image_id"])
            if "instances" in out:
                self._predictions.append(detections_of_instances(
                    out["instances"].to(self._cpu_device), inp["image_id"]))
            if "proposals" in out:
                self._proposals.append({"image_id": inp["image_id"],
                                        "proposals": out["proposals"].to(self._cpu_device)})

    def _collect(self, local, with_instances):
        """(every process's detections, evaluated image ids, proposals, whether any process
        had instances) on the main process; (None, ...) on the others."""
        if not self._distributed or comm.get_world_size() == 1:
            return local, np.asarray(self._image_ids, np.int64), self._proposals, with_instances
        rank, world = comm.get_rank(), comm.get_world_size()
        token = comm.shared_random_seed()  # this evaluation's, the same in every process
        comm.synchronize()
        flags = comm.gather(with_instances, dst=0)
        proposals = comm.gather(self._proposals, dst=0)
        shared = False
        if self._output_dir:
            folder = os.path.join(self._output_dir, "detection_shards")
            save_shard(local, folder, rank, world, token, self._image_ids)
            comm.synchronize()
            # every process must see every shard: not so with an output folder per machine
            paths = [shard_path(folder, r, world) for r in range(world)]
            shared = all(comm.all_gather(all(os.path.isfile(p) for p in paths)))
            if not shared:
                os.remove(paths[rank])
                if comm.is_main_process():
                    self._logger.warning(
                        "Some processes do not see the detection shards of the others in %s "
                        "(an output folder per machine?): gathering the detections through "
                        "process 0 instead", folder)
        if shared:
            if not comm.is_main_process():
                return None, None, None, None
            detections, image_ids = load_shards(folder, world, token)
            for p in paths:
                os.remove(p)
        else:
            parts = comm.gather((local, np.asarray(self._image_ids, np.int64)), dst=0)
            if not comm.is_main_process():
                return None, None, None, None
            detections = DetectionArrays.concatenate([d for d, _ in parts])
            image_ids = np.concatenate([i for _, i in parts])
        return detections, image_ids, list(itertools.chain(*proposals)), any(flags)

    def evaluate(self):
        local = DetectionArrays.concatenate(self._predictions)
        detections, image_ids, proposals, with_instances = self._collect(
            local, bool(self._predictions))
        if image_ids is None:
            return None
        if len(image_ids) == 0:
            self._logger.warning("[LVISEvaluator] Did not receive valid predictions.")
            return {}
        self._results = OrderedDict()
        if proposals:
            self._eval_box_proposals(proposals)
        if with_instances:
            self._eval_predictions(detections)
        return copy.deepcopy(self._results)

    def _dataset_category_ids(self, detections):
        """`detections` with the annotation JSON's category ids (from contiguous indices)."""
        id_map = self._metadata.get("thing_dataset_id_to_contiguous_id")
        if id_map is not None:
            return detections.map_categories({v: k for k, v in id_map.items()})
        # LVIS-format datasets: class index = category id - 1
        return detections.with_category_ids(detections.category_id + 1)

    def _eval_predictions(self, detections):
        detections = self._dataset_category_ids(detections)
        tasks = self._tasks or (("bbox", "segm") if detections.has_masks else ("bbox",))
        if self._output_dir:
            path = os.path.join(self._output_dir, "lvis_instances_results.json")
            self._logger.info("Saving results to %s", path)
            detections.write_json(PathManager.get_local_path(path))
        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return
        counts = train_image_counts_from_metadata(self._train_dataset_name, self._lvis_api)
        write_to = self._output_dir if self._per_category_outputs else None
        self._results.update(copy.deepcopy(evaluate_lvis(
            self._lvis_api, detections, sorted(tasks),
            max_dets_per_image=self._max_dets_per_image,
            ap_fixed_dets_per_class=self._ap_fixed_dets_per_class,
            train_image_counts=counts, output_dir=write_to, title=self._dataset_name,
            backend=self._backend)))
