"""Open Images Challenge evaluation speed and memory at the size of OID19 val, generated.

Generates a ground truth of ``--images`` images (default 41,620, the Challenge 2019 val
split) over 500 classes in a two-level hierarchy (100 parents of 4 leaves each), about 7.3
boxes per image (a fifth of the images with group-of boxes), positive and negative
image-level labels, and ``--dets-per-image`` detections per image (default 100; jittered
ground-truth boxes of the right, the parent or a random class, and random boxes), then, in
a child process under an address-space cap, builds the expanded ground truth from the
dataset dicts (:meth:`OIDGroundTruth.from_dataset_dicts`, what :class:`OIDEvaluator` does
once) and evaluates (:func:`evaluate_oid`). Reports the wall time of each step and the
child's peak resident set (``ru_maxrss``) as JSON.

    python benchmarks/oid_eval_speed.py                      # OID19 val size
    python benchmarks/oid_eval_speed.py --images 2000        # a quick look
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OID19_VAL_IMAGES = 41620


def make_case(num_images, dets_per_image, seed=0, parents=100, leaves_per_parent=4,
              boxes_per_image=7.3):
    """(dataset dicts, DetectionArrays, ClassHierarchy) of a generated Open Images split."""
    from detectron2.structures import BoxMode

    from eql_d2.evaluation.detections import DetectionArrays
    from eql_d2.evaluation.oid_evaluation import ClassHierarchy

    rng = np.random.default_rng(seed)
    num_classes = parents * (1 + leaves_per_parent)
    parent_of = {parents + k: [k // leaves_per_parent] for k in range(parents * leaves_per_parent)}
    hierarchy = ClassHierarchy(num_classes, parent_of)
    # long-tailed class popularity
    weight = 1.0 / np.arange(1, num_classes + 1) ** 0.9
    weight = rng.permutation(weight / weight.sum())
    size = 1000.0
    dicts, cols = [], {"image": [], "cls": [], "score": [], "box": []}
    for i in range(num_images):
        n = rng.poisson(boxes_per_image)
        classes = rng.choice(num_classes, size=max(1, n // 2), p=weight)
        cls = rng.choice(classes, size=n)
        xy = rng.uniform(0, size * 0.8, (n, 2))
        wh = rng.uniform(10, size * 0.3, (n, 2))
        group_of = (rng.random(n) < 0.3) & (rng.random() < 0.2)
        anns = [{"bbox": [*xy[k], *wh[k]], "bbox_mode": BoxMode.XYWH_ABS,
                 "category_id": int(cls[k]), "is_group_of": int(group_of[k])} for k in range(n)]
        neg = rng.choice(num_classes, size=rng.integers(0, 10), replace=False)
        neg = sorted(set(neg.tolist()) - set(cls.tolist()))
        dicts.append({"image_id": i + 1, "annotations": anns,
                      "pos_category_ids": sorted({int(c) + 1 for c in cls}),
                      "neg_category_ids": [c + 1 for c in neg]})
        # detections: half jittered ground truth (right, parent or random class), half random
        m = dets_per_image
        near = m // 2 if n else 0
        src = rng.integers(0, max(n, 1), near)
        box = np.concatenate([
            np.concatenate([xy[src], wh[src]], 1) + rng.normal(0, 8, (near, 4)),
            np.concatenate([rng.uniform(0, size * 0.8, (m - near, 2)),
                            rng.uniform(10, size * 0.3, (m - near, 2))], 1)])
        c = np.concatenate([cls[src], rng.choice(num_classes, m - near, p=weight)])
        swap = rng.random(m)
        c = np.where(swap < 0.15, rng.integers(0, num_classes, m), c)
        c = np.where((swap > 0.9) & (c >= parents), (c - parents) // leaves_per_parent, c)
        cols["image"].append(np.full(m, i + 1))
        cols["cls"].append(c)
        cols["score"].append(rng.random(m))
        cols["box"].append(box)
    dets = DetectionArrays(np.concatenate(cols["image"]), np.concatenate(cols["cls"]),
                           np.concatenate(cols["score"]), np.concatenate(cols["box"]))
    return dicts, dets, hierarchy


def run(args):
    from eql_d2.evaluation.oid_evaluation import OIDGroundTruth, evaluate_oid

    t0 = time.perf_counter()
    dicts, dets, hierarchy = make_case(args.images, args.dets_per_image, args.seed)
    t1 = time.perf_counter()
    rss_case = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gt = OIDGroundTruth.from_dataset_dicts(dicts, hierarchy.num_classes, hierarchy)
    t2 = time.perf_counter()
    result = evaluate_oid(gt, dets, hierarchy=hierarchy)
    t3 = time.perf_counter()
    out = {"images": args.images, "detections": len(dets),
           "gt_boxes": int(sum(len(d["annotations"]) for d in dicts)),
           "expanded_gt_boxes": len(gt.box_class), "classes": hierarchy.num_classes,
           "generate_s": round(t1 - t0, 1), "ground_truth_s": round(t2 - t1, 1),
           "evaluate_s": round(t3 - t2, 1), "mAP": round(result.mean_ap * 100, 2),
           "peak_rss_mb_after_generation": round(rss_case / 1024),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(out))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=OID19_VAL_IMAGES)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-limit-gb", type=float, default=16.0,
                        help="address-space cap of the child process")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run(args)
    limit = int(args.memory_limit_gb * 2**30)

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--images", str(args.images),
           "--dets-per-image", str(args.dets_per_image), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=cap,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = proc.stdout.strip().splitlines()[-1]
    result = {**json.loads(line), "memory_limit_gb": args.memory_limit_gb,
              "cpu": _cpu_name()}
    print(json.dumps(result, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
