"""Hand-built LVIS-format ground truth and results for the evaluation and ensemble tests."""

import json


def box_ann(ann_id, image_id, category_id, x, y, w, h):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "bbox": [x, y, w, h], "area": w * h,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


def image(image_id, neg=(), not_exhaustive=(), size=100):
    return {"id": image_id, "width": size, "height": size,
            "coco_url": f"test://val/{image_id:06d}.png",
            "neg_category_ids": list(neg), "not_exhaustive_category_ids": list(not_exhaustive)}


def category(cat_id, name, frequency, image_count):
    return {"id": cat_id, "name": name, "frequency": frequency, "image_count": image_count}


def det(image_id, category_id, x, y, w, h, score, **extra):
    return {"image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h],
            "score": score, **extra}


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def per_category_case():
    """Four categories with known AP (IoU-independent: every hit is exact).

    - 1 "alpha" (f): one ground truth, found first -> AP 1.
    - 2 "beta" (c): two ground truths; ranked hit, false positive, hit -> precision 1 up to
      recall 0.5, then 2/3: AP = (51 * 1 + 50 * 2/3) / 101 over LVIS's 101 recall points.
    - 3 "gamma" (r): one ground truth, no detection -> AP 0.
    - 4 "delta" (r): no ground truth in this split -> no AP (blank), not in APr.
    """
    gt = {
        "images": [image(1, neg=[3, 4]), image(2, neg=[1, 4]), image(3, neg=[1, 2, 4])],
        "annotations": [box_ann(1, 1, 1, 10, 10, 30, 30), box_ann(2, 1, 2, 50, 50, 20, 20),
                        box_ann(3, 2, 2, 10, 10, 40, 40), box_ann(4, 3, 3, 5, 5, 20, 20)],
        "categories": [category(1, "alpha", "f", 200), category(2, "beta", "c", 30),
                       category(3, "gamma", "r", 3), category(4, "delta", "r", 1)],
    }
    results = [det(1, 1, 10, 10, 30, 30, 0.9), det(1, 2, 50, 50, 20, 20, 0.9),
               det(3, 2, 60, 60, 10, 10, 0.8), det(2, 2, 10, 10, 40, 40, 0.7)]
    expected_ap = {1: 100.0, 2: 100.0 * (51 + 50 * 2 / 3) / 101, 3: 0.0, 4: None}
    expected_dets = {1: 1, 2: 3, 3: 0, 4: 0}
    return gt, results, expected_ap, expected_dets
