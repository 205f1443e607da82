"""Evaluation of long-tailed image classification: top-1 / top-5 accuracy and the many /
medium / few-shot accuracy of OLTR (Liu et al., CVPR 2019) and EQL (sec. 6, Tab. 9-10).

Shot groups are by a class's training images n: many n > 100, medium 20 <= n <= 100, few
n < 20. A group's accuracy is the mean of its classes' top-1 accuracies (OLTR's
``shot_acc``; on a balanced test set it equals the accuracy over the group's images);
classes without test images are left out. With ``output_dir``:

- ``per_class_accuracy.csv``: class, name, train_image_count, shot, test_images, top1, top5
  (percent);
- ``accuracy_vs_train_images.png``: each class's top-1 accuracy against its training
  images (log scale), coloured by shot group.
"""

import csv
import itertools
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from matplotlib.figure import Figure

from ..utils.io import atomic_write
from .plots import save_figure

__all__ = ["ClassificationEvaluator", "SHOT_GROUPS", "classification_metrics", "shot_group"]

logger = logging.getLogger(__name__)

SHOT_GROUPS = ("many", "medium", "few")
SHOT_COLORS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
TOP_K = 5


def shot_group(train_images: int) -> str:
    """"many" (> 100 training images), "medium" (20-100) or "few" (< 20)."""
    if train_images > 100:
        return "many"
    return "medium" if train_images >= 20 else "few"


def classification_metrics(labels: np.ndarray, top_k: np.ndarray,
                           train_image_counts: Optional[Sequence[int]], num_classes: int):
    """(metrics, per-class rows) from labels [N] and the top-k predicted classes [N, k]
    (best first). Accuracies in percent; metrics: top1, top5, mean_class_top1 and, with
    `train_image_counts`, many / medium / few."""
    labels = np.asarray(labels, dtype=np.int64)
    top_k = np.asarray(top_k, dtype=np.int64).reshape(len(labels), -1)
    hit1 = top_k[:, 0] == labels
    hit5 = (top_k[:, :TOP_K] == labels[:, None]).any(axis=1)
    images = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc1 = 100.0 * np.bincount(labels, hit1, minlength=num_classes) / images
        acc5 = 100.0 * np.bincount(labels, hit5, minlength=num_classes) / images
    tested = images > 0
    metrics = OrderedDict(
        top1=100.0 * float(hit1.mean()) if len(labels) else float("nan"),
        top5=100.0 * float(hit5.mean()) if len(labels) else float("nan"),
        mean_class_top1=float(acc1[tested].mean()) if tested.any() else float("nan"))
    groups = None
    if train_image_counts is not None:
        groups = [shot_group(int(n)) for n in train_image_counts]
        for group in SHOT_GROUPS:
            members = np.array([g == group for g in groups]) & tested
            metrics[group] = float(acc1[members].mean()) if members.any() else float("nan")
    rows = [{"class": k, "train_image_count": None if train_image_counts is None
             else int(train_image_counts[k]), "shot": None if groups is None else groups[k],
             "test_images": int(images[k]),
             "top1": float(acc1[k]) if tested[k] else float("nan"),
             "top5": float(acc5[k]) if tested[k] else float("nan")}
            for k in range(num_classes)]
    return metrics, rows


class ClassificationEvaluator(DatasetEvaluator):
    """detectron2 evaluator of :class:`~eql_d2.modeling.meta_arch.ImageClassifier`
    outputs (``{"scores": [C]}`` per image, ``"label"`` in the inputs); see module doc.

    Args:
        dataset_name: a registered classification split (its ``thing_classes``).
        train_image_counts: [C] training images per class (None: no shot groups); default
            the split's ``train_image_counts`` metadata.
        output_dir: folder of the CSV and the plot (None: not written).
        distributed: gather the predictions of every process before evaluating.
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None, *,
                 train_image_counts: Optional[Sequence[int]] = None, distributed: bool = True):
        meta = MetadataCatalog.get(dataset_name)
        self.dataset_name = dataset_name
        self.class_names = list(meta.get("thing_classes") or [])
        if train_image_counts is None:
            train_image_counts = meta.get("train_image_counts")
        if train_image_counts is not None and self.class_names \
                and len(train_image_counts) != len(self.class_names):
            raise ValueError(f"{dataset_name}: {len(train_image_counts)} train image counts "
                             f"for {len(self.class_names)} classes")
        self.train_image_counts = train_image_counts
        self.output_dir = output_dir
        self.distributed = distributed
        self.reset()

    def reset(self):
        self._labels: List[int] = []
        self._top_k: List[np.ndarray] = []
        self._num_classes = None

    def process(self, inputs, outputs):
        for x, y in zip(inputs, outputs):
            scores = y["scores"]
            self._num_classes = scores.numel()
            k = min(TOP_K, scores.numel())
            top = torch.topk(scores.detach().float().cpu(), k).indices.numpy()
            self._top_k.append(np.pad(top, (0, TOP_K - k), constant_values=-1))
            self._labels.append(int(x["label"]))

    def evaluate(self):
        labels, top_k = self._labels, self._top_k
        num_classes = self._num_classes
        if self.distributed:
            comm.synchronize()
            gathered = comm.gather((labels, top_k, num_classes), dst=0)
            if not comm.is_main_process():
                return {}
            labels = list(itertools.chain(*(g[0] for g in gathered)))
            top_k = list(itertools.chain(*(g[1] for g in gathered)))
            num_classes = next((g[2] for g in gathered if g[2] is not None), None)
        if not labels:
            logger.warning("%s: no predictions to evaluate", self.dataset_name)
            return {}
        num_classes = len(self.class_names) or num_classes
        metrics, rows = classification_metrics(np.array(labels), np.stack(top_k),
                                               self.train_image_counts, num_classes)
        if self.output_dir:
            self._write_outputs(rows)
        return OrderedDict(classification=metrics)

    def _write_outputs(self, rows: List[Dict]):
        os.makedirs(self.output_dir, exist_ok=True)
        for r in rows:
            r["name"] = self.class_names[r["class"]] if self.class_names else str(r["class"])
        fields = ["class", "name", "train_image_count", "shot", "test_images", "top1", "top5"]
        with atomic_write(os.path.join(self.output_dir, "per_class_accuracy.csv")) as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: (f"{r[k]:.2f}" if isinstance(r[k], float) else r[k])
                                 for k in fields})
        if self.train_image_counts is not None:
            plot_accuracy_vs_train_images(
                rows, os.path.join(self.output_dir, "accuracy_vs_train_images.png"),
                f"{self.dataset_name}: top-1 accuracy per class")


def plot_accuracy_vs_train_images(rows, path, title):
    """Scatter of per-class top-1 accuracy against training images (log x), coloured by
    shot group, with the 20 and 100 image boundaries; classes without test images or
    training images are not drawn."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for group in SHOT_GROUPS:
        points = [(r["train_image_count"], r["top1"]) for r in rows if r["shot"] == group
                  and r["train_image_count"] and not math.isnan(r["top1"])]
        if points:
            xs, ys = zip(*points)
            ax.scatter(xs, ys, s=18, alpha=0.8, color=SHOT_COLORS[group],
                       label=f"{group} ({len(xs)})")
    for boundary in (20, 100):
        ax.axvline(boundary, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("train images of the class (log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)
