"""Start-up cost of the training annotations: peak memory and time per process and together.

Generates an annotation file the size of LVIS v1 train (100k images, 1.27M annotations with
one ~50-point polygon each, 1203 long-tailed categories: about 1.1 GB; no image files), then
measures what every ``train_net.py`` process does at start-up up to having its training
data: register the dataset, ``prepare_datasets(cfg)`` (category metadata and, with
``DATALOADER.COMPACT_DATASET``, the conversion into the compact form, local rank 0 first),
then ``Trainer.build_train_loader(cfg)`` (``--stop-at loader``, the default: the dataset,
repeat factors and the loader's own copy of the dicts) or only the dataset the loader gets
(``--stop-at dicts``: ``Trainer.build_train_dataset``, or detectron2's
``get_detection_dataset_dicts`` in checkouts without it), then one pass over every dataset
dict (as an epoch reads them, so that every mapped page is resident).

It runs as ``--num-procs`` processes started by detectron2's ``launch`` (gloo without a
GPU), each reporting its peak resident set (``ru_maxrss``), its resident set after the
imports, and the wall and CPU time of each step. Mapped files count in the resident set of
every process that maps them, so the launcher also samples ``/proc/<pid>/smaps_rollup`` of
every rank every 0.5 s: each process's peak proportional set size (PSS: a page shared by n
processes counts 1/n in each), and the peak over time of the ranks' summed PSS and RSS, what
they hold together. ``--repo`` measures another checkout of eql_d2 (e.g. a ``git worktree``
of an older commit), put first on ``PYTHONPATH``; the cache folder ($EQL_D2_CACHE_DIR)
starts empty (``--runs 2`` measures a second start with the caches written by the first).

    python benchmarks/startup_memory.py generate --out /tmp/lvis_like/lvis_v1_train.json
    python benchmarks/startup_memory.py measure --json /tmp/lvis_like/lvis_v1_train.json \\
        [--repo /tmp/before] [--num-procs 2] [--runs 2] [--stop-at dicts] [--results out.json]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = "startup_memory_train"
# in this checkout and older ones; EQLv2 reads the category counts when the model is built
CONFIG = "configs/LVIS-v1/EQL/mask_rcnn_R50_FPN_1x_eqlv2_rfs.yaml"


# ----------------------------------------------------------------------------- generator


def generate(out, num_images=100_000, num_annotations=1_270_000, num_categories=1203,
             mean_points=50, seed=0):
    """Write an LVIS-v1-like annotation file to `out` (compact JSON, as LVIS's own).

    Category of each annotation: Zipf-like over categories (exponent 1.1), so image counts
    span LVIS's rare / common / frequent groups; polygons have 6 .. 2*mean_points-6 points
    inside their box, coordinates with 2 decimals. Returns the file size in bytes.
    """
    # not at the top: the measured processes time their first import of eql_d2 (_rank_main)
    from eql_d2.data.synthetic import frequency_group
    from eql_d2.utils.io import atomic_write

    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_categories + 1) ** 1.1
    cat = rng.choice(num_categories, size=num_annotations, p=p / p.sum()) + 1
    img = rng.integers(1, num_images + 1, size=num_annotations)
    order = np.argsort(img, kind="stable")  # annotations grouped by image, as in LVIS
    cat, img = cat[order], img[order]
    sizes = rng.choice(np.array([[640, 480], [480, 640], [640, 427], [500, 375]]), size=num_images)
    counts = np.bincount(np.unique(cat.astype(np.int64) * (num_images + 1) + img) // (num_images + 1),
                         minlength=num_categories + 1)[1:]

    dumps = json.JSONEncoder(separators=(",", ":")).encode
    with atomic_write(out) as f:
        f.write('{"info":{"description":"LVIS-v1-sized synthetic annotations"},"images":[')
        for i in range(num_images):
            w, h = (int(v) for v in sizes[i])
            neg = sorted(set(rng.integers(1, num_categories + 1, size=5).tolist()))
            f.write(("," if i else "") + dumps({
                "id": i + 1, "width": w, "height": h, "license": 1,
                "coco_url": f"http://images.cocodataset.org/train2017/{i + 1:012d}.jpg",
                "flickr_url": f"http://farm1.staticflickr.com/{i + 1}.jpg",
                "neg_category_ids": neg, "not_exhaustive_category_ids": neg[:1]}))
        f.write('],"annotations":[')
        chunk = 100_000
        for start in range(0, num_annotations, chunk):
            stop = min(start + chunk, num_annotations)
            n = stop - start
            wh = sizes[img[start:stop] - 1].astype(np.float64)
            bw = rng.uniform(0.05, 0.6, n) * wh[:, 0]
            bh = rng.uniform(0.05, 0.6, n) * wh[:, 1]
            x0 = rng.uniform(0, 1, n) * (wh[:, 0] - bw)
            y0 = rng.uniform(0, 1, n) * (wh[:, 1] - bh)
            npts = rng.integers(6, 2 * mean_points - 5, n)
            for k in range(n):
                m = int(npts[k])
                px = np.round(x0[k] + rng.uniform(0, 1, m) * bw[k], 2)
                py = np.round(y0[k] + rng.uniform(0, 1, m) * bh[k], 2)
                poly = np.stack([px, py], 1).reshape(-1).tolist()
                f.write(("," if start + k else "") + dumps({
                    "area": round(float(bw[k] * bh[k] * 0.6), 2), "iscrowd": 0,
                    "id": start + k + 1, "image_id": int(img[start + k]),
                    "bbox": [round(float(x0[k]), 2), round(float(y0[k]), 2),
                             round(float(bw[k]), 2), round(float(bh[k]), 2)],
                    "category_id": int(cat[start + k]), "segmentation": [poly]}))
        f.write('],"categories":[')
        for c in range(num_categories):
            n = int(counts[c])
            freq = frequency_group(n)
            name = f"category_{c + 1:04d}"
            f.write(("," if c else "") + dumps({
                "id": c + 1, "name": name, "synonyms": [name], "synset": f"{name}.n.01",
                "def": "a generated category", "frequency": freq, "image_count": n,
                "instance_count": int((cat == c + 1).sum())}))
        f.write('],"licenses":[{"id":1,"name":"none"}]}')
    return os.path.getsize(out)


# ----------------------------------------------------------------------------- measurement


def _rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rank_main(json_file, repo, out_dir, stop_at):
    """One train_net process from its first eql_d2 import to its training data."""
    t0 = time.perf_counter()
    from detectron2.data import get_detection_dataset_dicts
    from detectron2.utils import comm

    import eql_d2
    import eql_d2.modeling  # noqa: F401
    from eql_d2.config import get_eql_cfg
    from eql_d2.data import register_lvis_format
    from eql_d2.engine import Trainer, prepare_datasets

    rss_imports = _rss_kb()
    register_lvis_format(DATASET, json_file, os.path.dirname(json_file))
    cfg = get_eql_cfg(os.path.join(repo, CONFIG), [
        "DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST", "()",
        "MODEL.ROI_HEADS.NUM_CLASSES", "1203",
        # the generated file has no images; the data-loader workers are not started here
        "DATALOADER.CHECK_IMAGE_FILES", "False", "DATALOADER.NUM_WORKERS", "0"])
    t1, c1 = time.perf_counter(), time.process_time()
    prepare_datasets(cfg)
    t2, c2 = time.perf_counter(), time.process_time()
    if stop_at == "loader":
        data = Trainer.build_train_loader(cfg)._dataset
    elif hasattr(Trainer, "build_train_dataset"):
        data = Trainer.build_train_dataset(cfg)
    else:
        data = get_detection_dataset_dicts(cfg.DATASETS.TRAIN,
                                           filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    t3, c3 = time.perf_counter(), time.process_time()
    annotations = sum(len(data[i]["annotations"]) for i in range(len(data)))
    t4, c4 = time.perf_counter(), time.process_time()
    result = {
        "rank": comm.get_rank(),
        "pid": os.getpid(),
        "eql_d2": os.path.dirname(eql_d2.__file__),
        "data": type(data).__name__,
        "images": len(data),
        "annotations": annotations,
        "rss_after_imports_mib": rss_imports / 1024,
        "rss_end_mib": _rss_kb() / 1024,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "imports_s": t1 - t0,
        "prepare_datasets_s": t2 - t1,
        "training_data_s": t3 - t2,
        "pass_over_dicts_s": t4 - t3,
        # CPU time of the process: on a shared machine, steadier than wall time
        "prepare_datasets_cpu_s": c2 - c1,
        "training_data_cpu_s": c3 - c2,
        "pass_over_dicts_cpu_s": c4 - c3,
    }
    with open(os.path.join(out_dir, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)


def _launch_ranks(json_file, repo, out_dir, num_procs, stop_at):
    from detectron2.engine import launch

    launch(_rank_main, num_procs, dist_url="auto", args=(json_file, repo, out_dir, stop_at))


def _processes(launcher):
    """The launcher and the processes its launch() started (not multiprocessing's resource
    tracker); with one process, launch() runs the rank in the launcher itself."""
    try:
        with open(f"/proc/{launcher}/task/{launcher}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return [launcher]
    pids = [launcher]
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    pids.append(pid)
        except OSError:
            pass
    return pids


def _rollup_kib(pid):
    """{"Rss": KiB, "Pss": KiB} of process `pid`, or None once it has exited."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError):
        return None
    return out if len(out) == 2 else None


def _sample(proc, period=0.5):
    """[{pid: {"Rss": KiB, "Pss": KiB}} every `period` s] of the launcher `proc` and its
    ranks, until it exits."""
    samples = []
    while proc.poll() is None:
        now = {pid: _rollup_kib(pid) for pid in _processes(proc.pid)}
        samples.append({pid: v for pid, v in now.items() if v is not None})
        time.sleep(period)
    return samples


def _peaks(samples, pids):
    """Per pid of `pids` its sampled peak RSS and PSS, and the peak over time of their sums
    (MiB)."""
    per_pid = {pid: {k: max((s[pid][k] for s in samples if pid in s), default=0) / 1024
                     for k in ("Rss", "Pss")} for pid in pids}
    together = {f"{k.lower()}_mib": max((sum(s[p][k] for p in pids if p in s) for s in samples),
                                        default=0) / 1024 for k in ("Rss", "Pss")}
    return per_pid, together


def measure(json_file, repo=ROOT, num_procs=2, runs=1, stop_at="loader"):
    """[{"ranks": [per-rank result dict, ...], "together": {...}} per run]; runs share one
    (initially empty) cache folder."""
    json_file, repo = os.path.abspath(json_file), os.path.abspath(repo)
    results = []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as out_dir:
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
                           EQL_D2_CACHE_DIR=cache, OMP_NUM_THREADS="1")
                proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_ranks", json_file,
                                         repo, out_dir, str(num_procs), stop_at], env=env, cwd=repo)
                samples = _sample(proc)
                if proc.returncode:
                    raise subprocess.CalledProcessError(proc.returncode, proc.args)
                ranks = []
                for r in range(num_procs):
                    with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                        ranks.append(json.load(f))
                per_pid, together = _peaks(samples, [res["pid"] for res in ranks])
                for res in ranks:
                    res["sampled_peak_rss_mib"] = per_pid[res["pid"]]["Rss"]
                    res["sampled_peak_pss_mib"] = per_pid[res["pid"]]["Pss"]
                together["sum_of_peak_rss_mib"] = sum(r["peak_rss_mib"] for r in ranks)
                results.append({"ranks": ranks, "together": together})
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write an LVIS-v1-sized annotation file")
    g.add_argument("--out", required=True)
    g.add_argument("--scale", type=float, default=1.0, help="fraction of LVIS v1 train's size")
    g.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure", help="peak memory and time of start-up processes")
    m.add_argument("--json", required=True, help="annotation file (from `generate`)")
    m.add_argument("--repo", default=ROOT, help="eql_d2 checkout to measure (default: this one)")
    m.add_argument("--num-procs", type=int, default=2)
    m.add_argument("--runs", type=int, default=1)
    m.add_argument("--stop-at", choices=("loader", "dicts"), default="loader",
                   help="build the training loader, or only the dataset it gets")
    m.add_argument("--results", help="also write the results to this JSON file")
    r = sub.add_parser("_ranks")
    for a in ("json_file", "repo", "out_dir", "num_procs", "stop_at"):
        r.add_argument(a)
    args = ap.parse_args()

    if args.cmd == "generate":
        t0 = time.perf_counter()
        size = generate(args.out, num_images=int(100_000 * args.scale),
                        num_annotations=int(1_270_000 * args.scale), seed=args.seed)
        print(f"{args.out}: {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")
    elif args.cmd == "_ranks":
        _launch_ranks(args.json_file, args.repo, args.out_dir, int(args.num_procs), args.stop_at)
    else:
        results = measure(args.json, args.repo, args.num_procs, args.runs, args.stop_at)
        for i, run in enumerate(results):
            for res in run["ranks"]:
                print(f"run {i + 1} rank {res['rank']}: peak RSS {res['peak_rss_mib']:.0f} MiB "
                      f"(after imports {res['rss_after_imports_mib']:.0f}, at the end "
                      f"{res['rss_end_mib']:.0f}), sampled peak PSS {res['sampled_peak_pss_mib']:.0f} MiB; "
                      f"prepare_datasets {res['prepare_datasets_s']:.1f} s (CPU {res['prepare_datasets_cpu_s']:.1f} s), "
                      f"training data {res['training_data_s']:.1f} s (CPU {res['training_data_cpu_s']:.1f} s), "
                      f"pass over the dicts {res['pass_over_dicts_s']:.1f} s; {res['data']} of "
                      f"{res['images']} images / {res['annotations']} annotations ({res['eql_d2']})")
            t = run["together"]
            print(f"run {i + 1}, {len(run['ranks'])} processes together: peak PSS {t['pss_mib']:.0f} MiB, "
                  f"peak RSS {t['rss_mib']:.0f} MiB (sampled), sum of peak RSS {t['sum_of_peak_rss_mib']:.0f} MiB")
        if args.results:
            with open(args.results, "w") as f:
                json.dump({"json": os.path.abspath(args.json), "repo": os.path.abspath(args.repo),
                           "num_procs": args.num_procs, "stop_at": args.stop_at, "runs": results},
                          f, indent=1)


if __name__ == "__main__":
    main()
