"""LVIS evaluation speed and memory: lvis-api (``TEST.EVAL.BACKEND lvis``) beside the fast
backend (``fast``), on a generated LVIS-format split.

Generates a federated ground truth (images with positive, negative and not-exhaustive
categories, r / c / f categories, some without ground truth) and a detection list with up
to ``--dets-per-image`` detections per image (some images above the 300 cap, some without
detections, scores with ties), then evaluates it with each backend in a fresh process and
reports wall time and the child's peak resident set (``ru_maxrss``), for bbox and segm
(RLE masks), and whether every metric and per-category AP agree. lvis-api starts from the
results list (what detectron2's evaluator holds after gathering every process's
predictions), the fast backend from the detections shard (what eql_d2's evaluator reads).

    python benchmarks/lvis_eval_speed.py --images 500          # a few minutes on 2 cores
    python benchmarks/lvis_eval_speed.py --lvis-val-size --ap-fixed 10000 \\
        --workdir /tmp/lvis_val_size --lvis-memory-limit-gb 18   # 19,809 images, ~244k objects
    python benchmarks/lvis_eval_speed.py --images 500 --tasks bbox --backends fast
"""

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LVIS v1 val: 19,809 images, 244,707 objects (12.4 per image), 1203 categories
LVIS_VAL = dict(images=19809, categories=1203, objects_per_image=12.4)


# ----------------------------------------------------------------------------- generator


def _polygon_in_box(rng, x, y, w, h, points=8):
    """A star-shaped polygon inside the box (x, y, w, h), as a flat [x0, y0, x1, y1, ...]."""
    t = np.sort(rng.uniform(0, 2 * np.pi, points))
    r = rng.uniform(0.6, 1.0, points)
    px = x + w / 2 + np.cos(t) * r * w / 2
    py = y + h / 2 + np.sin(t) * r * h / 2
    return np.round(np.stack([px, py], 1).ravel(), 2).tolist()


def make_lvis_case(num_images=50, num_categories=40, objects_per_image=4.0, dets_per_image=100,
                   masks=False, score_decimals=2, seed=0, full_images=False):
    """A random LVIS-format ground truth and result list.

    Ground truth: categories in LVIS's r / c / f proportions (about 10 % have no ground truth
    in the split, and some of these appear in negative lists); per image a few positive
    categories with 1..n instances of log-uniform size (small, medium and large, some areas
    exactly on the 32^2 and 96^2 range bounds), negative categories, and not-exhaustive ones
    among the positives. Areas are the polygon mask areas, as LVIS's.

    Results: per image 0 .. 1.3 x `dets_per_image` detections (about 8 % of images none,
    some above the cap): jittered ground-truth boxes of the right or a wrong category and
    random boxes of positive, negative and unverified categories; scores rounded to
    `score_decimals` (ties), some exact duplicates. With `masks`, each result carries an
    RLE ``segmentation`` (compressed, str counts) as detectron2 writes it.

    `full_images`: every image with detections has `dets_per_image` .. 1.3 x that many.

    Returns (gt dict, results list).
    """
    categories, parts = _case_parts(num_images, num_categories, objects_per_image,
                                    dets_per_image, masks, score_decimals, seed, full_images)
    images, annotations, results = [], [], []
    for image, anns, dets in parts:
        images.append(image)
        annotations.extend(anns)
        results.extend(dets)
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, results


def _case_parts(num_images, num_categories, objects_per_image, dets_per_image, masks,
                score_decimals, seed, full_images):
    """(categories, iterator of (image, its annotations, its results)) of
    :func:`make_lvis_case`, one image at a time."""
    rng = np.random.default_rng(seed)
    cat_ids = np.arange(1, num_categories + 1)
    freq = rng.choice(np.array(["r", "c", "f"]), size=num_categories, p=[0.28, 0.38, 0.34])
    absent = rng.random(num_categories) < 0.1
    present = cat_ids[~absent]
    weight = np.where(freq[~absent] == "f", 6.0, np.where(freq[~absent] == "c", 2.0, 0.5))
    weight /= weight.sum()
    categories = [{"id": int(c), "name": f"cat_{c}", "frequency": str(f),
                   "image_count": int({"r": 5, "c": 50, "f": 500}[f])}
                  for c, f in zip(cat_ids, freq)]

    return categories, _image_parts(rng, cat_ids, present, weight, num_images, objects_per_image,
                                    dets_per_image, masks, score_decimals, full_images)


def _image_parts(rng, cat_ids, present, weight, num_images, objects_per_image, dets_per_image,
                 masks, score_decimals, full_images):
    import pycocotools.mask as mask_utils

    num_annotations = 0
    for img_id in range(1, num_images + 1):
        annotations, results = [], []
        width, height = (int(v) for v in rng.integers(64, 641, size=2))
        image = {"id": img_id, "width": width, "height": height,
                 "coco_url": f"synthetic://val/{img_id:06d}.jpg"}
        n_pos = min(len(present), max(1, rng.poisson(max(objects_per_image / 3.0, 0.5))))
        pos = rng.choice(present, size=n_pos, replace=False, p=weight)
        boxes = []
        for c in pos:
            for _ in range(int(rng.geometric(0.4)) + int(rng.random() < 0.3) * int(rng.integers(0, 3))):
                side = np.exp(rng.uniform(np.log(4), np.log(min(width, height))))
                aspect = np.exp(rng.uniform(-0.7, 0.7))
                w = float(min(width - 1, max(2.0, side * aspect)))
                h = float(min(height - 1, max(2.0, side / aspect)))
                x = float(rng.uniform(0, width - w))
                y = float(rng.uniform(0, height - h))
                poly = _polygon_in_box(rng, x, y, w, h)
                rle = mask_utils.merge(mask_utils.frPyObjects([poly], height, width))
                area = float(mask_utils.area(rle))
                if area == 0:
                    poly = [x, y, x + w, y, x + w, y + h, x, y + h]
                    area = float(mask_utils.area(mask_utils.merge(
                        mask_utils.frPyObjects([poly], height, width))))
                if rng.random() < 0.02:
                    area = float(rng.choice([32.0 ** 2, 96.0 ** 2]))
                num_annotations += 1
                ann_id = num_annotations
                annotations.append({"id": ann_id, "image_id": img_id, "category_id": int(c),
                                    "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                                    "area": area, "segmentation": [poly]})
                boxes.append((int(c), x, y, w, h))
        others = np.setdiff1d(cat_ids, pos)
        neg = rng.choice(others, size=min(len(others), rng.poisson(4)), replace=False)
        not_exhaustive = [int(c) for c in pos if rng.random() < 0.15]
        image["neg_category_ids"] = sorted(int(c) for c in neg)
        image["not_exhaustive_category_ids"] = not_exhaustive

        low = dets_per_image if full_images else 1
        n_dets = 0 if rng.random() < 0.08 else int(rng.integers(low, int(1.3 * dets_per_image) + 2))
        labelled = np.concatenate([pos, neg]).astype(np.int64)
        for _ in range(n_dets):
            u = rng.random()
            if boxes and u < 0.45:
                c, x, y, w, h = boxes[rng.integers(len(boxes))]
                if rng.random() < 0.2:
                    c = int(rng.choice(labelled))
                x += rng.normal(0, 0.08) * w
                y += rng.normal(0, 0.08) * h
                w *= np.exp(rng.normal(0, 0.1))
                h *= np.exp(rng.normal(0, 0.1))
            else:
                c = int(rng.choice(labelled) if u < 0.85 else rng.choice(cat_ids))
                side = np.exp(rng.uniform(np.log(3), np.log(min(width, height))))
                w = h = side
                x, y = rng.uniform(0, width - side), rng.uniform(0, height - side)
            x, y = float(np.clip(x, 0, width - 2)), float(np.clip(y, 0, height - 2))
            w, h = float(np.clip(w, 1, width - x)), float(np.clip(h, 1, height - y))
            score = float(np.round(rng.random(), score_decimals))
            r = {"image_id": img_id, "category_id": int(c), "score": score,
                 "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)]}
            if masks:
                poly = _polygon_in_box(rng, x, y, w, h)
                rle = mask_utils.merge(mask_utils.frPyObjects([poly], height, width))
                rle["counts"] = rle["counts"].decode("ascii")
                r["segmentation"] = rle
            results.append(r)
            if rng.random() < 0.02:
                results.append(dict(r))
        yield image, annotations, results


def write_case(workdir, task, args):
    """Generate the case image by image into `workdir`: ``gt_<task>.json``, the results list
    ``results_<task>.json`` (what lvis-api reads) and the same detections as one shard,
    ``shards_<task>/`` (what the evaluator's main process reads). Returns the counts."""
    from eql_d2.evaluation.detections import DetectionArrays, save_shard

    categories, parts = _case_parts(args.images, args.categories, args.objects_per_image,
                                    args.dets_per_image, task == "segm", 2, args.seed,
                                    args.full_images)
    images, annotations, columns = [], [], []
    num_results = 0
    with open(os.path.join(workdir, f"results_{task}.json"), "w") as f:
        f.write("[")
        for image, anns, dets in parts:
            images.append(image)
            annotations.extend(anns)
            if dets:
                f.write(("," if num_results else "") + json.dumps(dets)[1:-1])
                num_results += len(dets)
                columns.append(DetectionArrays.from_dicts(dets))
        f.write("]")
    with open(os.path.join(workdir, f"gt_{task}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    save_shard(DetectionArrays.concatenate(columns), os.path.join(workdir, f"shards_{task}"),
               0, 1, token=0, image_ids=[img["id"] for img in images])
    return {"images": len(images), "objects": len(annotations), "results": num_results}


# ----------------------------------------------------------------------------- measure


def _measure(args):
    """Child process: one backend on one task; prints a JSON line. lvis-api gets the results
    list (what detectron2's evaluator holds after its gather), the fast backend the shard
    (what eql_d2's evaluator reads); both are loaded before the clock starts."""
    import logging

    from lvis import LVIS

    from eql_d2.evaluation.detections import load_shards
    from eql_d2.evaluation.lvis_evaluation import _run_lvis_eval, per_category_ap
    from eql_d2.evaluation.results_io import top_k_per

    logging.disable(logging.WARNING)
    if args.backend == "lvis":
        with open(os.path.join(args.workdir, f"results_{args.task}.json")) as f:
            results = json.load(f)
    else:
        results, _ = load_shards(os.path.join(args.workdir, f"shards_{args.task}"), 1, 0)
    gt = LVIS(os.path.join(args.workdir, f"gt_{args.task}.json"))
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    index, max_dets = None, args.max_dets
    if args.ap_fixed:  # AP-fixed: top K per category over the split, no per-image cap
        max_dets = -1
        if args.backend == "lvis":
            results = top_k_per(results, "category_id", args.ap_fixed)
        else:
            index = results.top_k_per("category_id", args.ap_fixed)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = _run_lvis_eval(gt, results, args.task, max_dets, args.backend, index)
    seconds = time.perf_counter() - start
    ap = per_category_ap(ev)
    print(json.dumps({"seconds": seconds, "rss_before_kb": rss_loaded,
                      "metrics": dict(ev.get_results()),
                      "per_category": {str(k): (None if v != v else v) for k, v in ap.items()},
                      "evaluator": type(ev).__name__}))


def _rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _run_child(workdir, task, backend, max_dets, ap_fixed=0, memory_limit_gb=0.0):
    """One evaluation in a fresh interpreter: its JSON line plus ``peak_rss_kb``, the
    child's own peak resident set (``os.wait4``'s rusage of that child). With
    `memory_limit_gb` the child is stopped once its resident set passes that many GB
    (checked twice a second) and ``{"failed": ...}`` comes back instead of figures."""
    cmd = [sys.executable, os.path.abspath(__file__), "_child", "--workdir", workdir,
           "--task", task, "--backend", backend, "--max-dets", str(max_dets),
           "--ap-fixed", str(ap_fixed)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        stopped = False
        while memory_limit_gb:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if _rss_kb(proc.pid) > memory_limit_gb * 2 ** 20:
                proc.kill()
                stopped = True
                break
            time.sleep(0.5)
        if not memory_limit_gb or stopped:
            _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if stopped:
            return {"failed": f"stopped at a resident set above {memory_limit_gb:g} GB after "
                              f"{seconds:.0f} s (loading included)", "peak_rss_kb": usage.ru_maxrss}
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    result["peak_rss_kb"] = usage.ru_maxrss
    return result


def _compare(outs):
    a, b = outs["lvis"], outs["fast"]
    row = {"max_metric_diff": max(abs(a["metrics"][k] - b["metrics"][k]) for k in a["metrics"]),
           "max_category_ap_diff": max(
               (abs(a["per_category"][k] - b["per_category"][k])
                for k in a["per_category"] if a["per_category"][k] is not None), default=0.0)}
    assert all((a["per_category"][k] is None) == (b["per_category"][k] is None)
               for k in a["per_category"])
    row["time_ratio"] = a["seconds"] / b["seconds"]
    row["rss_ratio"] = a["peak_rss_kb"] / b["peak_rss_kb"]
    row["eval_rss_ratio"] = a["eval_rss_kb"] / max(b["eval_rss_kb"], 1)
    print(f"  lvis / fast: time x{row['time_ratio']:.1f}, peak RSS x{row['rss_ratio']:.2f}, "
          f"evaluation's RSS x{row['eval_rss_ratio']:.2f}; "
          f"largest difference: metrics {row['max_metric_diff']:.1e}, "
          f"per-category AP {row['max_category_ap_diff']:.1e}", flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--categories", type=int, default=1203)
    parser.add_argument("--objects-per-image", type=float, default=LVIS_VAL["objects_per_image"])
    parser.add_argument("--dets-per-image", type=int, default=300)
    parser.add_argument("--full-images", action="store_true",
                        help="every image with detections has 1-1.3x --dets-per-image of them")
    parser.add_argument("--lvis-val-size", action="store_true",
                        help="LVIS v1 val's size: 19,809 images, 1203 categories, ~244k objects, "
                             "300 or more detections per image (implies --full-images)")
    parser.add_argument("--tasks", nargs="+", default=["bbox", "segm"])
    parser.add_argument("--backends", nargs="+", default=["lvis", "fast"])
    parser.add_argument("--max-dets", type=int, default=300)
    parser.add_argument("--ap-fixed", type=int, default=0,
                        help="also measure AP-fixed with this many detections per category")
    parser.add_argument("--lvis-memory-limit-gb", type=float, default=0.0,
                        help="stop lvis-api once its resident set passes this (reported as failed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None,
                        help="where the generated files go (kept; generated once per task)")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.lvis_val_size:
        args.images, args.categories = LVIS_VAL["images"], LVIS_VAL["categories"]
        args.objects_per_image = LVIS_VAL["objects_per_image"]
        args.full_images = True

    workdir = args.workdir or tempfile.mkdtemp(prefix="lvis_eval_speed_")
    os.makedirs(workdir, exist_ok=True)
    rows = []
    for task in args.tasks:
        start = time.perf_counter()
        done = os.path.join(workdir, f"case_{task}.json")
        if not os.path.isfile(done):
            # in a child process, so that the generator's memory is returned before measuring
            subprocess.run([sys.executable, os.path.abspath(__file__), "_generate",
                            "--workdir", workdir, "--task", task, "--args", json.dumps(vars(args))],
                           cwd=ROOT, check=True)
        with open(done) as f:
            counts = json.load(f)
        print(f"{task}: {counts['images']} images, {counts['objects']} objects, "
              f"{counts['results']} results, {args.categories} categories "
              f"(ready in {time.perf_counter() - start:.0f} s)", flush=True)
        modes = [("AP", 0)] + ([("AP-fixed", args.ap_fixed)] if args.ap_fixed else [])
        for mode, ap_fixed in modes:
            outs = {}
            for backend in args.backends:
                limit = args.lvis_memory_limit_gb if backend == "lvis" else 0.0
                outs[backend] = o = _run_child(workdir, task, backend, args.max_dets, ap_fixed, limit)
                if "failed" in o:
                    print(f"  {mode} {backend:5s}: {o['failed']} (peak RSS "
                          f"{o['peak_rss_kb'] / 1024:.0f} MB)", flush=True)
                    continue
                o["eval_rss_kb"] = o["peak_rss_kb"] - o["rss_before_kb"]
                print(f"  {mode} {backend:5s} ({o['evaluator']}): {o['seconds']:.1f} s, "
                      f"peak RSS {o['peak_rss_kb'] / 1024:.0f} MB, of which the evaluation "
                      f"{o['eval_rss_kb'] / 1024:.0f} MB (above imports, ground truth and the "
                      f"loaded detections), AP {100 * o['metrics']['AP']:.3f}", flush=True)
            row = {"task": task, "mode": mode, **counts, "categories": args.categories,
                   "dets_per_image": args.dets_per_image, **outs}
            if "lvis" in outs and "fast" in outs and not any("failed" in o for o in outs.values()):
                row.update(_compare(outs))
            rows.append(row)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child = argparse.ArgumentParser()
        for flag in ("--workdir", "--task", "--backend"):
            child.add_argument(flag, required=True)
        child.add_argument("--max-dets", type=int, default=300)
        child.add_argument("--ap-fixed", type=int, default=0)
        _measure(child.parse_args(sys.argv[2:]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_generate":
        gen = argparse.ArgumentParser()
        for flag in ("--workdir", "--task", "--args"):
            gen.add_argument(flag, required=True)
        g = gen.parse_args(sys.argv[2:])
        counts = write_case(g.workdir, g.task, argparse.Namespace(**json.loads(g.args)))
        with open(os.path.join(g.workdir, f"case_{g.task}.json"), "w") as f:
            json.dump(counts, f)
    else:
        main()
