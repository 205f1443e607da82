"""LVIS-format results files: checked reading (written with :func:`eql_d2.utils.io.write_json_atomic`).

A results file is what ``lvis.LVISResults`` reads and the LVIS evaluation server takes:
a JSON list of ``{"image_id", "category_id", "score", "bbox": [x, y, w, h]}`` with an
optional ``"segmentation"`` (compressed RLE), category ids as in the annotation JSON.
Scores and box values must be finite and box sizes non-negative (Python's json reads the
``NaN`` and ``Infinity`` it writes by default, which would otherwise rank or merge as
numbers); write results with ``allow_nan=False``.
"""

import math
import numbers
from collections import defaultdict

from ..utils.io import read_json

__all__ = ["read_lvis_results", "check_lvis_results", "top_k_per"]


def _first(items, n=5):
    items = sorted(items)
    return f"{items[:n]}{' ...' if len(items) > n else ''} ({len(items)} in all)"


def check_lvis_results(results, image_ids, category_ids, source, gt_source="the annotations"):
    """Raise ValueError naming `source` unless `results` is a valid LVIS results list whose
    image and category ids all occur in `image_ids` / `category_ids`."""
    if not isinstance(results, list):
        raise ValueError(f"{source}: an LVIS results file is a JSON list of detections, "
                         f"got {type(results).__name__}")
    image_ids, category_ids = set(image_ids), set(category_ids)
    bad_images, bad_categories = set(), set()
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise ValueError(f"{source}: detection #{i} is {type(r).__name__}, not an object")
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise ValueError(f"{source}: detection #{i} has no '{key}'")
        if not isinstance(r["score"], numbers.Real):
            raise ValueError(f"{source}: detection #{i} has non-numeric score {r['score']!r}")
        if not math.isfinite(r["score"]):
            raise ValueError(f"{source}: detection #{i} has non-finite score {r['score']!r}")
        bbox = r.get("bbox")
        if bbox is None and "segmentation" not in r:
            raise ValueError(f"{source}: detection #{i} has neither 'bbox' nor 'segmentation'")
        if bbox is not None and not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
                                     and all(isinstance(v, numbers.Real) for v in bbox)):
            raise ValueError(f"{source}: detection #{i} has malformed bbox {bbox!r} "
                             "(want [x, y, width, height])")
        if bbox is not None and not all(math.isfinite(v) for v in bbox):
            raise ValueError(f"{source}: detection #{i} has a non-finite bbox {list(bbox)!r}")
        if bbox is not None and (bbox[2] < 0 or bbox[3] < 0):
            raise ValueError(f"{source}: detection #{i} has a bbox of negative width or height "
                             f"{list(bbox)!r} (want [x, y, width, height])")
        seg = r.get("segmentation")
        if seg is not None and not (isinstance(seg, dict) and "size" in seg and "counts" in seg):
            raise ValueError(f"{source}: detection #{i} has a segmentation that is not "
                             "compressed RLE ({'size': [h, w], 'counts': ...})")
        if r["image_id"] not in image_ids:
            bad_images.add(r["image_id"])
        if r["category_id"] not in category_ids:
            bad_categories.add(r["category_id"])
    if bad_images:
        raise ValueError(f"{source}: image ids not in {gt_source}: {_first(bad_images)}")
    if bad_categories:
        raise ValueError(f"{source}: category ids not in {gt_source}: {_first(bad_categories)}")
    return results


def read_lvis_results(path, image_ids, category_ids, gt_source="the annotations"):
    """Read and check an LVIS results JSON (see :func:`check_lvis_results`)."""
    results = read_json(path, "LVIS results file")
    return check_lvis_results(results, image_ids, category_ids, path, gt_source)


def top_k_per(results, key, k):
    """The `k` highest-scoring results of each value of `key` ("image_id", "category_id")."""
    groups = defaultdict(list)
    for r in results:
        groups[r[key]].append(r)
    kept = []
    for dets in groups.values():
        dets.sort(key=lambda r: r["score"], reverse=True)
        kept.extend(dets[:k])
    return kept
