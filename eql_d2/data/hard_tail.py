"""Appearance model of the hard-tail preset of :mod:`eql_d2.data.synthetic` (``appearance
"own_factors"``): categories whose rare and common members own what they look like.

In the attribute presets a category is a (shape, colour, texture) triple whose parts all
occur in frequent categories, so a rare category is a new combination of parts that the
frequent ones teach. Here every category is built from appearance factors of its own:

- a **body**: a closed outline, r(theta) = 1 + sum_k a_k cos(k theta + phi_k) over two or
  three harmonics k in 2..7 drawn for it (normalised to radius 1);
- **modes**: ``modes_per_category`` colour patterns (two colours and a layout: stripes,
  checker, spots, rings, sectors, halves or zigzag, with a period and an angle in the
  body's frame), one drawn per instance, so a category has several looks and a category
  with few train images shows only some of them;
- a **mark**: a small disc, square, triangle, ring or bar (about a quarter of the body's
  radius) at a fixed place in the body's frame, light or dark against the mode's colours.

Categories come in **kins** of ``kin_size`` members (near neighbours): members share body
and modes and differ only in their mark, its kind and place, a fine detail. Kins are
formed within an LVIS frequency group, so a rare or common category's body, modes and
mark are used by no frequent category (:func:`check_own_factors`).

Each instance is deformed (aspect ratio, shear and a low-frequency wobble of the outline,
all scaled by ``deformation``), rotated at random, scaled log-uniformly between the
spec's object sizes, may run off the image (a partial view, with probability
``truncation_prob``) and may be hidden in part by later objects or distractors; at least
``min_visible`` of its area stays in view. Distractors are bodies with a pattern (and half
of them a mark) drawn afresh for each one, so they look like objects but belong to no
category. Annotations describe the visible part: polygons traced from the visible pixels
(several when an occluder splits the object), the box around them and the visible area.

Everything here is a function of the spec's fields and a numpy Generator, so the same seed
gives the same categories and pixels.
"""

import colorsys
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "MARK_KINDS",
    "PATTERN_KINDS",
    "CategoryLook",
    "Mark",
    "Pattern",
    "category_looks",
    "check_own_factors",
    "describe",
    "render_image",
]

PATTERN_KINDS = ("stripes", "checker", "spots", "rings", "sectors", "halves", "zigzag")
MARK_KINDS = ("disc", "square", "triangle", "ring", "bar")

# outline vertices of a body
_BODY_VERTICES = 40
# the body's harmonic amplitudes add up to at most this, so its radius stays in
# [1 - a, 1 + a] / (1 + a) before deformation and a mark placed within _MARK_RADIUS of the
# centre stays inside the outline
_MAX_HARMONIC_SUM = 0.3
_MARK_RADIUS = 0.36
# an object needs this many visible pixels to be annotated (components smaller than
# _MIN_COMPONENT are dropped from its visible part)
_MIN_VISIBLE_PIXELS = 24
_MIN_COMPONENT = 6
_PLACEMENT_TRIES = 40


@dataclass(frozen=True)
class Pattern:
    """A two-colour layout in a body's frame (unit radius): ``kind`` of
    :data:`PATTERN_KINDS`, ``colours`` two RGB triples (first: where the layout is on),
    ``period`` in body radii, ``angle`` in radians."""

    kind: str
    colours: Tuple[Tuple[int, int, int], Tuple[int, int, int]]
    period: float
    angle: float


@dataclass(frozen=True)
class Mark:
    """A small shape of :data:`MARK_KINDS` centred at ``position`` (body frame), of radius
    ``size`` (body radii)."""

    kind: str
    position: Tuple[float, float]
    size: float


@dataclass(frozen=True)
class CategoryLook:
    """What category ``category`` (0-based) looks like, with the ids of its factors.

    ``body``, ``mode_ids`` and ``mark_id`` name the factors (strings unique over the whole
    vocabulary); kin members share ``body`` and ``mode_ids``.
    """

    category: int
    group: str
    kin: int
    body: str
    harmonics: Tuple[Tuple[int, float, float], ...]
    mode_ids: Tuple[str, ...]
    modes: Tuple[Pattern, ...]
    mark_id: str
    mark: Mark

    @property
    def factors(self):
        return {self.body, *self.mode_ids, self.mark_id}


# ----------------------------------------------------------------------------- categories


def _harmonics(rng):
    n = int(rng.integers(2, 4))
    ks = sorted(int(k) for k in rng.choice(np.arange(2, 8), size=n, replace=False))
    amps = rng.dirichlet(np.ones(n)) * rng.uniform(0.15, _MAX_HARMONIC_SUM)
    phases = rng.uniform(0, 2 * math.pi, n)
    return tuple((k, round(float(a), 4), round(float(p), 4)) for k, a, p in zip(ks, amps, phases))


def _colour(h, s, v):
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _pattern(rng):
    kind = PATTERN_KINDS[int(rng.integers(len(PATTERN_KINDS)))]
    h1 = float(rng.random())
    # the second colour: another hue, or the same hue darker (two tones of one colour)
    if rng.random() < 0.7:
        h2 = h1 + float(rng.uniform(0.2, 0.8))
        v2 = float(rng.uniform(0.35, 1.0))
    else:
        h2 = h1
        v2 = float(rng.uniform(0.2, 0.45))
    colours = (_colour(h1, float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.55, 1.0))),
               _colour(h2, float(rng.uniform(0.4, 1.0)), v2))
    return Pattern(kind, colours, round(float(rng.uniform(0.35, 0.8)), 4),
                   round(float(rng.uniform(0, math.pi)), 4))


def _kins(groups, kin_size, rng):
    """Kins (lists of category indices) formed within each frequency group in a seeded
    order; the last kin of a group may be smaller."""
    kins = []
    for g in ("f", "c", "r"):
        members = [k for k, gk in enumerate(groups) if gk == g]
        members = [members[i] for i in rng.permutation(len(members))]
        kins += [sorted(members[i:i + kin_size]) for i in range(0, len(members), kin_size)]
    return kins


def category_looks(groups: Sequence[str], modes_per_category: int, kin_size: int,
                   rng) -> List[CategoryLook]:
    """The look of each category, in category order.

    Args:
        groups: LVIS group ("r", "c" or "f") of each category, from its train image count.
        modes_per_category: colour patterns a category (its kin) has.
        kin_size: members of a kin (near neighbours that differ only in their mark).
        rng: numpy Generator; the same state gives the same looks.
    """
    looks: Dict[int, CategoryLook] = {}
    for kin_id, members in enumerate(_kins(groups, kin_size, rng)):
        harmonics = _harmonics(rng)
        modes = tuple(_pattern(rng) for _ in range(modes_per_category))
        mode_ids = tuple(f"mode{kin_id}.{m}" for m in range(modes_per_category))
        # members' marks differ in kind and place (evenly spaced angles around the centre)
        kinds = rng.permutation(len(MARK_KINDS))
        angle0 = float(rng.uniform(0, 2 * math.pi))
        radius = float(rng.uniform(0.18, _MARK_RADIUS))
        size = round(float(rng.uniform(0.24, 0.3)), 4)
        for j, k in enumerate(members):
            angle = angle0 + 2 * math.pi * j / len(members)
            mark = Mark(MARK_KINDS[int(kinds[j % len(MARK_KINDS)])],
                        (round(radius * math.cos(angle), 4), round(radius * math.sin(angle), 4)),
                        size)
            looks[k] = CategoryLook(
                category=k, group=groups[k], kin=kin_id, body=f"body{kin_id}",
                harmonics=harmonics, mode_ids=mode_ids, modes=modes,
                mark_id=f"mark{k}", mark=mark)
    return [looks[k] for k in range(len(groups))]


def check_own_factors(looks: Sequence[CategoryLook]):
    """Raise ValueError when a rare or common category uses a factor (body, mode or mark)
    that a frequent category uses, or when two categories share a mark."""
    frequent = set().union(*[lk.factors for lk in looks if lk.group == "f"])
    for lk in looks:
        if lk.group != "f" and lk.factors & frequent:
            raise ValueError(f"category {lk.category + 1} ({lk.group}) shares "
                             f"{sorted(lk.factors & frequent)} with a frequent category")
    marks = [lk.mark_id for lk in looks]
    if len(set(marks)) != len(marks):
        raise ValueError("two categories share a mark")


def describe(look: CategoryLook):
    """(name, synonyms, definition) of a category for its LVIS-format entry."""
    name = f"form{look.kin:03d}_{look.mark.kind}_{look.category + 1}"
    kinds = "/".join(p.kind for p in look.modes)
    return (name, [name, f"form {look.kin} with a {look.mark.kind} mark"],
            f"form {look.kin} ({kinds}) marked by a {look.mark.kind}")


# ----------------------------------------------------------------------------- rendering


def _outline(harmonics, wobble):
    """Body outline (unit radius, [V, 2]) with an instance's wobble (k, amplitude, phase)."""
    theta = np.linspace(0, 2 * math.pi, _BODY_VERTICES, endpoint=False)
    r = np.ones_like(theta)
    for k, a, p in harmonics:
        r += a * np.cos(k * theta + p)
    r /= 1 + sum(a for _, a, _ in harmonics)
    for k, a, p in wobble:
        r *= 1 + a * np.cos(k * theta + p)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], 1)


def _pattern_on(pattern, u, v):
    """Boolean pattern value at body-frame points (u, v)."""
    c, s = math.cos(pattern.angle), math.sin(pattern.angle)
    tu, tv = u * c + v * s, -u * s + v * c
    p = pattern.period
    half = p / 2
    kind = pattern.kind
    if kind == "stripes":
        return np.floor(tu / half) % 2 == 0
    if kind == "checker":
        return (np.floor(tu / half) + np.floor(tv / half)) % 2 == 0
    if kind == "spots":
        return ((tu % p) - half) ** 2 + ((tv % p) - half) ** 2 < (0.32 * p) ** 2
    if kind == "rings":
        return np.floor(np.hypot(u, v) / half) % 2 == 0
    if kind == "sectors":
        n = 2 * int(min(5, max(2, round(1.6 / p))))
        return np.floor((np.arctan2(v, u) + pattern.angle) / (2 * math.pi / n)) % 2 == 0
    if kind == "halves":
        return tu > (p - 0.575)
    if kind == "zigzag":
        tri = np.abs((tu / p) % 1.0 - 0.5) * p
        return np.floor((tv + tri) / half) % 2 == 0
    raise ValueError(f"unknown pattern {kind!r}")


def _mark_on(mark, u, v):
    """Boolean mark shape at body-frame points (u, v)."""
    x = (u - mark.position[0]) / mark.size
    y = (v - mark.position[1]) / mark.size
    if mark.kind == "disc":
        return x * x + y * y < 1
    if mark.kind == "square":
        return np.maximum(np.abs(x), np.abs(y)) < 0.85
    if mark.kind == "triangle":
        return (y < 0.8) & (np.abs(x) < (y + 1.0) * 0.55)
    if mark.kind == "ring":
        d = x * x + y * y
        return (d < 1) & (d > 0.3)
    if mark.kind == "bar":
        return (np.abs(x) < 1.1) & (np.abs(y) < 0.38)
    raise ValueError(f"unknown mark {mark.kind!r}")


def _background(size, rng):
    """Cluttered background of low-saturation colours: noise, blotches and strokes."""
    hue = float(rng.random())
    base = np.asarray(_colour(hue, float(rng.uniform(0, 0.25)), float(rng.uniform(0.3, 0.75))),
                      np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    img += rng.normal(0, 10, (size, size, 1))
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(4, 10))):
        fill = _colour(float(rng.random()), float(rng.uniform(0, 0.3)), float(rng.uniform(0.2, 0.85)))
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        rx, ry = (int(v) for v in rng.integers(3, size // 5, 2))
        draw.ellipse([x0 - rx, y0 - ry, x0 + rx, y0 + ry], fill=fill)
    for _ in range(int(rng.integers(3, 8))):
        fill = _colour(float(rng.random()), float(rng.uniform(0, 0.3)), float(rng.uniform(0.1, 0.9)))
        pts = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
        draw.line(pts, fill=fill, width=int(rng.integers(1, 3)))
    return np.asarray(pil).copy()


def _polygon_area(pts):
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


@dataclass
class _Item:
    """A placed object (``category`` >= 0) or distractor (``category`` -1)."""

    category: int
    pattern: Pattern
    mark: object  # Mark or None
    matrix: np.ndarray  # body frame -> pixels, [2, 2]
    centre: np.ndarray  # [2] pixels
    mask: np.ndarray  # [H, W] bool, the whole item in the image
    area: float  # of the whole outline, in and out of the image


def _place(harmonics, size, object_size, spec, rng):
    """An item's geometry: (matrix, centre, mask, area) of one random draw."""
    d = spec.deformation
    side = math.exp(rng.uniform(math.log(object_size[0]), math.log(object_size[1]))) * size
    aspect = math.exp(float(rng.normal(0, d)))
    shear = float(rng.normal(0, d / 2))
    angle = float(rng.uniform(0, 2 * math.pi))
    wobble = [(k, float(rng.normal(0, d / k)), float(rng.uniform(0, 2 * math.pi)))
              for k in (1, 2, 3)]
    c, s = math.cos(angle), math.sin(angle)
    r = side / 2
    matrix = np.array([[c, -s], [s, c]]) @ np.array(
        [[r * math.sqrt(aspect), shear * r], [0.0, r / math.sqrt(aspect)]])
    body = _outline(harmonics, wobble) @ matrix.T
    extent = float(np.abs(body).max())
    if rng.random() < spec.truncation_prob:
        # a partial view: the centre anywhere in the image, the body may leave it
        centre = rng.uniform(0, size - 1, 2)
    else:
        centre = rng.uniform(extent + 1, size - 2 - extent, 2) if extent < size / 2 - 2 \
            else np.array([size / 2, size / 2])
    mask_img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask_img).polygon([tuple(p) for p in (body + centre).tolist()], fill=1)
    return matrix, centre, np.asarray(mask_img).astype(bool), _polygon_area(body)


def _visible_polygons(mask):
    """Polygons (flat [x0, y0, ...] lists) and pixel count of the visible part `mask`;
    components under _MIN_COMPONENT pixels and outlines of < 3 points are left out."""
    # imported here: eql_d2.data.synthetic (and so this module) is imported by every
    # training process for its LVIS group rule, which has no use for OpenCV (~25 MB)
    import cv2  # OpenCV comes with lvis

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    polygons, area = [], 0
    for label in range(1, n):
        count = int(stats[label, cv2.CC_STAT_AREA])
        if count < _MIN_COMPONENT:
            continue
        part = (labels == label).astype(np.uint8)
        contours, _ = cv2.findContours(part, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outline = max(contours, key=len).reshape(-1, 2)
        if len(outline) < 3 or np.ptp(outline[:, 0]) == 0 or np.ptp(outline[:, 1]) == 0:
            continue
        polygons.append([float(v) for xy in outline for v in xy])
        area += count
    return polygons, area


def render_image(categories_of_objects, looks, spec, rng):
    """Draw one image: objects of `categories_of_objects` (category indices) and up to
    ``spec.max_distractors`` distractors on a cluttered background.

    Items are placed one after another, each later one drawn over the earlier ones; a
    placement is kept when it leaves every object placed so far (and itself) at least
    ``spec.min_visible`` of its whole area in view. An object that finds no such place is
    left out (the caller checks which categories were drawn).

    Returns:
        (PIL image, objects): each object a dict with ``category``, ``segmentation`` (list of
        flat polygons of its visible part), ``bbox`` [x, y, w, h] around them and ``area``
        (visible pixels).
    """
    size = spec.image_size
    object_size = (spec.min_object_size, spec.max_object_size)
    canvas = _background(size, rng)
    entries = list(categories_of_objects)
    entries += [-1] * int(rng.integers(0, spec.max_distractors + 1))  # -1: a distractor
    order = rng.permutation(len(entries))
    items: List[_Item] = []
    covered: List[np.ndarray] = []  # per item: pixels of later items over it
    for index in order:
        k = entries[int(index)]
        if k >= 0:
            look = looks[k]
            harmonics = look.harmonics
            pattern = look.modes[int(rng.integers(len(look.modes)))]
            mark = look.mark
        else:
            # a distractor: a body, pattern and (half the time) mark of its own
            harmonics = _harmonics(rng)
            pattern = _pattern(rng)
            mark = None
            if rng.random() < 0.5:
                a, r = float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.18, _MARK_RADIUS))
                mark = Mark(MARK_KINDS[int(rng.integers(len(MARK_KINDS)))],
                            (r * math.cos(a), r * math.sin(a)), float(rng.uniform(0.24, 0.3)))
        for _ in range(_PLACEMENT_TRIES):
            matrix, centre, mask, area = _place(harmonics, size, object_size, spec, rng)
            need = spec.min_visible
            if k >= 0 and mask.sum() < max(need * area, _MIN_VISIBLE_PIXELS):
                continue
            if any(it.category >= 0 and
                   (it.mask & ~cov & ~mask).sum() < max(need * it.area, _MIN_VISIBLE_PIXELS)
                   for it, cov in zip(items, covered)):
                continue
            for cov in covered:
                cov |= mask
            items.append(_Item(k, pattern, mark, matrix, centre, mask, area))
            covered.append(np.zeros((size, size), bool))
            break

    for it in items:
        ys, xs = np.nonzero(it.mask)
        if not len(xs):
            continue
        u, v = np.linalg.solve(it.matrix, np.stack([xs - it.centre[0], ys - it.centre[1]]))
        on = _pattern_on(it.pattern, u, v)
        first, second = (np.asarray(c, np.float32) for c in it.pattern.colours)
        # brightness varies from instance to instance (lighting)
        gain = float(rng.uniform(0.85, 1.15))
        colours = np.where(on[:, None], first, second) * gain
        if it.mark is not None:
            in_mark = _mark_on(it.mark, u, v)
            # light or dark, whichever stands out from the pattern's colours
            tone = 20.0 if (first.mean() + second.mean()) / 2 > 110 else 240.0
            colours[in_mark] = tone
        canvas[ys, xs] = np.clip(colours, 0, 255).astype(np.uint8)

    objects = []
    for it, cov in zip(items, covered):
        if it.category < 0:
            continue
        polygons, area = _visible_polygons(it.mask & ~cov)
        if area < _MIN_VISIBLE_PIXELS or not polygons:
            continue
        xs = [x for p in polygons for x in p[0::2]]
        ys = [y for p in polygons for y in p[1::2]]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        objects.append({"category": it.category, "segmentation": polygons,
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area)})
    return Image.fromarray(canvas), objects
