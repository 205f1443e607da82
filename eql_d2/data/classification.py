"""Long-tailed image classification datasets (EQL, sec. 6) registered the detectron2 way.

- **CIFAR-100-LT** from the official CIFAR-100 python pickles (``train``, ``test``, ``meta``
  in ``$DETECTRON2_DATASETS/cifar-100-python``): class i keeps the first
  n_i = int(500 * (1 / IF)^(i / 99)) of its training images in file order (Cui et al.,
  CVPR 2019; IF = 200 gives 9502 images, 500 down to 2), the test set is unchanged.
  Registered: ``cifar100_lt_train`` / ``cifar100_lt_test`` (IF 200, the paper's) and
  ``cifar100_lt_if100_*``, ``cifar100_lt_if50_*``, ``cifar100_lt_if10_*``.
- **ImageNet-LT** from OLTR's split files (``ImageNet_LT_train.txt``, ``_val``, ``_test`` in
  ``$DETECTRON2_DATASETS/ImageNet_LT``; lines ``<path relative to the ImageNet folder>
  <label>``) over an ImageNet folder (``$DETECTRON2_DATASETS/imagenet``, holding ``train/``
  and ``val/``): ``imagenet_lt_train``, ``imagenet_lt_val``, ``imagenet_lt_test``.
- **Synthetic-CLS-LT**, generated offline: 32 px crops of single objects drawn by the
  Synthetic-LT generator (:mod:`eql_d2.data.synthetic`; 100 classes, each a (shape,
  colour, texture) triple), train counts of the CIFAR-100-LT profile, a balanced test set.
  Generated once (under two minutes) into ``$EQL_D2_SYNTHETIC_CLS_LT_ROOT`` (default
  ``$DETECTRON2_DATASETS/synthetic_cls_lt``): ``synthetic_cls_lt_train`` / ``_test``;
  other seeds or sizes with ``python -m eql_d2.data.classification --out DIR --seed S``.

A split's dataset dicts hold ``label`` (0..C-1), ``image_id`` and either ``image`` (a
uint8 [H, W, 3] RGB array: CIFAR and the generated set) or ``file_name`` (ImageNet-LT).
Its metadata (set by :func:`prepare_classification_datasets`, which ``train_net.py`` runs
before building the model) holds ``evaluator_type "classification"``, ``thing_classes``,
``train_image_counts`` (the per-class images of the split's training set, for the
many / medium / few-shot groups) and, for a training split, ``class_image_count`` and
``num_train_images`` (the class frequencies SEQL reads).
"""

import argparse
import functools
import json
import logging
import os
import pickle
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm
from PIL import Image
from torchvision import transforms as T

from ..utils.io import atomic_directory, atomic_write
from . import synthetic

__all__ = [
    "ClassificationDatasetMapper", "ClassificationSplit", "Cutout", "SyntheticClsSpec",
    "cifar100_lt_root", "ensure_synthetic_cls_lt", "generate_synthetic_cls_lt",
    "imagenet_lt_root", "imagenet_root", "is_classification", "load_cifar100_lt",
    "load_imagenet_lt", "long_tailed_counts", "parse_imagenet_lt_split",
    "prepare_classification_datasets", "read_cifar100", "register_classification_datasets",
    "synthetic_cls_lt_root",
]

logger = logging.getLogger(__name__)

# Meta-architectures trained on these datasets (train_net.py picks the trainer by it).
CLASSIFICATION_META_ARCHS = ("ImageClassifier",)


def is_classification(cfg) -> bool:
    """Whether the config trains an image classifier."""
    return cfg.MODEL.META_ARCHITECTURE in CLASSIFICATION_META_ARCHS


def _datasets_root() -> str:
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


# ----------------------------------------------------------------------------- profile


def long_tailed_counts(max_images: int, imbalance_factor: float, num_classes: int) -> List[int]:
    """Images of class i: int(max_images * (1 / IF)^(i / (C - 1))), the exponential profile
    of Cui et al. (CVPR 2019) that CIFAR-100-LT is made with (truncated, not rounded)."""
    if num_classes < 2 or max_images < 1 or imbalance_factor < 1:
        raise ValueError(f"long-tailed profile needs num_classes >= 2, max_images >= 1 and "
                         f"imbalance_factor >= 1, got {num_classes}, {max_images}, "
                         f"{imbalance_factor}")
    return [int(max_images * (1.0 / imbalance_factor) ** (i / (num_classes - 1.0)))
            for i in range(num_classes)]


def _counts_per_class(labels: Sequence[int], num_classes: int) -> List[int]:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()


# ----------------------------------------------------------------------------- CIFAR-100-LT

CIFAR100_IMAGES_PER_CLASS = 500
# registered name prefix -> imbalance factor
CIFAR100_LT = {"cifar100_lt": 200, "cifar100_lt_if100": 100, "cifar100_lt_if50": 50,
               "cifar100_lt_if10": 10}


def cifar100_lt_root() -> str:
    """``$DETECTRON2_DATASETS/cifar-100-python``: the folder the official tarball unpacks."""
    return os.path.join(_datasets_root(), "cifar-100-python")


def _read_pickle(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path} (the official CIFAR-100 python "
                                "version, cifar-100-python.tar.gz, unpacks train, test, meta)")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a CIFAR-100 python pickle ({e})") from e


def read_cifar100(root: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 3] (RGB) and fine labels [N] of CIFAR-100's `split`
    ("train" or "test") pickle in `root`; errors name the file and key."""
    path = os.path.join(root, split)
    data = _read_pickle(path, f"CIFAR-100 {split} file")
    for key in ("data", "fine_labels"):
        if key not in data:
            raise ValueError(f"{path}: no '{key}' entry (keys: {sorted(data)})")
    images = np.asarray(data["data"], dtype=np.uint8)
    labels = np.asarray(data["fine_labels"], dtype=np.int64)
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(images) != len(labels):
        raise ValueError(f"{path}: 'data' has shape {images.shape} for {len(labels)} labels; "
                         "expected [N, 3072] rows of 32 x 32 RGB planes")
    if labels.size and (labels.min() < 0 or labels.max() > 99):
        raise ValueError(f"{path}: 'fine_labels' outside 0..99 "
                         f"(min {labels.min()}, max {labels.max()})")
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def cifar100_lt_indices(labels: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Indices of the first counts[c] images of each class c, in file order."""
    keep = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise ValueError(f"class {c} has {len(idx)} training images, the profile needs {n}")
        keep.append(idx[:n])
    return np.sort(np.concatenate(keep))


def load_cifar100_lt(root: str, split: str, imbalance_factor: float) -> List[Dict]:
    """Dataset dicts of CIFAR-100-LT: the profile's subset of "train", or all of "test"."""
    images, labels = read_cifar100(root, split)
    if split == "train":
        keep = cifar100_lt_indices(labels, long_tailed_counts(
            CIFAR100_IMAGES_PER_CLASS, imbalance_factor, 100))
    else:
        keep = np.arange(len(labels))
    return [{"image": images[i], "label": int(labels[i]), "image_id": int(i)} for i in keep]


# ----------------------------------------------------------------------------- ImageNet-LT

IMAGENET_LT_SPLITS = ("train", "val", "test")


def imagenet_lt_root() -> str:
    """``$DETECTRON2_DATASETS/ImageNet_LT``: OLTR's ``ImageNet_LT_<split>.txt`` files."""
    return os.path.join(_datasets_root(), "ImageNet_LT")


def imagenet_root() -> str:
    """``$DETECTRON2_DATASETS/imagenet``: the ImageNet folder the split files' paths start in."""
    return os.path.join(_datasets_root(), "imagenet")


def parse_imagenet_lt_split(path: str) -> List[Tuple[str, int]]:
    """(relative image path, label) of each line of an OLTR split file; errors name the
    file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ImageNet-LT split file not found: {path} (OLTR's "
                                "ImageNet_LT_train.txt, _val.txt, _test.txt)")
    entries = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(f"{path}, line {number}: expected '<image path> <label>', "
                                 f"got {line.strip()!r}")
            try:
                label = int(fields[1])
            except ValueError:
                raise ValueError(f"{path}, line {number}: label {fields[1]!r} is not an "
                                 "integer") from None
            if label < 0:
                raise ValueError(f"{path}, line {number}: negative label {label}")
            entries.append((fields[0], label))
    if not entries:
        raise ValueError(f"{path}: no images listed")
    return entries


def load_imagenet_lt(split_file: str, image_root: str) -> List[Dict]:
    """Dataset dicts (``file_name`` under `image_root`, ``label``) of an OLTR split file.
    Missing training images are reported by the trainer before training starts
    (DATALOADER.CHECK_IMAGE_FILES)."""
    return [{"file_name": os.path.join(image_root, rel), "label": label, "image_id": i}
            for i, (rel, label) in enumerate(parse_imagenet_lt_split(split_file))]


def _imagenet_class_names(entries, num_classes):
    """The WordNet id of each label (the folder its training images are in)."""
    names = [None] * num_classes
    for rel, label in entries:
        if names[label] is None:
            parts = rel.replace("\\", "/").split("/")
            names[label] = parts[-2] if len(parts) >= 2 else f"class_{label}"
    return [n or f"class_{k}" for k, n in enumerate(names)]


# ----------------------------------------------------------------------------- generated


@dataclass(frozen=True)
class SyntheticClsSpec:
    """Generator arguments of Synthetic-CLS-LT (with the seed they fix every byte).

    Train images per class follow :func:`long_tailed_counts` (max_images,
    imbalance_factor); the test set has ``test_per_class`` images of every class.
    """

    num_classes: int = 100
    max_images: int = 500
    imbalance_factor: float = 200.0
    test_per_class: int = 50
    image_size: int = 32
    seed: int = 0

    def validate(self):
        if not 2 <= self.num_classes <= synthetic.MAX_CATEGORIES:
            raise ValueError(f"num_classes={self.num_classes}: must be in "
                             f"[2, {synthetic.MAX_CATEGORIES}]")
        if self.test_per_class < 1 or self.image_size < 8:
            raise ValueError(f"test_per_class={self.test_per_class}, image_size="
                             f"{self.image_size}: need at least 1 and 8")
        long_tailed_counts(self.max_images, self.imbalance_factor, self.num_classes)


SYNTHETIC_CLS_VERSION = 1
# the scene an object is drawn in, and the share of its side the object covers
_RENDER_SIZE = 64
_OBJECT_SIZE = (0.45, 0.7)


def synthetic_cls_lt_root() -> str:
    """``$EQL_D2_SYNTHETIC_CLS_LT_ROOT``, else ``$DETECTRON2_DATASETS/synthetic_cls_lt``."""
    root = os.environ.get("EQL_D2_SYNTHETIC_CLS_LT_ROOT")
    return os.path.abspath(root or os.path.join(_datasets_root(), "synthetic_cls_lt"))


def _object_crop(label, table, size, rng):
    """One object of class `label` drawn on a cluttered background by the Synthetic-LT
    renderer, cropped to its box plus a random margin and resized to `size` px."""
    for _ in range(10):
        scene, objects = synthetic._render_image([label], table, _RENDER_SIZE, _OBJECT_SIZE, rng)
        if objects:
            break
    else:  # pragma: no cover - a single object always fits a 64 px scene
        raise RuntimeError(f"could not place an object of class {label}")
    x, y, w, h = objects[0]["bbox"]
    m = rng.uniform(0.05, 0.25, 4) * max(w, h)
    box = (max(0.0, x - m[0]), max(0.0, y - m[1]), min(_RENDER_SIZE, x + w + m[2]),
           min(_RENDER_SIZE, y + h + m[3]))
    crop = scene.crop(tuple(int(round(v)) for v in box))
    return np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def _draw_split(labels, table, spec, split_seed):
    images = np.empty((len(labels), spec.image_size, spec.image_size, 3), np.uint8)
    for i, label in enumerate(labels):
        # a stream per image: an image does not depend on the ones drawn before it
        rng = np.random.default_rng([spec.seed, split_seed, i])
        images[i] = _object_crop(int(label), table, spec.image_size, rng)
    return images


def generate_synthetic_cls_lt(out_dir: str, spec: SyntheticClsSpec = SyntheticClsSpec()) -> str:
    """Write Synthetic-CLS-LT into `out_dir` (replaced whole, never left half written):
    ``train.npz`` and ``test.npz`` (``images`` uint8 [N, S, S, 3], ``labels`` [N]) and
    ``generator.json`` (the spec, class names, train counts). Returns `out_dir`."""
    spec.validate()
    table = synthetic.category_table(spec.num_classes)
    names = [synthetic._describe(entry)[0] for entry in table]
    counts = long_tailed_counts(spec.max_images, spec.imbalance_factor, spec.num_classes)
    train_labels = np.repeat(np.arange(spec.num_classes), counts)
    test_labels = np.repeat(np.arange(spec.num_classes), spec.test_per_class)
    with atomic_directory(out_dir) as tmp:
        for split, labels, split_seed in (("train", train_labels, 1), ("test", test_labels, 2)):
            images = _draw_split(labels, table, spec, split_seed)
            with atomic_write(os.path.join(tmp, f"{split}.npz"), "wb") as f:
                np.savez(f, images=images, labels=labels)
        info = {"version": SYNTHETIC_CLS_VERSION, "spec": asdict(spec), "class_names": names,
                "train_image_counts": counts}
        with atomic_write(os.path.join(tmp, "generator.json")) as f:
            json.dump(info, f, indent=1)
    logger.info("Synthetic-CLS-LT: %d train and %d test images of %d classes in %s",
                len(train_labels), len(test_labels), spec.num_classes, out_dir)
    return out_dir


def _synthetic_info(root):
    path = os.path.join(root, "generator.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def ensure_synthetic_cls_lt(root: str = None) -> str:
    """`root` (default :func:`synthetic_cls_lt_root`) holding Synthetic-CLS-LT, generated
    with the default spec if absent or written by another generator version."""
    root = root or synthetic_cls_lt_root()
    info = _synthetic_info(root)
    if info is None or info.get("version") != SYNTHETIC_CLS_VERSION:
        logger.info("Generating Synthetic-CLS-LT into %s (once)", root)
        generate_synthetic_cls_lt(root)
    return root


def load_synthetic_cls_lt(root: str, split: str) -> List[Dict]:
    with np.load(os.path.join(root, f"{split}.npz")) as data:
        images, labels = data["images"], data["labels"]
    return [{"image": images[i], "label": int(labels[i]), "image_id": i}
            for i in range(len(labels))]


# ----------------------------------------------------------------------------- registration


class ClassificationSplit:
    """The DatasetCatalog entry of one split: calling it returns the dataset dicts;
    :meth:`prepare` checks the split's source files and sets its metadata."""

    def __init__(self, name: str, kind: str, split: str, train_split: str, **paths):
        self.name, self.kind, self.split, self.train_split = name, kind, split, train_split
        self.paths = paths

    def __call__(self) -> List[Dict]:
        p = self.paths
        if self.kind == "cifar100_lt":
            return load_cifar100_lt(p["root"], self.split, p["imbalance_factor"])
        if self.kind == "imagenet_lt":
            return load_imagenet_lt(p["split_file"], p["image_root"])
        return load_synthetic_cls_lt(ensure_synthetic_cls_lt(p["root"]), self.split)

    def _classes_and_counts(self):
        """(class names, per-class images of the training split)."""
        p = self.paths
        if self.kind == "cifar100_lt":
            meta = _read_pickle(os.path.join(p["root"], "meta"), "CIFAR-100 meta file")
            if "fine_label_names" not in meta:
                raise ValueError(f"{os.path.join(p['root'], 'meta')}: no 'fine_label_names'")
            return (list(meta["fine_label_names"]),
                    long_tailed_counts(CIFAR100_IMAGES_PER_CLASS, p["imbalance_factor"], 100))
        if self.kind == "imagenet_lt":
            entries = parse_imagenet_lt_split(p["train_split_file"])
            num_classes = max(label for _, label in entries) + 1
            return (_imagenet_class_names(entries, num_classes),
                    _counts_per_class([label for _, label in entries], num_classes))
        info = _synthetic_info(ensure_synthetic_cls_lt(p["root"]))
        return info["class_names"], info["train_image_counts"]

    def prepare(self):
        """Set the split's metadata (see module doc) if not set yet; returns it."""
        meta = MetadataCatalog.get(self.name)
        if meta.get("train_image_counts") is not None:
            return meta
        names, counts = self._classes_and_counts()
        values = {"thing_classes": names, "train_image_counts": counts,
                  "train_dataset": self.train_split}
        if self.split == "train":
            values.update(num_train_images=int(sum(counts)),
                          class_image_count=[{"id": k + 1, "image_count": int(n)}
                                             for k, n in enumerate(counts)])
        meta.set(**{k: v for k, v in values.items() if meta.get(k) is None})
        return meta


def _register(name, kind, split, train_split, **paths):
    DatasetCatalog.register(name, ClassificationSplit(name, kind, split, train_split, **paths))
    MetadataCatalog.get(name).set(evaluator_type="classification")


def register_classification_datasets():
    """Register the CIFAR-100-LT, ImageNet-LT and Synthetic-CLS-LT splits of the module doc
    (folders as the environment names them now); names already registered are kept."""
    registered = set(DatasetCatalog.list())

    def register(name, *args, **kwargs):
        if name not in registered:
            _register(name, *args, **kwargs)

    for prefix, factor in CIFAR100_LT.items():
        for split in ("train", "test"):
            register(f"{prefix}_{split}", "cifar100_lt", split, f"{prefix}_train",
                     root=cifar100_lt_root(), imbalance_factor=factor)
    split_file = functools.partial(os.path.join, imagenet_lt_root())
    for split in IMAGENET_LT_SPLITS:
        register(f"imagenet_lt_{split}", "imagenet_lt", split, "imagenet_lt_train",
                 split_file=split_file(f"ImageNet_LT_{split}.txt"),
                 train_split_file=split_file("ImageNet_LT_train.txt"),
                 image_root=imagenet_root())
    for split in ("train", "test"):
        register(f"synthetic_cls_lt_{split}", "synthetic", split, "synthetic_cls_lt_train",
                 root=synthetic_cls_lt_root())


def prepare_classification_datasets(cfg, *, training: bool = True):
    """Generate what is generated and set the metadata of DATASETS.TRAIN (when `training`)
    and DATASETS.TEST, then check MODEL.CLASSIFIER.NUM_CLASSES against them. Local rank 0
    goes first (it generates); the other processes then read what it wrote."""
    names = (list(cfg.DATASETS.TRAIN) if training else []) + list(cfg.DATASETS.TEST)
    for name in names:
        if name not in DatasetCatalog.list():
            raise KeyError(f"Dataset '{name}' is not registered; classification datasets: "
                           f"{sorted(n for n in DatasetCatalog.list() if _is_split(n))}")
        if not _is_split(name):
            raise ValueError(f"Dataset '{name}' is not a classification dataset "
                             "(eql_d2.data.classification); ImageClassifier trains on those")

    def prepare():
        for name in names:
            DatasetCatalog[name].prepare()

    if comm.get_local_rank() == 0:
        prepare()
    comm.synchronize()
    prepare()
    num_classes = cfg.MODEL.CLASSIFIER.NUM_CLASSES
    for name in names:
        found = len(MetadataCatalog.get(name).thing_classes)
        if found != num_classes:
            raise ValueError(f"MODEL.CLASSIFIER.NUM_CLASSES = {num_classes}, but dataset "
                             f"'{name}' has {found} classes; set MODEL.CLASSIFIER.NUM_CLASSES "
                             f"{found}")


def _is_split(name):
    return isinstance(DatasetCatalog[name], ClassificationSplit)


# ----------------------------------------------------------------------------- mapper


class Cutout:
    """Cutout (DeVries & Taylor, 2017): a `size` x `size` square whose centre is uniform over
    the image (so near a border only part of it lies inside) is set to `fill` (per
    channel). torchvision's RandomErasing differs: its rectangle has a random area and
    aspect ratio and always lies wholly inside the image. Input and output: float tensors
    [C, H, W]; the draw uses torch's global RNG."""

    def __init__(self, size: int, fill: Sequence[float]):
        if size < 1:
            raise ValueError(f"INPUT.CLASSIFICATION.CUTOUT_SIZE must be positive, got {size}")
        self.size = int(size)
        self.fill = torch.as_tensor(fill, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(0, cy - self.size // 2), min(h, cy + self.size - self.size // 2)
        x0, x1 = max(0, cx - self.size // 2), min(w, cx + self.size - self.size // 2)
        image = image.clone()
        image[:, y0:y1, x0:x1] = self.fill.to(image.dtype)
        return image

    def __repr__(self):
        return f"Cutout(size={self.size})"


TRAIN_AUGMENTATIONS = ("pad_crop", "random_resized_crop", "flip", "color_jitter",
                       "autoaugment", "cutout")


class ClassificationDatasetMapper:
    """Dataset dict -> ``{"image": float32 [3, H, W] RGB in 0..255, "label", "image_id"}``
    with the augmentations of ``INPUT.CLASSIFICATION`` (torchvision's transforms on PIL
    images, then :class:`Cutout`). Randomness comes from torch's global RNG, which the
    resumable training loader seeds per sample."""

    def __init__(self, cfg, is_train: bool):
        node = cfg.INPUT.CLASSIFICATION
        self.is_train = is_train
        self.transform, self.cutout = self._transforms(node, cfg.MODEL.PIXEL_MEAN, is_train)

    @staticmethod
    def _transforms(node, pixel_mean, is_train):
        steps, cutout = [], None
        if not is_train:
            if node.TEST_RESIZE > 0:
                steps.append(T.Resize(node.TEST_RESIZE))
            if node.TEST_CROP > 0:
                steps.append(T.CenterCrop(node.TEST_CROP))
            return T.Compose(steps), None
        unknown = [a for a in node.TRAIN_AUGMENTATIONS if a not in TRAIN_AUGMENTATIONS]
        if unknown:
            raise ValueError(f"INPUT.CLASSIFICATION.TRAIN_AUGMENTATIONS: unknown {unknown}; "
                             f"choose from {list(TRAIN_AUGMENTATIONS)}")
        for name in node.TRAIN_AUGMENTATIONS:
            if name == "pad_crop":
                steps.append(T.RandomCrop(node.CROP_SIZE, padding=node.PADDING))
            elif name == "random_resized_crop":
                steps.append(T.RandomResizedCrop(node.CROP_SIZE))
            elif name == "flip":
                steps.append(T.RandomHorizontalFlip())
            elif name == "color_jitter":
                steps.append(T.ColorJitter(*node.COLOR_JITTER))
            elif name == "autoaugment":
                try:
                    policy = T.AutoAugmentPolicy(node.AUTOAUGMENT_POLICY)
                except ValueError:
                    raise ValueError(
                        f"INPUT.CLASSIFICATION.AUTOAUGMENT_POLICY {node.AUTOAUGMENT_POLICY!r}: "
                        f"choose from {[p.value for p in T.AutoAugmentPolicy]}") from None
                steps.append(T.AutoAugment(policy))
            elif name == "cutout":
                if node.TRAIN_AUGMENTATIONS[-1] != "cutout":
                    raise ValueError("INPUT.CLASSIFICATION.TRAIN_AUGMENTATIONS: 'cutout' comes "
                                     "last (it works on the tensor)")
                cutout = Cutout(node.CUTOUT_SIZE, pixel_mean)
        return T.Compose(steps), cutout

    def __call__(self, record: Dict) -> Dict:
        if "image" in record:
            image = Image.fromarray(np.asarray(record["image"], dtype=np.uint8))
        else:
            with Image.open(record["file_name"]) as f:
                image = f.convert("RGB")
        tensor = T.functional.pil_to_tensor(self.transform(image)).float()
        if self.cutout is not None:
            tensor = self.cutout(tensor)
        return {"image": tensor, "label": int(record["label"]),
                "image_id": record.get("image_id")}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate Synthetic-CLS-LT (see module doc).")
    parser.add_argument("--out", required=True, help="output folder (replaced if present)")
    defaults = SyntheticClsSpec()
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    generate_synthetic_cls_lt(out, SyntheticClsSpec(**args))


if __name__ == "__main__":
    main()
