"""Synthetic-OID: a generated Open-Images-like detection dataset, small enough for a CPU.

It is a Synthetic-LT dataset (:mod:`eql_d2.data.synthetic`, long-tailed train counts,
exhaustive val with federated negatives) rewritten as Open Images Challenge files, with what
Open Images adds to LVIS:

- **a class hierarchy with parents**: the first ``num_parents`` shapes are parent classes
  ("circle", "square", ...) of every leaf class of that shape; leaves of the other shapes
  are roots. Parents are classes of their own: a leaf instance is annotated with its parent
  instead, with probability ``parent_label_prob`` (a coarse label, as Open Images'
  annotators give where they cannot tell the leaf);
- **group-of boxes**: where a class has 2 or more instances on an image, with probability
  ``group_of_prob`` they get one box, the union of theirs, flagged IsGroupOf;
- **verified image-level labels**: positive for every class with a box, negative for the
  Synthetic-LT negatives (train: a few per image; val: the federated ones) and, with
  probability ``parent_negative_prob``, for a parent none of whose leaves is on the image;
  every other class is unverified there, and the evaluator ignores its detections;
- **a long tail over 5 groups**: the leaves' train image counts follow Synthetic-LT's
  curve; with 45 leaves and 5 parents, AP1..AP5 are groups of 10 classes.

Layout (the challenge's file names, under ``$EQL_D2_SYNTHETIC_OID_ROOT``, else
``$DETECTRON2_DATASETS/synthetic_oid``)::

    challenge2019/challenge-2019-classes-description-500.csv, ...-label500-hierarchy.json
    challenge2019/challenge-2019-{train,validation}-detection-bbox.csv
    challenge2019/challenge-2019-{train,validation}-detection-human-imagelabels.csv
    train/<ImageID>.png, val/<ImageID>.png        (Synthetic-LT's images and JSONs)
    synthetic_oid.json                             (the arguments; written last)

Registered as ``synthetic_oid_train`` and ``synthetic_oid_val`` (the CSV form, evaluated
by :class:`~eql_d2.evaluation.OIDEvaluator`) by
:func:`eql_d2.data.openimages.register_synthetic_oid`, generated on first use. Usage::

    python -m eql_d2.data.synthetic_oid --out datasets/synthetic_oid --seed 0
"""

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass

import numpy as np
from detectron2.data import DatasetCatalog

from ..utils.io import write_json_atomic
from .openimages import BBOX_HEADER, LABELS_HEADER, builtin_openimages_files, synthetic_oid_root

__all__ = ["SyntheticOIDSpec", "ensure_synthetic_oid", "generate"]

GENERATOR_VERSION = 1
MARKER = "synthetic_oid.json"


@dataclass(frozen=True)
class SyntheticOIDSpec:
    """Generator arguments (with the seed they fix every output byte)."""

    # leaf classes (Synthetic-LT categories) and parent classes (the first shapes)
    num_leaves: int = 45
    num_parents: int = 5
    image_size: int = 128
    # train images of the most frequent leaf (Synthetic-LT's curve below it)
    max_frequent_images: int = 200
    # val instances of every leaf at least
    val_instances: int = 10
    max_objects: int = 8
    parent_label_prob: float = 0.1
    group_of_prob: float = 0.5
    parent_negative_prob: float = 0.5
    seed: int = 0

    def base(self):
        return _synthetic().SyntheticLTSpec(
            num_categories=self.num_leaves, image_size=self.image_size,
            max_frequent_images=self.max_frequent_images, val_instances=self.val_instances,
            max_objects=self.max_objects, seed=self.seed)

    def validate(self):
        shapes = _synthetic().SHAPES
        if not 1 <= self.num_parents <= len(shapes):
            raise ValueError(f"num_parents={self.num_parents}: must be in "
                             f"[1, {len(shapes)}] (one per shape)")
        for key in ("parent_label_prob", "group_of_prob", "parent_negative_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key}={getattr(self, key)}: must be in [0, 1]")
        self.base().validate()


def _synthetic():
    """eql_d2.data.synthetic, imported on use (this module is imported when a Synthetic-OID
    split is first loaded, after the package)."""
    from . import synthetic

    return synthetic


def classes(spec):
    """(LabelNames, DisplayNames, parent index per class or None): parents first."""
    synthetic = _synthetic()
    table = synthetic.vocabulary(spec.base())
    shapes = synthetic.SHAPES[: spec.num_parents]
    mids = [f"/m/synthetic_{s}" for s in shapes]
    names = list(shapes)
    parent = [None] * len(shapes)
    for entry in table:
        name = synthetic._describe(entry)[0]
        mids.append(f"/m/synthetic_{name}")
        names.append(name)
        parent.append(shapes.index(entry[0]) if entry[0] in shapes else None)
    return mids, names, parent


def _hierarchy(mids, parent):
    children = {p: [] for p in range(len(parent)) if parent[p] is None}
    for k, p in enumerate(parent):
        if p is not None:
            children[p].append({"LabelName": mids[k]})
    nodes = []
    for p in sorted(children):
        node = {"LabelName": mids[p]}
        if children[p]:
            node["Subcategory"] = children[p]
        nodes.append(node)
    return {"LabelName": "/m/0bl9f", "Subcategory": nodes}


def _rewrite_split(lvis_json, neg_json, spec, mids, parent, rng):
    """(box rows, label rows) of one Synthetic-LT split; `neg_json` gives the negatives."""
    with open(lvis_json) as f:
        data = json.load(f)
    with open(neg_json) as f:
        negatives = {img["id"]: img.get("neg_category_ids", []) for img in json.load(f)["images"]}
    p = spec.num_parents
    by_image = {}
    for a in data["annotations"]:
        leaf = a["category_id"] - 1 + p
        by_image.setdefault(a["image_id"], {}).setdefault(leaf, []).append(a["bbox"])
    box_rows, label_rows = [], []
    for img in sorted(data["images"], key=lambda i: i["file_name"]):
        image_id = os.path.splitext(os.path.basename(img["file_name"]))[0]
        w, h = img["width"], img["height"]

        def row(cls, x0, y0, x1, y1, group_of):
            coords = [min(max(v, 0.0), 1.0) for v in (x0 / w, x1 / w, y0 / h, y1 / h)]
            box_rows.append([image_id, "synthetic", mids[cls], "1"]
                            + [f"{v:.6f}" for v in coords] + ["0", "0", str(group_of), "0", "0"])
            return cls

        boxed = set()
        for leaf, boxes in sorted(by_image.get(img["id"], {}).items()):
            if len(boxes) >= 2 and rng.random() < spec.group_of_prob:
                xs0 = min(b[0] for b in boxes)
                ys0 = min(b[1] for b in boxes)
                xs1 = max(b[0] + b[2] for b in boxes)
                ys1 = max(b[1] + b[3] for b in boxes)
                boxed.add(row(leaf, xs0, ys0, xs1, ys1, 1))
                continue
            for x, y, bw, bh in boxes:
                coarse = parent[leaf] is not None and rng.random() < spec.parent_label_prob
                boxed.add(row(parent[leaf] if coarse else leaf, x, y, x + bw, y + bh, 0))
        present = {parent[c] for c in boxed if parent[c] is not None} | boxed
        negative = {k - 1 + p for k in negatives[img["id"]]} - present
        for q in range(p):
            if q not in present and rng.random() < spec.parent_negative_prob:
                negative.add(q)
        label_rows += [[image_id, "verification", mids[c], "1"] for c in sorted(boxed)]
        label_rows += [[image_id, "verification", mids[c], "0"] for c in sorted(negative)]
    return box_rows, label_rows


def _write_rows(path, header, rows):
    with open(path, "w", newline="") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join(r) + "\n")


def generate(out_dir, spec=None):
    """Generate Synthetic-OID into `out_dir` (replaced if present); returns `out_dir`."""
    spec = spec or SyntheticOIDSpec()
    spec.validate()
    out_dir = os.path.abspath(out_dir)
    marker = os.path.join(out_dir, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    _synthetic().generate(out_dir, spec.base())
    mids, names, parent = classes(spec)
    files = builtin_openimages_files(out_dir, "train")
    folder = os.path.dirname(files["classes_csv"])
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    with open(files["classes_csv"], "w", newline="") as f:
        f.write("".join(f"{m},{n}\n" for m, n in zip(mids, names)))
    write_json_atomic(files["hierarchy_json"], _hierarchy(mids, parent), indent=1)
    rng = np.random.default_rng([spec.seed, 23])
    for split, base, neg in (("train", "lvis_v1_train.json", "lvis_v1_train.json"),
                             ("validation", "lvis_v1_val.json", "lvis_v1_val_fed.json")):
        box_rows, label_rows = _rewrite_split(os.path.join(out_dir, base),
                                              os.path.join(out_dir, neg), spec, mids, parent, rng)
        f = builtin_openimages_files(out_dir, split)
        _write_rows(f["bbox_csv"], BBOX_HEADER, box_rows)
        _write_rows(f["labels_csv"], LABELS_HEADER, label_rows)
    write_json_atomic(marker, {"version": GENERATOR_VERSION, **asdict(spec)})
    return out_dir


def ensure_synthetic_oid(root=None, spec=None):
    """`root` (default :func:`synthetic_oid_root`) holding a complete Synthetic-OID of
    `spec` (default: the one recorded there, else :class:`SyntheticOIDSpec()`),
    generating it when absent, incomplete or from another generator version."""
    root = root or synthetic_oid_root()
    try:
        with open(os.path.join(root, MARKER)) as f:
            have = json.load(f)
    except (OSError, ValueError):
        have = None
    if have is not None and have.get("version") == GENERATOR_VERSION and \
            (spec is None or {**asdict(spec), "version": GENERATOR_VERSION} == have):
        return root
    if spec is None and have is not None:
        spec = SyntheticOIDSpec(**{k: v for k, v in have.items() if k != "version"})
    return generate(root, spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=synthetic_oid_root())
    defaults = SyntheticOIDSpec()
    for key, value in asdict(defaults).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    generate(out, SyntheticOIDSpec(**args))
    print(f"Synthetic-OID written to {out}")


if __name__ == "__main__":
    sys.exit(main())
