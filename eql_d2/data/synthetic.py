"""Synthetic-LT: a generated, long-tailed, LVIS v1-format detection + segmentation dataset.

Every image shows objects on a cluttered grey background. A category is a visible
(shape, colour, texture) triple, so a detector can tell categories apart from pixels alone.
Train image counts per category follow a Zipf-like (monotone, heavy-tailed) rank curve
whose bands give LVIS v1's three groups in LVIS's proportions and with LVIS's thresholds:
rare 1-10 train images, common 11-100, frequent > 100. The val split is balanced: every
category has at least ``--val-instances`` instances, so APr is measured on enough objects.

Like LVIS, each train image lists a few verified-absent categories (``neg_category_ids``)
and, where an instance of a present category was deliberately left unannotated, that
category in ``not_exhaustive_category_ids``. Val comes twice, on the same images:

- ``lvis_v1_val.json``, exhaustive: every object annotated, every absent category listed
  as negative, so every false positive counts (a diagnostic);
- ``lvis_v1_val_fed.json``, federated as LVIS val (:func:`federated_labels`): each category
  is verified absent on a random sample of images about as large as its positive set, and
  LVISEval ignores a category's detections on the other images.

Five named presets (:data:`PRESETS`, ``--preset``): ``synthetic_lt``, the default (60
categories, 160 px); ``synthetic_lvis``, a large-vocabulary variant (400 categories in
(shape, colour) families whose members differ only by texture, 128 px, more objects and
images); ``synthetic_lvis_balanced``, the same but with every category on the same
number of train images (``train_images_per_category``), a balanced control of about the
same size; see docs/synthetic_lvis.md. ``synthetic_hard_tail`` (``appearance
"own_factors"``, :mod:`eql_d2.data.hard_tail`) gives every category a body, colour
patterns and a mark of its own instead of a triple of shared attributes, with several
looks per category, near neighbours, occlusion, partial views and distractors, so that
the rare categories cannot be composed from what the frequent ones teach; see
docs/HARD_TAIL.md. ``synthetic_hard_tail_pretrain``, balanced images of the same kind with
200 categories of their own, is what the hard-tail detectors' backbones can be pre-trained
on, as LVIS's are on ImageNet.

Usage::

    python -m eql_d2.data.synthetic --out datasets/synthetic_lt --seed 0
    python -m eql_d2.data.synthetic --preset synthetic_lvis --out datasets/synthetic_lvis
    python -m eql_d2.data.synthetic --preset synthetic_lvis_balanced \
        --out datasets/synthetic_lvis_balanced
    python -m eql_d2.data.synthetic --preset synthetic_hard_tail --out datasets/synthetic_hard_tail

The output folder holds ``train/*.png``, ``val/*.png``, ``lvis_v1_train.json``,
``lvis_v1_val.json``, ``lvis_v1_val_fed.json`` and ``generator.json`` (the arguments it was
made with). Output is deterministic: the same arguments give the same bytes.
"""

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
from PIL import Image, ImageDraw

from ..utils.groups import GROUP_NAMES, GROUPS
from ..utils.io import atomic_directory, atomic_write
from . import hard_tail

__all__ = [
    "PRESETS",
    "SyntheticLTSpec",
    "add_federated_val",
    "category_table",
    "family_table",
    "federated_labels",
    "generate",
    "num_train_images",
    "rfs_threshold",
    "spec_of",
    "train_image_counts",
]

# Bumped when the same arguments would give other images or annotations. Files added
# later that derive from them (lvis_v1_val_fed.json) are added in place instead, by
# add_federated_val, so existing folders are not regenerated for them.
GENERATOR_VERSION = 1

# LVIS v1: 337 rare, 461 common, 405 frequent categories out of 1203.
LVIS_V1_GROUP_FRACTIONS = {"r": 337 / 1203, "c": 461 / 1203, "f": 405 / 1203}
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100

SHAPES = (
    "circle", "square", "triangle", "diamond", "pentagon", "hexagon",
    "star", "cross", "ellipse", "bar", "trapezoid", "chevron",
)
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (35, 70, 230),
    "yellow": (240, 220, 20), "cyan": (20, 210, 220), "magenta": (220, 40, 200),
    "orange": (250, 140, 10), "purple": (120, 40, 170), "white": (250, 250, 250),
    "black": (15, 15, 15), "brown": (130, 75, 30), "pink": (255, 150, 190),
}
TEXTURES = (
    "solid", "hstripes", "vstripes", "dstripes", "checker", "dots", "rings", "grid", "speckle",
)
MAX_CATEGORIES = len(SHAPES) * len(COLOURS) * len(TEXTURES)
APPEARANCES = ("attributes", "own_factors")


@dataclass(frozen=True)
class SyntheticLTSpec:
    """Generator arguments; together with the seed they fix every output byte.

    Sizes are in pixels, object sizes in fractions of the image side. ``shapes``,
    ``colours`` and ``textures`` 0 keep Synthetic-LT's cycling vocabulary
    (:func:`category_table`); all three > 0 build (shape, colour) families whose members
    differ only by texture (:func:`family_table`). ``train_images_per_category`` 0 gives
    the long-tailed train counts of :func:`train_image_counts`; n > 0 puts every category
    on exactly n train images (balanced; ``max_frequent_images`` is then unused).
    """

    num_categories: int = 60
    image_size: int = 160
    max_frequent_images: int = 400
    val_instances: int = 6
    max_objects: int = 6
    seed: int = 0
    # vocabulary: 0, 0, 0 = Synthetic-LT's cycling table; else the first `shapes` of SHAPES,
    # `colours` of COLOURS and `textures` of TEXTURES, as families (see family_table)
    shapes: int = 0
    colours: int = 0
    textures: int = 0
    # train layout: at most this many distinct categories on an image, this many on average
    # (both capped at max_objects, the mean also at the maximum)
    max_categories_per_image: int = 4
    mean_categories_per_image: float = 2.5
    # distinct categories on a val image (capped at max_objects)
    val_categories_per_image: int = 3
    # side of an object's box, uniform in this range, as a fraction of the image side
    min_object_size: float = 0.15
    max_object_size: float = 0.32
    # federated val (federated_labels): verified-absent images per positive image of a
    # category (LVIS: comparable numbers), and the chance that a category with 2+
    # instances on an image loses one annotation and is flagged not exhaustive
    val_negatives_per_positive: float = 1.0
    val_not_exhaustive_prob: float = 0.15
    # train distribution: 0 = long-tailed (train_image_counts' LVIS bands); n > 0 = every
    # category on exactly n train images, a balanced control for the long-tailed presets
    train_images_per_category: int = 0
    # "attributes": a category is a (shape, colour, texture) triple (the vocabulary above);
    # "own_factors": bodies, colour patterns and marks of its own (eql_d2.data.hard_tail),
    # with the fields below
    appearance: str = "attributes"
    # own_factors: colour patterns per category (one drawn per instance)
    modes_per_category: int = 3
    # own_factors: categories of a frequency group that share body and patterns and differ
    # only in their mark (near neighbours)
    kin_size: int = 2
    # own_factors: distractors (objects of no category) per image, 0 to this many
    max_distractors: int = 3
    # own_factors: share of an object's area that stays in view (occlusion, partial views)
    min_visible: float = 0.5
    # own_factors: chance that an object is placed anywhere, possibly running off the image
    truncation_prob: float = 0.25
    # own_factors: scale of an instance's random aspect ratio, shear and outline wobble
    deformation: float = 0.12

    @property
    def balanced(self):
        return self.train_images_per_category > 0

    @property
    def own_factors(self):
        return self.appearance == "own_factors"

    def validate(self):
        if self.train_images_per_category < 0:
            raise ValueError(f"train_images_per_category={self.train_images_per_category}: "
                             "must be >= 0 (0: long-tailed)")
        if self.balanced:
            if not 1 <= self.num_categories <= MAX_CATEGORIES:
                raise ValueError(f"num_categories={self.num_categories}: must be in "
                                 f"[1, {MAX_CATEGORIES}]")
        elif not 3 <= self.num_categories <= MAX_CATEGORIES:
            raise ValueError(
                f"num_categories={self.num_categories}: must be in [3, {MAX_CATEGORIES}] "
                "so that rare, common and frequent groups all exist"
            )
        if self.image_size < 64:
            raise ValueError(f"image_size={self.image_size}: must be at least 64 pixels")
        if not self.balanced and self.max_frequent_images <= COMMON_MAX_IMAGES:
            raise ValueError(
                f"max_frequent_images={self.max_frequent_images}: must exceed "
                f"{COMMON_MAX_IMAGES}, the LVIS threshold of the frequent group"
            )
        if self.val_instances < 1:
            raise ValueError(f"val_instances={self.val_instances}: must be at least 1")
        if not 1 <= self.max_objects <= 12:
            raise ValueError(f"max_objects={self.max_objects}: must be in [1, 12]")
        vocab = (self.shapes, self.colours, self.textures)
        limits = (len(SHAPES), len(COLOURS), len(TEXTURES))
        if any(vocab):
            for key, n, hi in zip(("shapes", "colours", "textures"), vocab, limits):
                if not 1 <= n <= hi:
                    raise ValueError(f"{key}={n}: must be in [1, {hi}] (or shapes, colours "
                                     "and textures all 0 for Synthetic-LT's vocabulary)")
            if self.num_categories > math.prod(vocab):
                raise ValueError(
                    f"num_categories={self.num_categories}: more than shapes x colours x "
                    f"textures = {math.prod(vocab)} distinct categories")
        for key in ("max_categories_per_image", "mean_categories_per_image",
                    "val_categories_per_image"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: must be at least 1")
        if not 0.05 <= self.min_object_size <= self.max_object_size <= 0.5:
            raise ValueError(f"object sizes [{self.min_object_size}, {self.max_object_size}]: "
                             "need 0.05 <= min_object_size <= max_object_size <= 0.5")
        if self.min_object_size * self.image_size < 8:
            raise ValueError(f"min_object_size={self.min_object_size} of {self.image_size} px "
                             "is under 8 px, too small to show a texture")
        if self.val_negatives_per_positive < 0:
            raise ValueError(f"val_negatives_per_positive={self.val_negatives_per_positive}: "
                             "must be >= 0")
        if not 0 <= self.val_not_exhaustive_prob <= 1:
            raise ValueError(f"val_not_exhaustive_prob={self.val_not_exhaustive_prob}: "
                             "must be in [0, 1]")
        if self.appearance not in APPEARANCES:
            raise ValueError(f"appearance={self.appearance!r}: must be one of {APPEARANCES}")
        if self.own_factors:
            self._validate_own_factors()

    def _validate_own_factors(self):
        if any((self.shapes, self.colours, self.textures)):
            raise ValueError("appearance 'own_factors' draws its own bodies and patterns: "
                             "shapes, colours and textures must be 0")
        if self.min_object_size * self.image_size < 16:
            raise ValueError(f"min_object_size={self.min_object_size} of {self.image_size} px "
                             "is under 16 px, too small to show a category's mark")
        for key in ("modes_per_category", "kin_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: must be at least 1")
        if self.max_distractors < 0:
            raise ValueError(f"max_distractors={self.max_distractors}: must be >= 0")
        if not 0.2 <= self.min_visible <= 1:
            raise ValueError(f"min_visible={self.min_visible}: must be in [0.2, 1]")
        if not 0 <= self.truncation_prob <= 1:
            raise ValueError(f"truncation_prob={self.truncation_prob}: must be in [0, 1]")
        if not 0 <= self.deformation <= 0.3:
            raise ValueError(f"deformation={self.deformation}: must be in [0, 0.3]")


# The large-vocabulary presets (docs/synthetic_lvis.md gives the reasons for each number).
_SYNTHETIC_LVIS = SyntheticLTSpec(
    num_categories=400, shapes=10, colours=8, textures=5,
    image_size=128, max_frequent_images=400, val_instances=10,
    max_objects=8, max_categories_per_image=6, mean_categories_per_image=4.5,
    val_categories_per_image=4, min_object_size=0.14, max_object_size=0.28,
)
PRESETS = {
    "synthetic_lt": SyntheticLTSpec(),
    "synthetic_lvis": _SYNTHETIC_LVIS,
    # 400 x 90 = 36,000 (category, image) pairs against synthetic_lvis's 35,983: 8000
    # train images against 7997, each with 4 or 5 categories in both, so as many objects
    "synthetic_lvis_balanced": replace(_SYNTHETIC_LVIS, train_images_per_category=90),
    # categories that own their appearance (eql_d2.data.hard_tail), so that the tail stays
    # hard once the model has converged; sized for a converged R18-FPN run in about an hour
    # of one core (docs/HARD_TAIL.md gives the reasons for each number)
    "synthetic_hard_tail": SyntheticLTSpec(
        appearance="own_factors", num_categories=60, image_size=128, max_frequent_images=250,
        val_instances=8, max_objects=6, max_categories_per_image=4,
        mean_categories_per_image=3.0, val_categories_per_image=3, min_object_size=0.16,
        max_object_size=0.42),
}
# what the hard-tail detectors' backbones are pre-trained on, as LVIS's are on ImageNet: the
# same kind of images with 200 categories of their own, balanced (40 train images each),
# drawn from seed 1000, so that no look is one of the hard-tail seeds' (0-2) categories'
PRESETS["synthetic_hard_tail_pretrain"] = replace(
    PRESETS["synthetic_hard_tail"], seed=1000, num_categories=200, train_images_per_category=40)


def category_table(num_categories):
    """The (shape, colour, texture) triple of each category, in category-id order.

    Consecutive ids change shape first and colour second, so the first categories (the
    most frequent ones) differ by shape and colour; textures cycle so that a triple is
    never repeated.
    """
    colours = list(COLOURS)
    table = []
    n_sc = len(SHAPES) * len(colours)
    for k in range(num_categories):
        shape = SHAPES[k % len(SHAPES)]
        colour = colours[(k // len(SHAPES)) % len(colours)]
        texture = TEXTURES[(k % n_sc + k // n_sc) % len(TEXTURES)]
        table.append((shape, colour, texture))
    assert len(set(table)) == len(table)
    return table


def family_table(spec):
    """(shape, colour, texture) of each category of a family vocabulary, in category-id order.

    A family is a (shape, colour) pair; its members differ only by texture, so every
    category has ``textures - 1`` siblings that share two of its three attributes (and
    more neighbours that share shape and texture or colour and texture). Category ids are
    frequency ranks (id 1 has the most train images), and ranks are dealt round-robin over
    the families in a seeded order: rank r goes to family ``order[r % F]``, F =
    shapes x colours. Every family thus holds members from the top to the bottom of the
    frequency curve, so a rare category has frequent siblings that differ from it only by
    texture, as LVIS's rare categories are fine-grained kin of frequent ones. Textures are
    permuted per family, so no texture goes with a frequency group.
    """
    shapes = SHAPES[: spec.shapes]
    colours = list(COLOURS)[: spec.colours]
    textures = TEXTURES[: spec.textures]
    families = [(shape, colour) for colour in colours for shape in shapes]
    # a stream of its own, so that the layout and pixels drawn from the main one are the
    # same whichever vocabulary is used
    rng = np.random.default_rng([spec.seed, 1])
    order = rng.permutation(len(families))
    texture_order = [rng.permutation(len(textures)) for _ in families]
    table = []
    for rank in range(spec.num_categories):
        slot, position = divmod(rank, len(families))
        f = int(order[position])
        table.append((*families[f], textures[int(texture_order[f][slot])]))
    assert len(set(table)) == len(table)
    return table


def vocabulary(spec):
    """The category table of `spec`: :func:`family_table` or :func:`category_table` of
    (shape, colour, texture) triples, or with appearance "own_factors" the
    :class:`~eql_d2.data.hard_tail.CategoryLook` of each category (:func:`category_looks`)."""
    if spec.own_factors:
        return category_looks(spec)
    if spec.shapes:
        return family_table(spec)
    return category_table(spec.num_categories)


def category_looks(spec):
    """The :class:`~eql_d2.data.hard_tail.CategoryLook` of each category of an
    "own_factors" spec: kins formed within the LVIS groups of :func:`train_image_counts`,
    drawn from a stream of their own (seed, 3), so that the layout and pixels drawn from
    the main one do not depend on them."""
    groups = [frequency_group(n) for n in train_image_counts(spec)]
    return hard_tail.category_looks(groups, spec.modes_per_category, spec.kin_size,
                                    np.random.default_rng([spec.seed, 3]))


def group_sizes(num_categories):
    """Number of (rare, common, frequent) categories in LVIS v1 proportions, each >= 1."""
    n_r = max(1, round(num_categories * LVIS_V1_GROUP_FRACTIONS["r"]))
    n_f = max(1, round(num_categories * LVIS_V1_GROUP_FRACTIONS["f"]))
    n_c = num_categories - n_r - n_f
    return n_r, n_c, n_f


def train_image_counts(spec):
    """Target number of train images per category (category index order).

    Long-tailed (``train_images_per_category`` 0): within each LVIS band the counts fall
    geometrically with rank (a power law in rank, i.e. Zipf-like), from the top of the
    band to its bottom: frequent from ``max_frequent_images`` down to 101, common
    100 -> 11, rare 10 -> 1. Balanced: ``train_images_per_category`` for every category,
    so all categories fall in the one LVIS group of that count.
    """
    if spec.balanced:
        return [spec.train_images_per_category] * spec.num_categories
    n_r, n_c, n_f = group_sizes(spec.num_categories)

    def band(n, hi, lo):
        if n == 1:
            return [hi]
        return [int(round(hi * (lo / hi) ** (i / (n - 1)))) for i in range(n)]

    return (
        band(n_f, spec.max_frequent_images, COMMON_MAX_IMAGES + 1)
        + band(n_c, COMMON_MAX_IMAGES, RARE_MAX_IMAGES + 1)
        + band(n_r, RARE_MAX_IMAGES, 1)
    )


def num_train_images(spec):
    """Number of train images `spec` generates, without generating them.

    Enough images for the most frequent category and for the mean number of distinct
    categories per image; :func:`_assign_categories` fills the least loaded images first,
    so none is left empty.
    """
    counts = train_image_counts(spec)
    mean = min(spec.mean_categories_per_image, _max_categories(spec))
    return max(max(counts), math.ceil(sum(counts) / mean))


def _max_categories(spec):
    return min(spec.max_categories_per_image, spec.max_objects)


def rfs_threshold(spec):
    """Repeat-factor-sampling threshold t that puts LVIS's boundary on `spec`'s train set.

    LVIS's t = 0.001 is 100 of its ~100k train images, the common / frequent boundary;
    100 / (train images) is the same boundary here, rounded to 4 decimals for a config.
    On a balanced spec every image gets the same repeat factor at any threshold, so
    repeat factor sampling does not change what is seen (and is best left off).
    """
    return round(COMMON_MAX_IMAGES / num_train_images(spec), 4)


def frequency_group(image_count):
    """LVIS frequency group of a category from its number of train images."""
    if image_count <= RARE_MAX_IMAGES:
        return "r"
    if image_count <= COMMON_MAX_IMAGES:
        return "c"
    return "f"


# Spec fields added after GENERATOR_VERSION 1 without changing the output of specs that
# leave them at their defaults: generator.json records them only when set, so the files of
# those specs stay byte for byte as before (spec_of gives an absent field its default).
_RECORDED_WHEN_SET = ("train_images_per_category", "appearance")
# Fields of appearance "own_factors" only: recorded, all of them, when it is used, so that
# a folder keeps the values it was made with even if their defaults change.
_OWN_FACTOR_FIELDS = ("modes_per_category", "kin_size", "max_distractors", "min_visible",
                      "truncation_prob", "deformation")


def _recorded_args(spec):
    default = SyntheticLTSpec()
    return {k: v for k, v in asdict(spec).items()
            if (k in _OWN_FACTOR_FIELDS and spec.own_factors)
            or (k not in _RECORDED_WHEN_SET + _OWN_FACTOR_FIELDS or v != getattr(default, k))}


# ----------------------------------------------------------------------------- layout


def _assign_categories(counts, num_images, max_per_image, rng):
    """Give category k to exactly counts[k] distinct images, filling images evenly."""
    per_image = [[] for _ in range(num_images)]
    load = np.zeros(num_images)
    for k in np.argsort(-np.asarray(counts), kind="stable"):
        # least-loaded images first, random among equals
        order = np.lexsort((rng.random(num_images), load))
        chosen = [i for i in order if len(per_image[i]) < max_per_image][: counts[k]]
        if len(chosen) < counts[k]:
            raise ValueError("not enough images to place every category; raise max_objects")
        for i in chosen:
            per_image[i].append(int(k))
            load[i] += 1
    return per_image


def _val_categories(num_categories, val_instances, per_image_cats, rng):
    """Balanced val layout: each category appears in `val_instances` images."""
    slots = [k for k in range(num_categories) for _ in range(val_instances)]
    num_images = math.ceil(len(slots) / per_image_cats) + 1
    return _assign_categories([val_instances] * num_categories, num_images, per_image_cats, rng)


# ----------------------------------------------------------------------------- rendering


def _shape_polygon(shape, cx, cy, size, angle):
    """Polygon (list of (x, y)) of a shape of bounding size ~`size` centred at (cx, cy)."""
    r = size / 2.0
    if shape == "circle":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    elif shape == "ellipse":
        pts = [(math.cos(t), 0.55 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    elif shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "bar":
        pts = [(-0.35, -1.0), (0.35, -1.0), (0.35, 1.0), (-0.35, 1.0)]
    elif shape == "triangle":
        pts = [(0.0, -1.0), (0.95, 0.8), (-0.95, 0.8)]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]
    elif shape in ("pentagon", "hexagon"):
        n = 5 if shape == "pentagon" else 6
        pts = [(math.cos(t - math.pi / 2), math.sin(t - math.pi / 2))
               for t in np.linspace(0, 2 * math.pi, n, endpoint=False)]
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = 1.0 if i % 2 == 0 else 0.42
            t = i * math.pi / 5 - math.pi / 2
            pts.append((rad * math.cos(t), rad * math.sin(t)))
    elif shape == "cross":
        a, b = 0.3, 0.95
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
               (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    elif shape == "trapezoid":
        pts = [(-0.45, -0.7), (0.45, -0.7), (1.0, 0.7), (-1.0, 0.7)]
    elif shape == "chevron":
        pts = [(-1.0, -0.6), (0.0, 0.1), (1.0, -0.6), (1.0, 0.1), (0.0, 0.8), (-1.0, 0.1)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _texture_mask(texture, h, w, period, phase):
    """Boolean [h, w] pattern: True where the object shows its full colour."""
    yy, xx = np.mgrid[0:h, 0:w]
    xx = xx + phase
    yy = yy + phase
    half = period // 2
    if texture == "solid":
        return np.ones((h, w), bool)
    if texture == "hstripes":
        return (yy // half) % 2 == 0
    if texture == "vstripes":
        return (xx // half) % 2 == 0
    if texture == "dstripes":
        return ((xx + yy) // half) % 2 == 0
    if texture == "checker":
        return ((xx // half) + (yy // half)) % 2 == 0
    if texture == "dots":
        return ((xx % period - half) ** 2 + (yy % period - half) ** 2) > (period / 3.2) ** 2
    if texture == "rings":
        d = np.sqrt((xx - phase - w / 2) ** 2 + (yy - phase - h / 2) ** 2)
        return (d // half) % 2 == 0
    if texture == "grid":
        return ~((xx % period < 2) | (yy % period < 2))
    if texture == "speckle":
        return ((xx * 7919 + yy * 104729) % 5) != 0
    raise ValueError(f"unknown texture {texture!r}")


def _background(size, rng):
    """Cluttered, low-saturation background: noise, blotches and line segments in greys."""
    base = rng.integers(70, 170)
    img = np.full((size, size, 3), base, np.float32)
    img += rng.normal(0, 12, (size, size, 1))  # grey noise, same for all channels
    img = np.clip(img, 0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(4, 10))):
        g = int(rng.integers(40, 210))
        x0, y0 = rng.integers(0, size, 2)
        r = int(rng.integers(4, size // 5))
        draw.ellipse([int(x0) - r, int(y0) - r, int(x0) + r, int(y0) + r], fill=(g, g, g))
    for _ in range(int(rng.integers(3, 8))):
        g = int(rng.integers(30, 220))
        pts = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
        draw.line(pts, fill=(g, g, g), width=int(rng.integers(1, 3)))
    return pil


def _boxes_overlap(a, b, margin=2):
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0]
                or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _render_image(categories_of_objects, table, size, object_size, rng):
    """Draw objects (list of category indices) without overlap; return image and objects.

    `object_size`: (low, high) side of an object as a fraction of `size`.

    Each object: dict(category=k, segmentation=[[x0, y0, ...]], bbox=[x, y, w, h], area).
    Objects that cannot be placed after a few tries are dropped (the caller checks).
    """
    img = _background(size, rng)
    placed = []
    for k in categories_of_objects:
        shape, colour, texture = table[k]
        for _ in range(40):
            obj_size = float(rng.uniform(*object_size) * size)
            cx, cy = rng.uniform(obj_size / 2 + 1, size - obj_size / 2 - 1, 2)
            angle = float(rng.uniform(-0.35, 0.35))
            poly = _shape_polygon(shape, float(cx), float(cy), obj_size, angle)
            xs = [p[0] for p in poly]
            ys = [p[1] for p in poly]
            box = (min(xs), min(ys), max(xs), max(ys))
            if box[0] < 0 or box[1] < 0 or box[2] > size - 1 or box[3] > size - 1:
                continue
            if any(_boxes_overlap(box, p["xyxy"]) for p in placed):
                continue
            placed.append({"category": k, "poly": poly, "xyxy": box, "texture": texture,
                           "colour": COLOURS[colour]})
            break

    canvas = np.asarray(img).copy()
    objects = []
    for p in placed:
        mask_img = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask_img).polygon(p["poly"], fill=1)
        mask = np.asarray(mask_img).astype(bool)
        if mask.sum() < 16:
            continue
        pattern = _texture_mask(p["texture"], size, size, period=int(rng.integers(6, 10)),
                                phase=int(rng.integers(0, 8)))
        full = np.asarray(p["colour"], np.float32)
        dark = full * 0.45  # the texture's second tone keeps the same hue
        colour_map = np.where(pattern[..., None], full, dark)
        canvas[mask] = colour_map[mask].astype(np.uint8)
        x0, y0, x1, y1 = p["xyxy"]
        flat = [round(float(v), 2) for xy in p["poly"] for v in xy]
        objects.append({
            "category": p["category"],
            "segmentation": [flat],
            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
            "area": float(mask.sum()),
        })
    return Image.fromarray(canvas), objects


# ----------------------------------------------------------------------------- assembly


def _describe(entry):
    """(name, synonyms, definition) of a vocabulary entry (a triple or a CategoryLook)."""
    if isinstance(entry, hard_tail.CategoryLook):
        return hard_tail.describe(entry)
    shape, colour, texture = entry
    name = f"{colour}_{texture}_{shape}"
    return name, [name, f"{colour} {shape} ({texture})"], f"a {colour} {shape} with a {texture} texture"


def _category_entries(table, image_counts, instance_counts):
    cats = []
    for k, entry in enumerate(table):
        name, synonyms, definition = _describe(entry)
        cats.append({
            "id": k + 1,
            "name": name,
            "synset": f"{name}.n.01",
            "synonyms": synonyms,
            "def": definition,
            "frequency": frequency_group(image_counts[k]),
            "image_count": int(image_counts[k]),
            "instance_count": int(instance_counts[k]),
        })
    return cats


def _build_split(split, layout, table, spec, rng, out_dir, drop_prob, exhaustive_negatives):
    """Render one split. `layout[i]` lists the distinct categories of image i.

    `drop_prob`: chance that a category with 2+ instances loses one annotation and is
    listed in `not_exhaustive_category_ids`. `exhaustive_negatives`: list every absent
    category in `neg_category_ids` (LVIS evaluation only scores a category on images whose
    positive or negative set holds it, so a fully verified val split scores every false
    positive); otherwise a small random sample, as LVIS's federated train labels do.
    """
    num_categories = len(table)
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    images, annotations = [], []
    for i, cats in enumerate(layout):
        image_id = i + 1
        # 1-3 instances of each present category, at most `max_objects` in all
        n_extra = spec.max_objects - len(cats)
        objects = list(cats)
        for k in cats:
            if n_extra <= 0:
                break
            extra = int(rng.integers(0, min(2, n_extra) + 1))
            objects += [k] * extra
            n_extra -= extra
        rng.shuffle(objects)
        for attempt in range(60):
            if attempt == 30:
                objects = list(cats)  # crowded: drop the extra instances
            if spec.own_factors:
                img, drawn = hard_tail.render_image(objects, table, spec, rng)
            else:
                img, drawn = _render_image(objects, table, spec.image_size,
                                           (spec.min_object_size, spec.max_object_size), rng)
            drawn_cats = {o["category"] for o in drawn}
            if drawn_cats == set(cats):
                break
        else:
            raise RuntimeError(f"{split} image {image_id}: could not place categories {cats}")

        # LVIS's federated annotation: some images leave an instance of a present
        # category unannotated and flag that category as not exhaustively annotated.
        not_exhaustive = set()
        by_cat = {}
        for idx, o in enumerate(drawn):
            by_cat.setdefault(o["category"], []).append(idx)
        dropped = set()
        for k, idxs in sorted(by_cat.items()):
            if len(idxs) >= 2 and rng.random() < drop_prob:
                dropped.add(idxs[-1])
                not_exhaustive.add(k)
        absent = sorted(set(range(num_categories)) - drawn_cats)
        if exhaustive_negatives:
            neg = absent
        else:
            n_neg = int(rng.integers(0, min(8, len(absent)) + 1))
            neg = sorted(int(v) for v in rng.choice(absent, size=n_neg, replace=False)) if n_neg else []

        file_name = f"{split}/{image_id:06d}.png"
        img.save(os.path.join(out_dir, file_name), format="PNG", optimize=False)
        images.append({
            "id": image_id,
            "file_name": file_name,
            # detectron2's LVIS loader takes the last two parts of coco_url as <split>/<file>
            "coco_url": f"synthetic-lt://{file_name}",
            "height": spec.image_size,
            "width": spec.image_size,
            "neg_category_ids": [k + 1 for k in neg],
            "not_exhaustive_category_ids": sorted(k + 1 for k in not_exhaustive),
        })
        for idx, o in enumerate(drawn):
            if idx in dropped:
                continue
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": o["category"] + 1,
                "bbox": o["bbox"],
                "area": o["area"],
                "segmentation": o["segmentation"],
            })
    return images, annotations


def federated_labels(images, annotations, num_categories, negatives_per_positive,
                     not_exhaustive_prob, rng):
    """LVIS-style federated labels for an exhaustively annotated split.

    LVIS (Gupta et al., CVPR 2019) evaluates category c only on its positive set P_c
    (images where c was found and annotated) and its negative set N_c (images verified
    not to contain c), sampled at random from the images without c; a detection of c on
    any other image is ignored. Where c has more instances on an image than were
    annotated, the image lists c in ``not_exhaustive_category_ids`` and unmatched
    detections of c there are ignored too. The rule here, category by category in id
    order (every object of a generated image is known, so P_c holds every image with c):

    - N_c: ``min(round(negatives_per_positive * |P_c|), |images without c|)`` images drawn
      uniformly without replacement from the images without c (half rounds up);
    - not exhaustive: on each image, each category with 2+ annotated instances, with
      probability `not_exhaustive_prob`, loses the annotation of its last instance (the
      highest annotation id) and is listed in ``not_exhaustive_category_ids``. It stays
      positive on that image.

    Args:
        images, annotations: an exhaustive LVIS-format split (category ids 1..C).
        num_categories: C.
        rng: numpy Generator; the same state gives the same labels.

    Returns:
        (images, annotations): new image dicts with ``neg_category_ids`` and
        ``not_exhaustive_category_ids`` replaced (sorted), and the kept annotations,
        their ids unchanged.
    """
    present = {img["id"]: set() for img in images}
    instances = {}
    for a in annotations:
        present[a["image_id"]].add(a["category_id"])
        instances.setdefault((a["image_id"], a["category_id"]), []).append(a["id"])
    image_ids = sorted(present)
    negatives = {i: [] for i in image_ids}
    for c in range(1, num_categories + 1):
        absent = [i for i in image_ids if c not in present[i]]
        positives = len(image_ids) - len(absent)
        n = min(int(math.floor(negatives_per_positive * positives + 0.5)), len(absent))
        for i in sorted(int(v) for v in rng.choice(absent, size=n, replace=False)):
            negatives[i].append(c)
    dropped, not_exhaustive = set(), {i: [] for i in image_ids}
    for (i, c), ids in sorted(instances.items()):
        if len(ids) >= 2 and rng.random() < not_exhaustive_prob:
            dropped.add(max(ids))
            not_exhaustive[i].append(c)
    out_images = [{**img, "neg_category_ids": negatives[img["id"]],
                   "not_exhaustive_category_ids": sorted(not_exhaustive[img["id"]])}
                  for img in images]
    return out_images, [a for a in annotations if a["id"] not in dropped]


def _counts(images, annotations, num_categories):
    image_sets = [set() for _ in range(num_categories)]
    instances = [0] * num_categories
    for a in annotations:
        image_sets[a["category_id"] - 1].add(a["image_id"])
        instances[a["category_id"] - 1] += 1
    return [len(s) for s in image_sets], instances


def _write_json(path, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, sort_keys=True, separators=(",", ":"))


def generate(out_dir, spec=None):
    """Generate the dataset into `out_dir` atomically and return `out_dir`.

    The files are written into a temporary sibling folder which replaces `out_dir` only
    when complete, so an interrupted run never leaves a folder that looks finished.
    An existing `out_dir` is replaced.
    """
    spec = spec or SyntheticLTSpec()
    spec.validate()
    out_dir = os.path.abspath(out_dir)
    with atomic_directory(out_dir) as tmp:
        _generate_into(tmp, spec)
    return out_dir


def _generate_into(out_dir, spec):
    rng = np.random.default_rng(spec.seed)
    table = vocabulary(spec)
    counts = train_image_counts(spec)
    num_train = num_train_images(spec)
    train_layout = _assign_categories(counts, num_train, _max_categories(spec), rng)
    val_layout = _val_categories(spec.num_categories, spec.val_instances,
                                 min(spec.val_categories_per_image, spec.max_objects), rng)
    val_layout = [c for c in val_layout if c]
    train_layout = [c for c in train_layout if c]
    assert len(train_layout) == num_train

    train_images, train_anns = _build_split("train", train_layout, table, spec, rng, out_dir,
                                             drop_prob=0.15, exhaustive_negatives=False)
    val_images, val_anns = _build_split("val", val_layout, table, spec, rng, out_dir,
                                         drop_prob=0.0, exhaustive_negatives=True)
    image_counts, instance_counts = _counts(train_images, train_anns, spec.num_categories)
    # dropping an instance never removes the last annotation of a category in an image
    assert image_counts == counts, "train image counts differ from their targets"
    categories = _category_entries(table, image_counts, instance_counts)
    info = {"description": "Synthetic-LT, generated by eql_d2.data.synthetic",
            "version": GENERATOR_VERSION}
    for split, images, anns in (("train", train_images, train_anns), ("val", val_images, val_anns)):
        _write_json(os.path.join(out_dir, f"lvis_v1_{split}.json"), {
            "info": info, "licenses": [], "images": images, "annotations": anns,
            "categories": categories,
        })
    _write_json(os.path.join(out_dir, "generator.json"),
                {"version": GENERATOR_VERSION, **_recorded_args(spec)})
    add_federated_val(out_dir)


def spec_of(root):
    """The :class:`SyntheticLTSpec` recorded in ``<root>/generator.json`` (fields that the
    recording generator did not have take their defaults)."""
    path = os.path.join(root, "generator.json")
    with open(path) as f:
        args = json.load(f)
    args.pop("version", None)
    known = {f.name for f in fields(SyntheticLTSpec)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"{path}: unknown generator arguments {unknown} (made by a newer "
                         "eql_d2?)")
    return SyntheticLTSpec(**args)


def add_federated_val(root):
    """Write ``<root>/lvis_v1_val_fed.json`` from ``lvis_v1_val.json`` if it is missing.

    The federated labels (:func:`federated_labels`) come from a random stream of their own,
    seeded by the spec's seed, so they are the same whether the file is written by
    :func:`generate` or added later to a folder made before it existed; the exhaustive
    files are not touched. The file appears atomically (written aside, then renamed).
    Returns its path.
    """
    path = os.path.join(root, "lvis_v1_val_fed.json")
    if os.path.isfile(path):
        return path
    spec = spec_of(root)
    with open(os.path.join(root, "lvis_v1_val.json")) as f:
        val = json.load(f)
    images, anns = federated_labels(
        val["images"], val["annotations"], spec.num_categories,
        spec.val_negatives_per_positive, spec.val_not_exhaustive_prob,
        np.random.default_rng([spec.seed, 2]))
    _write_json(path, {**val, "images": images, "annotations": anns})
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="synthetic_lt",
                   help="named spec; the options below override its fields")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-categories", type=int, help=f"number of categories, 3..{MAX_CATEGORIES}")
    p.add_argument("--image-size", type=int, help="square image side, px")
    p.add_argument("--max-frequent-images", type=int,
                   help="train images of the most frequent category")
    p.add_argument("--val-instances", type=int,
                   help="val images (hence at least instances) per category")
    p.add_argument("--max-objects", type=int, help="objects per image")
    p.add_argument("--train-images-per-category", type=int,
                   help="0: long-tailed train counts; n > 0: every category on n train images")
    a = p.parse_args(argv)
    overridable = ("seed", "num_categories", "image_size", "max_frequent_images",
                   "val_instances", "max_objects", "train_images_per_category")
    spec = replace(PRESETS[a.preset],
                   **{k: getattr(a, k) for k in overridable if getattr(a, k) is not None})
    try:
        spec.validate()
    except ValueError as e:
        p.error(str(e))
    out = generate(a.out, spec)
    with open(os.path.join(out, "lvis_v1_train.json")) as f:
        data = json.load(f)
    cats = data["categories"]
    groups = {g: sum(c["frequency"] == g for c in cats) for g in GROUPS}
    summary = (f"wrote {out}: {len(cats)} categories (rare {groups['r']}, common "
               f"{groups['c']}, frequent {groups['f']}), {len(data['images'])} train images, "
               f"{len(data['annotations'])} train objects")
    if spec.balanced:
        group = frequency_group(spec.train_images_per_category)
        summary += (f"; balanced: every category on {spec.train_images_per_category} train "
                    f"images, so all are {GROUP_NAMES[group]} under LVIS's thresholds and "
                    "the other groups (their APs too) are empty")
    print(summary, file=sys.stderr)


if __name__ == "__main__":
    main()
