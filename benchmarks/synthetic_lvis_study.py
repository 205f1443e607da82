#!/usr/bin/env python
"""The multi-seed study of the papers' claims on Synthetic-LVIS (federated val), and the
same study on converged models of the hard-tail preset (``--study hard_tail``).

    # start one driver per free core; each takes the next run nobody has claimed
    nohup benchmarks/synthetic_lvis_study.sh > output/study/driver0.log 2>&1 &
    nohup benchmarks/synthetic_lvis_study.sh > output/study/driver1.log 2>&1 &
    benchmarks/synthetic_lvis_study.py table            # Markdown tables of what is done
    benchmarks/synthetic_lvis_study.py plots            # regime plots into docs/regime/

Every run trains one config on one generated dataset and one training seed (seed s uses
the Synthetic-LVIS preset generated with --seed s and SEED s, so the arms of a comparison
are paired by seed), one thread, ``--resume`` from its last checkpoint, then evaluates on
the federated val (the configs' DATASETS.TEST). A finished run's ``final_metrics.json``,
``regime_indicators.jsonl.gz``, ``metrics.json.gz``, per-category AP
(``per_category_bbox_<dataset>.csv``) and ``config.yaml`` are copied to ``benchmarks/results/
synthetic_lvis_study/<run>/``, which is kept in the repository: a run with results there is
never repeated, so a later session (or another machine) continues the study where it
stopped. Checkpoints stay in --out (not kept); once a run has finished, only its
``model_final.pth`` stays there (second stages start from it).

Runs are taken in the order of :data:`RUNS`, so that a partial study covers every claim
once before it repeats any: the main arms for seed 0, ATSS focal on Synthetic-LT (its
regime indicators), the ablations and the balanced check (seed 0), the main arms for seed
1, the Synthetic-LT two-stage runs (the 700-iteration comparison under the federated
protocol), the main arms for seed 2, then the baselines the papers beat (:data:`BASELINES`:
class-aware sampling, class-balanced loss, focal loss, and the decoupled cRT, LWS and BAGS
after their softmax first stage) seed by seed. A second stage (:data:`FIRST_STAGES`) starts
from its first stage's ``model_final.pth`` in --out, and waits while that run is not done;
a kept first stage whose checkpoint is not in --out (a new machine) is trained again first.
A run is claimed with a lock folder holding the driver's pid; a lock whose process is gone
is taken over.

``--study hard_tail`` (docs/HARD_TAIL.md) trains the configs of configs/Synthetic-HardTail
to their schedules in epochs on the ``synthetic_hard_tail`` preset of each seed, keeps its
results in ``benchmarks/results/hard_tail_study/`` and runs in ``output/hard_tail_calibration``
by default, where benchmarks/hard_tail_calibration.sh trains the two baselines with the same
configs, seeds and data: a baseline run that driver finished is adopted, not repeated. Its
order: the three claims (EFL, EQL, EQLv2) over all seeds, sigmoid, EQL and EQLv2 without
repeat factor sampling, the other claims' arms (image-level labels off, component
ablations) seed by seed, the baselines the papers beat (:data:`BASELINES`, with
their second stages straight after their first) seed by seed, and the two calibration
baselines last, so run the calibration first (not both on one baseline).

    nohup benchmarks/synthetic_lvis_study.sh --study hard_tail > output/hard_tail_study0.log 2>&1 &
    benchmarks/synthetic_lvis_study.py table --study hard_tail
"""

import argparse
import gzip
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# $EQL_D2_STUDY_RESULTS: a driver running from another checkout (say a snapshot of the code
# the study runs with) can keep its results in the repository being worked on
RESULTS = os.environ.get("EQL_D2_STUDY_RESULTS",
                         os.path.join(ROOT, "benchmarks", "results", "synthetic_lvis_study"))
SEEDS = (0, 1, 2)
LVIS_CFG = "configs/Synthetic-LVIS"
SLT_SCHEDULE = ["SOLVER.MAX_ITER", "700", "SOLVER.STEPS", "(540, 650)"]
# every run writes the regime indicators (opt-in in training), a snapshot every 100 iterations
REGIME = ["MODEL.CLS_LOSS.REGIME_INDICATORS", "True", "MODEL.CLS_LOSS.LOG_PERIOD", "100"]

# arm name -> (config, extra options, dataset kind)
ARMS = {
    "atss_focal": (f"{LVIS_CFG}/atss_R18_FPN_focal.yaml", [], "lvis"),
    "atss_efl": (f"{LVIS_CFG}/atss_R18_FPN_efl.yaml", [], "lvis"),
    "frcnn_sigmoid": (f"{LVIS_CFG}/EQL/faster_rcnn_R18_FPN_sigmoid.yaml", [], "lvis"),
    "frcnn_eql": (f"{LVIS_CFG}/EQL/faster_rcnn_R18_FPN_eql.yaml", [], "lvis"),
    "frcnn_eqlv2": (f"{LVIS_CFG}/EQL/faster_rcnn_R18_FPN_eqlv2.yaml", [], "lvis"),
    # ablations (EFL Tab. 3, EQL Tab. 4)
    "atss_efl_focusing_only": (f"{LVIS_CFG}/atss_R18_FPN_efl.yaml",
                               ["MODEL.CLS_LOSS.EFL.WEIGHTING_FACTOR", "False"], "lvis"),
    "atss_efl_weighting_only": (f"{LVIS_CFG}/atss_R18_FPN_efl.yaml",
                                ["MODEL.CLS_LOSS.EFL.FOCUSING_FACTOR", "False"], "lvis"),
    "frcnn_eql_no_excluding_function": (f"{LVIS_CFG}/EQL/faster_rcnn_R18_FPN_eql.yaml",
                                        ["MODEL.CLS_LOSS.EQL.EXCLUDING_FUNCTION", "False"], "lvis"),
    # all categories equally frequent (EFL Tab. 9: EFL = focal there)
    "balanced_atss_focal": (f"{LVIS_CFG}/balanced_atss_R18_FPN_focal.yaml", [], "balanced"),
    "balanced_atss_efl": (f"{LVIS_CFG}/balanced_atss_R18_FPN_efl.yaml", [], "balanced"),
    # BENCHMARKS.md's 700-iteration Synthetic-LT Faster R-CNN runs, federated and exhaustive val
    "slt_sigmoid": ("configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_sigmoid.yaml", SLT_SCHEDULE,
                    "slt"),
    "slt_eql": ("configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_eql.yaml", SLT_SCHEDULE, "slt"),
    "slt_eqlv2": ("configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_eqlv2.yaml", SLT_SCHEDULE, "slt"),
    # the one-stage regime on Synthetic-LT, for the indicators (BENCHMARKS.md's ATSS runs)
    "slt_atss_focal": ("configs/Synthetic-LT/atss_R18_FPN_focal.yaml",
                       SLT_SCHEDULE + ["DATALOADER.REPEAT_THRESHOLD", "0.001"], "slt"),
    # the baselines the papers beat (EQL Tab. 5; the EQLv2 README's decoupled methods)
    "frcnn_sigmoid_cas": (f"{LVIS_CFG}/EQL/faster_rcnn_R18_FPN_sigmoid_cas.yaml", [], "lvis"),
    "frcnn_cb": (f"{LVIS_CFG}/EQL/faster_rcnn_R18_FPN_cb.yaml", [], "lvis"),
    "frcnn_focal": (f"{LVIS_CFG}/EQL/faster_rcnn_R18_FPN_focal.yaml", [], "lvis"),
    # the class-balanced loss with its background weighed as a class of unlimited samples
    # (with the default unweighted background, the frequent categories' samples weigh ~0.02)
    "frcnn_cb_background_as_class": (
        f"{LVIS_CFG}/EQL/faster_rcnn_R18_FPN_cb.yaml",
        ["MODEL.CLS_LOSS.CLASS_BALANCED.BACKGROUND_AS_CLASS", "True"], "lvis"),
    "frcnn_softmax": (f"{LVIS_CFG}/EQL/faster_rcnn_R18_FPN_softmax.yaml", [], "lvis"),
    "frcnn_crt": (f"{LVIS_CFG}/Decoupled/faster_rcnn_R18_FPN_softmax_crt.yaml", [], "lvis"),
    "frcnn_lws": (f"{LVIS_CFG}/Decoupled/faster_rcnn_R18_FPN_softmax_lws.yaml", [], "lvis"),
    "frcnn_bags": (f"{LVIS_CFG}/Decoupled/faster_rcnn_R18_FPN_bags.yaml", [], "lvis"),
}
# second stages: arm -> its first stage, whose model_final.pth (in --out, same seed) is the
# run's MODEL.WEIGHTS; the run waits until that first stage has finished
FIRST_STAGES = {"frcnn_crt": "frcnn_softmax", "frcnn_lws": "frcnn_softmax",
                "frcnn_bags": "frcnn_softmax"}
MAIN = ("atss_focal", "atss_efl", "frcnn_sigmoid", "frcnn_eql", "frcnn_eqlv2")
SLT = ("slt_sigmoid", "slt_eql", "slt_eqlv2", "slt_atss_focal")
# first stages before their second stages, in every seed
BASELINES = ("frcnn_softmax", "frcnn_sigmoid_cas", "frcnn_cb", "frcnn_focal", "frcnn_crt",
             "frcnn_lws", "frcnn_bags")
ABLATIONS = ("atss_efl_focusing_only", "atss_efl_weighting_only", "balanced_atss_focal",
             "balanced_atss_efl", "frcnn_eql_no_excluding_function")
RUNS = ([(arm, 0) for arm in MAIN]
        + [("slt_atss_focal", 0)]
        + [(arm, 0) for arm in ABLATIONS]
        + [(arm, 1) for arm in MAIN]
        + [(arm, 0) for arm in SLT if arm != "slt_atss_focal"]
        + [(arm, 2) for arm in MAIN]
        + [(arm, 0) for arm in BASELINES]
        # a diagnosis of the class-balanced arm, one seed
        + [("frcnn_cb_background_as_class", 0)]
        + [(arm, seed) for seed in SEEDS[1:] for arm in BASELINES])

# paired comparisons: (name, arm, reference arm)
COMPARISONS = [
    ("EFL - focal (ATSS)", "atss_efl", "atss_focal"),
    ("EQL - sigmoid (Faster R-CNN)", "frcnn_eql", "frcnn_sigmoid"),
    ("EQLv2 - EQL", "frcnn_eqlv2", "frcnn_eql"),
    ("EQLv2 - sigmoid", "frcnn_eqlv2", "frcnn_sigmoid"),
    ("EFL focusing only - focal", "atss_efl_focusing_only", "atss_focal"),
    ("EFL weighting only - focal", "atss_efl_weighting_only", "atss_focal"),
    ("EFL - EFL focusing only", "atss_efl", "atss_efl_focusing_only"),
    ("EFL - EFL weighting only", "atss_efl", "atss_efl_weighting_only"),
    ("EQL - EQL without E(r)", "frcnn_eql", "frcnn_eql_no_excluding_function"),
    ("balanced: EFL - focal", "balanced_atss_efl", "balanced_atss_focal"),
    ("Synthetic-LT: EQL - sigmoid", "slt_eql", "slt_sigmoid"),
    ("Synthetic-LT: EQLv2 - sigmoid", "slt_eqlv2", "slt_sigmoid"),
    # EQL Tab. 5's ordering: EQL above CAS, CB loss and focal; CAS below RFS
    ("EQL - class-aware sampling", "frcnn_eql", "frcnn_sigmoid_cas"),
    ("EQL - class-balanced loss", "frcnn_eql", "frcnn_cb"),
    ("EQL - focal (Faster R-CNN)", "frcnn_eql", "frcnn_focal"),
    ("class-aware sampling - sigmoid (RFS)", "frcnn_sigmoid_cas", "frcnn_sigmoid"),
    ("class-balanced loss - sigmoid", "frcnn_cb", "frcnn_sigmoid"),
    ("focal - sigmoid (Faster R-CNN)", "frcnn_focal", "frcnn_sigmoid"),
    ("CB loss, background as a class - sigmoid", "frcnn_cb_background_as_class",
     "frcnn_sigmoid"),
    ("EQL - CB loss, background as a class", "frcnn_eql", "frcnn_cb_background_as_class"),
    # "EQLv2 surpasses decoupled methods"
    ("EQLv2 - cRT", "frcnn_eqlv2", "frcnn_crt"),
    ("EQLv2 - LWS", "frcnn_eqlv2", "frcnn_lws"),
    ("EQLv2 - BAGS", "frcnn_eqlv2", "frcnn_bags"),
    ("cRT - its first stage (softmax)", "frcnn_crt", "frcnn_softmax"),
    ("LWS - its first stage (softmax)", "frcnn_lws", "frcnn_softmax"),
    ("BAGS - its first stage (softmax)", "frcnn_bags", "frcnn_softmax"),
]
KEYS = ("AP", "APr", "APc", "APf")

# The study on converged models of the hard-tail preset: the configs set their schedules in
# epochs, checkpoints an epoch and the regime indicators, so no option is added to them.
HARD_TAIL_RESULTS = os.environ.get("EQL_D2_HARD_TAIL_STUDY_RESULTS",
                                   os.path.join(ROOT, "benchmarks", "results", "hard_tail_study"))
HT_CFG = "configs/Synthetic-HardTail"
NO_LABELS = ["MODEL.IMAGE_LABELS.VERIFIED", "False"]
HARD_TAIL_ARMS = {
    "atss_focal": (f"{HT_CFG}/atss_R18_FPN_focal.yaml", [], "hard_tail"),
    "atss_efl": (f"{HT_CFG}/atss_R18_FPN_efl.yaml", [], "hard_tail"),
    "frcnn_sigmoid": (f"{HT_CFG}/EQL/faster_rcnn_R18_FPN_sigmoid.yaml", [], "hard_tail"),
    "frcnn_eql": (f"{HT_CFG}/EQL/faster_rcnn_R18_FPN_eql.yaml", [], "hard_tail"),
    "frcnn_eqlv2": (f"{HT_CFG}/EQL/faster_rcnn_R18_FPN_eqlv2.yaml", [], "hard_tail"),
    # how much of EQL's and EQLv2's lead is LVIS's image-level mask (the EQLv2 authors' form)
    "frcnn_eql_no_image_labels": (f"{HT_CFG}/EQL/faster_rcnn_R18_FPN_eql.yaml", NO_LABELS,
                                  "hard_tail"),
    "frcnn_eqlv2_no_image_labels": (f"{HT_CFG}/EQL/faster_rcnn_R18_FPN_eqlv2.yaml", NO_LABELS,
                                    "hard_tail"),
    "atss_efl_focusing_only": (f"{HT_CFG}/atss_R18_FPN_efl.yaml",
                               ["MODEL.CLS_LOSS.EFL.WEIGHTING_FACTOR", "False"], "hard_tail"),
    "atss_efl_weighting_only": (f"{HT_CFG}/atss_R18_FPN_efl.yaml",
                                ["MODEL.CLS_LOSS.EFL.FOCUSING_FACTOR", "False"], "hard_tail"),
    "frcnn_eql_no_excluding_function": (f"{HT_CFG}/EQL/faster_rcnn_R18_FPN_eql.yaml",
                                        ["MODEL.CLS_LOSS.EQL.EXCLUDING_FUNCTION", "False"],
                                        "hard_tail"),
}
# the EQL and EQLv2 papers' own recipe: no repeat factor sampling (the arms above use RFS,
# as EFL's Tab. 2 does for every method); 24 epochs of the uniform sampler
NO_RFS = ["DATALOADER.SAMPLER_TRAIN", "TrainingSampler"]
HARD_TAIL_NO_RFS = tuple(f"frcnn_{loss}_no_rfs" for loss in ("sigmoid", "eql", "eqlv2"))
HARD_TAIL_ARMS.update({arm: (HARD_TAIL_ARMS[arm[: -len("_no_rfs")]][0], NO_RFS, "hard_tail")
                       for arm in HARD_TAIL_NO_RFS})
# the baselines the papers beat (as BASELINES above), on the hard-tail schedules: the class-
# aware arm trains the repeat factor arms' iterations, the second stages half the first's
HARD_TAIL_ARMS.update({arm: (ARMS[arm][0].replace(LVIS_CFG, HT_CFG), [], "hard_tail")
                       for arm in BASELINES})
HARD_TAIL_BASELINES = ("atss_focal", "frcnn_sigmoid")
# the papers' three claims (EFL, EQL, EQLv2) over every seed first, so that their verdicts
# have three seeds early; then the two-stage claims in the EQL papers' recipe without RFS;
# then the other claim arms (image-level labels, ablations) seed by seed; then the baselines
# the papers beat, seed by seed; the calibration's baselines last
HARD_TAIL_CLAIMS = ("atss_efl", "frcnn_eql", "frcnn_eqlv2")
# within a seed, the decoupled second stages straight after their first stage, so a free
# driver starts them as soon as its checkpoint exists and a seed's decoupled comparison is
# complete before the full-schedule baselines
HARD_TAIL_BASELINE_ORDER = tuple(sorted(BASELINES, key=lambda arm: (
    arm not in (*FIRST_STAGES.values(), *FIRST_STAGES), BASELINES.index(arm))))
HARD_TAIL_RUNS = ([(arm, seed) for seed in SEEDS for arm in HARD_TAIL_CLAIMS]
                  + [(arm, seed) for seed in SEEDS for arm in HARD_TAIL_NO_RFS]
                  + [(arm, seed) for seed in SEEDS for arm in HARD_TAIL_ARMS
                     if arm not in (HARD_TAIL_BASELINES + HARD_TAIL_CLAIMS + BASELINES
                                    + HARD_TAIL_NO_RFS)]
                  + [(arm, seed) for seed in SEEDS for arm in HARD_TAIL_BASELINE_ORDER]
                  + [(arm, seed) for seed in SEEDS for arm in HARD_TAIL_BASELINES])
HARD_TAIL_COMPARISONS = [c for c in COMPARISONS if c[1] in HARD_TAIL_ARMS and c[2] in HARD_TAIL_ARMS] + [
    ("EQL - EQL without image-level labels", "frcnn_eql", "frcnn_eql_no_image_labels"),
    ("EQLv2 - EQLv2 without image-level labels", "frcnn_eqlv2", "frcnn_eqlv2_no_image_labels"),
    ("EQL without labels - sigmoid", "frcnn_eql_no_image_labels", "frcnn_sigmoid"),
    ("EQLv2 without labels - sigmoid", "frcnn_eqlv2_no_image_labels", "frcnn_sigmoid"),
    ("no RFS: EQL - sigmoid", "frcnn_eql_no_rfs", "frcnn_sigmoid_no_rfs"),
    ("no RFS: EQLv2 - sigmoid", "frcnn_eqlv2_no_rfs", "frcnn_sigmoid_no_rfs"),
    ("no RFS: EQLv2 - EQL", "frcnn_eqlv2_no_rfs", "frcnn_eql_no_rfs"),
    ("RFS - no RFS (sigmoid)", "frcnn_sigmoid", "frcnn_sigmoid_no_rfs"),
]


class Study:
    """One study: its arms, run order, comparisons, kept results and run folder."""

    def __init__(self, name):
        if name == "synthetic_lvis":
            self.arms, self.runs, self.comparisons = ARMS, RUNS, COMPARISONS
            self.results, self.out = RESULTS, os.path.join(ROOT, "output", "study")
            self.options = ["SOLVER.CHECKPOINT_PERIOD", "100", *REGIME]
        elif name == "hard_tail":
            self.arms, self.runs = HARD_TAIL_ARMS, HARD_TAIL_RUNS
            self.comparisons = HARD_TAIL_COMPARISONS
            self.results = HARD_TAIL_RESULTS
            self.out = os.path.join(ROOT, "output", "hard_tail_calibration")
            self.options = []
        else:
            raise ValueError(f"unknown study {name!r}: synthetic_lvis or hard_tail")
        self.name = name


def _study(args):
    return Study(getattr(args, "study", None) or "synthetic_lvis")


def run_name(arm, seed):
    return f"{arm}/seed{seed}"


def dataset_env(kind, seed, datasets_dir):
    """Environment that points the registered dataset names at this seed's data."""
    if kind == "lvis":
        return {"EQL_D2_SYNTHETIC_LVIS_ROOT": os.path.join(datasets_dir, f"synthetic_lvis_seed{seed}")}
    if kind == "balanced":
        return {"EQL_D2_SYNTHETIC_LVIS_BALANCED_ROOT":
                os.path.join(datasets_dir, f"synthetic_lvis_balanced_seed{seed}")}
    if kind == "hard_tail":  # the folders benchmarks/hard_tail_calibration.sh uses
        return {"EQL_D2_SYNTHETIC_HARD_TAIL_ROOT":
                os.path.join(datasets_dir, f"synthetic_hard_tail_seed{seed}")}
    return {"EQL_D2_SYNTHETIC_ROOT": os.path.join(datasets_dir, "synthetic_lt")}


def dataset_options(kind):
    if kind == "slt":
        return ["DATASETS.TEST", '("synthetic_lt_val_fed", "synthetic_lt_val")']
    return []


def generate_data(kind, seed, datasets_dir, log):
    """Generate the seed's dataset once (a folder with generator.json is complete: the
    generator renames it into place only when done)."""
    if kind == "slt":
        return  # generated on first use by train_net.py (seed 0, as BENCHMARKS.md's runs)
    root = next(iter(dataset_env(kind, seed, datasets_dir).values()))
    if os.path.isfile(os.path.join(root, "generator.json")):
        return
    preset = {"lvis": "synthetic_lvis", "balanced": "synthetic_lvis_balanced",
              "hard_tail": "synthetic_hard_tail"}[kind]
    print(f"generating {preset} seed {seed} into {root}", flush=True)
    subprocess.run([sys.executable, "-m", "eql_d2.data.synthetic", "--preset", preset,
                    "--seed", str(seed), "--out", root], cwd=ROOT, check=True,
                   stdout=log, stderr=subprocess.STDOUT)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(lock):
    """Take the lock folder (atomic mkdir); a lock of a dead process is taken over."""
    try:
        os.makedirs(lock)
    except FileExistsError:
        try:
            with open(os.path.join(lock, "pid")) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and _alive(pid):
            return False
        print(f"taking over {lock} (process {pid} is gone)", flush=True)
    with open(os.path.join(lock, "pid"), "w") as f:
        f.write(str(os.getpid()))
    return True


def save_results(run_dir, dest):
    """Copy what the study keeps of a finished run into `dest` (complete or absent)."""
    from eql_d2.utils.io import atomic_directory

    with atomic_directory(dest) as tmp:
        for name in ("final_metrics.json", "config.yaml"):
            shutil.copy(os.path.join(run_dir, name), tmp)
        # the regime indicators; detectron2's metrics.json (losses, iteration times and the
        # periodic evaluations: convergence and cost)
        for name in ("regime_indicators.jsonl", "metrics.json"):
            path = os.path.join(run_dir, name)
            if os.path.isfile(path):
                with open(path, "rb") as src, gzip.GzipFile(
                        os.path.join(tmp, name + ".gz"), "wb", mtime=0) as dst:
                    shutil.copyfileobj(src, dst)
        # each evaluated dataset's per-category AP (the final evaluation wrote it last)
        for dataset, path in _per_category_csvs(run_dir):
            shutil.copy(path, os.path.join(tmp, f"per_category_bbox_{dataset}.csv"))


def _per_category_csvs(run_dir):
    """(dataset, path) of the per_category_bbox.csv files under a run's inference/."""
    inference = os.path.join(run_dir, "inference")
    if not os.path.isdir(inference):
        return []
    return [(dataset, os.path.join(inference, dataset, "per_category_bbox.csv"))
            for dataset in sorted(os.listdir(inference))
            if os.path.isfile(os.path.join(inference, dataset, "per_category_bbox.csv"))]


def prune_checkpoints(run_dir):
    """Delete the periodic checkpoints (model_<iter>.pth) of a finished run whose
    last_checkpoint names model_final.pth, which stays (second stages start from it); a
    24-epoch run would otherwise keep 24 of them. Returns the bytes freed."""
    final = os.path.join(run_dir, "model_final.pth")
    try:
        with open(os.path.join(run_dir, "last_checkpoint")) as f:
            last = f.read().strip()
    except OSError:
        return 0
    if (last != "model_final.pth" or not os.path.isfile(final)
            or not os.path.isfile(os.path.join(run_dir, "final_metrics.json"))):
        return 0
    freed = 0
    for name in os.listdir(run_dir):
        if re.fullmatch(r"model_\d+\.pth", name):
            path = os.path.join(run_dir, name)
            freed += os.path.getsize(path)
            os.remove(path)
    return freed


def _kept(dest):
    return os.path.isfile(os.path.join(dest, "final_metrics.json"))


def _runs_to_take(study, out, wanted):
    """The wanted runs without kept results, in order, and before a second stage whose first
    stage is kept but whose checkpoint is not in `out` (kept results hold no weights, so a
    new machine or a cleaned --out lost it), that first stage again: it is trained once more
    with the same seed and data, and its new results replace the kept ones (the second stage
    is compared with the first stage it started from)."""
    runs = []
    for arm, seed in wanted:
        if _kept(os.path.join(study.results, run_name(arm, seed))):
            continue
        first = FIRST_STAGES.get(arm)
        if (first and (first, seed) not in runs
                and _kept(os.path.join(study.results, run_name(first, seed)))
                and not os.path.isfile(os.path.join(out, run_name(first, seed),
                                                    "model_final.pth"))):
            runs.append((first, seed))
        runs.append((arm, seed))
    return runs


def _compare_retrained(run_dir, dest):
    """Print whether a first stage trained again reproduced its kept bbox metrics."""
    def bbox(path):
        with open(os.path.join(path, "final_metrics.json")) as f:
            return {ds: m.get("bbox") for ds, m in json.load(f).items()}

    old, new = bbox(dest), bbox(run_dir)
    if old == new:
        print(f"   {run_dir}: trained again, its metrics equal the kept ones", flush=True)
    else:
        print(f"   {run_dir}: trained again, its metrics differ from the kept ones "
              f"(kept {old}, now {new}); the new ones replace them", flush=True)


def cmd_run(args):
    """Train the runs not done yet, at most --max-runs of them (exit status 3: none left to
    take, so a loop that restarts the driver, re-reading the code between runs, can stop)."""
    study = _study(args)
    out = args.out or study.out
    if args.arms and set(args.arms) - set(study.arms):
        raise SystemExit(f"--arms {sorted(set(args.arms) - set(study.arms))}: not arms of the "
                         f"{study.name} study ({', '.join(study.arms)})")
    os.makedirs(out, exist_ok=True)
    started, waiting = 0, []
    wanted = [(a, s) for a, s in study.runs
              if (not args.arms or a in args.arms) and (args.seeds is None or s in args.seeds)]
    for arm, seed in _runs_to_take(study, out, wanted):
        name = run_name(arm, seed)
        dest = os.path.join(study.results, name)
        if args.max_runs and started >= args.max_runs:
            return
        stage_options = []
        first = FIRST_STAGES.get(arm)
        if first:
            weights = os.path.join(out, run_name(first, seed), "model_final.pth")
            if not os.path.isfile(weights):
                waiting.append(f"{name} (for {weights})")
                continue
            stage_options = ["MODEL.WEIGHTS", weights]
        lock = os.path.join(out, name + ".lock")
        if not claim(lock):
            continue
        started += 1
        try:
            config, extra, kind = study.arms[arm]
            run_dir = os.path.join(out, name)
            if os.path.isfile(os.path.join(run_dir, "final_metrics.json")):
                # finished here before (by this driver or the calibration's): kept, not redone
                save_results(run_dir, dest)
                prune_checkpoints(run_dir)
                print(f"== {name}: finished in {run_dir}, results kept in {dest}", flush=True)
                continue
            os.makedirs(run_dir, exist_ok=True)
            log_path = run_dir + ".log"
            with open(log_path, "a") as log:
                generate_data(kind, seed, args.datasets, log)
                env = {**os.environ, "OMP_NUM_THREADS": "1",
                       **dataset_env(kind, seed, args.datasets)}
                cmd = [sys.executable, "train_net.py", "--resume", "--config-file", config,
                       "SEED", str(seed), "OUTPUT_DIR", run_dir, *study.options,
                       *dataset_options(kind), *extra, *stage_options, *args.opts]
                print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
                start = time.time()
                proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                print(f"   {name} failed (exit {proc.returncode}), see {log_path}", flush=True)
                continue
            if _kept(dest):  # a first stage trained again for its checkpoint
                _compare_retrained(run_dir, dest)
            save_results(run_dir, dest)
            freed = prune_checkpoints(run_dir)
            print(f"   {name}: {time.time() - start:.0f} s, results in {dest}; "
                  f"{freed / 2**20:.0f} MiB of periodic checkpoints deleted", flush=True)
        finally:
            shutil.rmtree(lock, ignore_errors=True)
    if not started and waiting:
        # a first stage is still training (another driver's): come back when it may be done
        print(f"waiting for first stages: {', '.join(waiting)}", flush=True)
        time.sleep(60)
        return
    if not started:
        sys.exit(3)


def load_metrics(study=None):
    """{arm: {seed: {dataset: {"bbox": {...}}}}} of the study's finished runs."""
    study = study or Study("synthetic_lvis")
    out = {}
    for arm in study.arms:
        for seed in SEEDS:
            path = os.path.join(study.results, run_name(arm, seed), "final_metrics.json")
            if os.path.isfile(path):
                with open(path) as f:
                    out.setdefault(arm, {})[seed] = json.load(f)
    return out


def _main_dataset(metrics):
    """The dataset a run's numbers are read from: the federated val where it has several."""
    fed = [name for name in metrics if name.endswith("_val_fed")]
    return fed[0] if fed else next(iter(metrics))


def _bbox(metrics, dataset=None):
    """bbox metrics of `dataset`, by default the federated val where a run has several."""
    return metrics[dataset or _main_dataset(metrics)]["bbox"]


def per_category_ap(run_dir, dataset):
    """{category_id: (frequency group, AP in %)} from a kept run's per-category CSV of
    `dataset`, categories without ground truth left out; None when the run kept no such CSV."""
    from eql_d2.evaluation.lvis_evaluation import read_per_category_ap

    path = os.path.join(run_dir, f"per_category_bbox_{dataset}.csv")
    return read_per_category_ap(path) if os.path.isfile(path) else None


def per_category_differences(pairs):
    """{group: [AP(arm) - AP(reference)]} over the categories both runs of each pair
    measured, pooled over the pairs ((arm's, reference's) per_category_ap of one seed)."""
    out = {}
    for arm, ref in pairs:
        for cat in sorted(arm.keys() & ref.keys()):
            if arm[cat][0] != ref[cat][0]:
                raise ValueError(f"category {cat} is {arm[cat][0]!r} in one run and "
                                 f"{ref[cat][0]!r} in the other: not the same dataset")
            out.setdefault(arm[cat][0], []).append(arm[cat][1] - ref[cat][1])
    return out


def sign_test_cell(diffs):
    """'higher up, lower down of measured, median Δ, p' with the two-sided sign test
    (ties left out) of a group's per-category differences."""
    from scipy.stats import binomtest

    if not diffs:
        return "-"
    higher, lower = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    p = binomtest(higher, higher + lower, 0.5).pvalue if higher + lower else 1.0
    return (f"{higher} up, {lower} down of {len(diffs)}, median "
            f"{statistics.median(diffs):+.2f}, p {p:.2g}")


def _defined(value):
    """LVISEval reports the AP of an empty group (e.g. APr of the balanced preset) as -1,
    shown x100; such a value, or NaN, is no measurement."""
    return not math.isnan(value) and value >= 0


def _mean_std(values):
    """Mean ± sample standard deviation of measured values (callers drop undefined ones)."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def cmd_table(args):
    from eql_d2.evaluation.regime import group_summary, read_regime_indicators, since
    from eql_d2.utils.groups import GROUPS

    study = _study(args)
    done = load_metrics(study)
    print("### Runs: bbox AP on the federated val, mean ± standard deviation over seeds\n")
    print("| arm | seeds | " + " | ".join(KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for arm in study.arms:
        if arm not in done:
            continue
        seeds = sorted(done[arm])
        cells = [_mean_std([v for v in (_bbox(done[arm][s])[k] for s in seeds) if _defined(v)])
                 for k in KEYS]
        print(f"| {arm} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    print("\n### Paired differences (same data and training seed), per seed and mean ± std\n")
    print("| comparison | seeds | " + " | ".join(f"Δ{k}" for k in KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for label, arm, ref in study.comparisons:
        seeds = sorted(set(done.get(arm, {})) & set(done.get(ref, {})))
        if not seeds:
            continue
        cells = []
        for k in KEYS:
            pairs = [(_bbox(done[arm][s])[k], _bbox(done[ref][s])[k]) for s in seeds]
            if not all(_defined(a) and _defined(b) for a, b in pairs):
                cells.append("n/a")
                continue
            diffs = [a - b for a, b in pairs]
            per_seed = " / ".join(f"{d:+.2f}" for d in diffs)
            cells.append(per_seed + (f" ({_mean_std(diffs)})" if len(diffs) > 1 else ""))
        print(f"| {label} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    per_category = []
    for label, arm, ref in study.comparisons:
        seeds = sorted(set(done.get(arm, {})) & set(done.get(ref, {})))
        pairs = []
        for s in seeds:
            dataset = _main_dataset(done[arm][s])
            pair = tuple(per_category_ap(os.path.join(study.results, run_name(a, s)), dataset)
                         for a in (arm, ref))
            if None not in pair:
                pairs.append((s, pair))
        if pairs:
            diffs = per_category_differences([p for _, p in pairs])
            per_category.append((label, [s for s, _ in pairs],
                                 [sign_test_cell(diffs.get(g, [])) for g in GROUPS]))
    if per_category:
        print("\n### Per-category paired differences: each category's AP difference, pooled "
              "over the seeds with per-category results; categories higher and lower of those "
              "measured, median ΔAP, two-sided sign test (ties left out; treats the "
              "categories as independent)\n")
        print("| comparison | seeds | rare | common | frequent |")
        print("|---|---|---|---|---|")
        for label, seeds, cells in per_category:
            print(f"| {label} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    slt = [a for a in SLT if a in done]
    if slt:
        print("\n### Synthetic-LT, 700 iterations, seed 0: federated vs exhaustive val (bbox)\n")
        print("| run | val | " + " | ".join(KEYS) + " |")
        print("|---|---|" + "---|" * len(KEYS))
        for arm in slt:
            for dataset, m in done[arm][0].items():
                print(f"| {arm} | {dataset} | "
                      + " | ".join(f"{m['bbox'][k]:.2f}" for k in KEYS) + " |")
    print("\n### Regime indicators: median raw g_j = pos_grad / neg_grad over the whole run "
          "and over its last interval: the last evaluation interval (TEST.EVAL_PERIOD, an "
          "epoch in the hard-tail configs), or between the last two snapshots in a run without "
          "periodic evaluation (in brackets: seen categories with g_j < 1 / seen), median "
          "positives / negatives seen\n")
    print("| run | rare g | common g | frequent g | last interval: rare g | common g | "
          "frequent g | rare pos/neg | common pos/neg | frequent pos/neg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arm in study.arms:
        for seed in sorted(done.get(arm, {})):
            run_dir = os.path.join(study.results, run_name(arm, seed))
            try:
                snaps = read_regime_indicators(run_dir)
            except FileNotFoundError:
                continue
            cells = _regime_cells(group_summary(snaps[-1]), "median_g")
            period = _eval_period(run_dir)
            # from the second-last evaluation (detectron2 evaluates after iterations
            # k * period - 1, and at the end), as benchmarks/hard_tail_curves.py
            start = (snaps[-1]["iteration"] - 1) // period * period - 1 if period else None
            cells += (_regime_cells(group_summary(since(snaps, start)), "median_g")
                      if len(snaps) > 1 else ["-"] * 3)
            cells += _regime_cells(group_summary(snaps[-1]), "median_pos_neg")
            print(f"| {run_name(arm, seed)} | " + " | ".join(cells) + " |")
    converged = _convergence_rows(study, done)
    if converged:
        print("\n### Convergence and cost: change over the last evaluation interval, hours of "
              "training (metrics.json's iteration times; evaluations not counted)\n")
        print("| run | last evaluation | ΔAP | ΔAPr | training hours |")
        print("|---|---|---|---|---|")

        def signed(v):
            return "-" if v is None else f"{v:+.2f}"

        for name, last, d_ap, d_apr, seconds in converged:
            print(f"| {name} | {last if last is not None else '-'} | {signed(d_ap)} | "
                  f"{signed(d_apr)} | {seconds / 3600:.2f} |")
        print(f"\n{len(converged)} runs, {sum(r[4] for r in converged) / 3600:.1f} core-hours "
              "of training")


def _eval_period(run_dir):
    """TEST.EVAL_PERIOD of a kept run's config.yaml (0: no periodic evaluation)."""
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        return int((yaml.safe_load(f).get("TEST") or {}).get("EVAL_PERIOD") or 0)


def _regime_cells(summary, key):
    """Cells for rare / common / frequent; a dataset with one group fills the common cell."""
    from eql_d2.utils.groups import GROUPS

    cells = []
    for group in GROUPS:
        s = summary.get(group) or (summary.get("all") if group == "c" else None)
        if s is None or not s["seen"]:
            cells.append("-")
        elif key == "median_g":
            cells.append(f"{s['median_g']:.3g} ({s['below_1']}/{s['seen']})")
        else:
            cells.append(f"{s[key]:.2g}")
    return cells


def _load_tool(relpath):
    """A script of tools/ or benchmarks/ (folders of scripts, not packages) as a module."""
    from eql_d2.utils.io import load_script

    return load_script(os.path.join(ROOT, relpath))


def training_seconds(rows):
    """Seconds of training a run's metrics.json rows account for: detectron2 writes the
    median iteration time ("time") every few iterations; each row's time stands for the
    iterations since the previous row. A resumed run repeats rows after its checkpoint: the
    last row of each iteration is taken. Evaluations are not counted."""
    times = {r["iteration"]: r["time"] for r in rows if "time" in r}
    total, previous = 0.0, -1
    for it in sorted(times):
        total += (it - previous) * times[it]
        previous = it
    return total


def _convergence_rows(study, done):
    """(run, last iteration, ΔAP and ΔAPr over the last evaluation interval, training
    seconds) of the kept runs with a kept metrics.json."""
    curves = _load_tool("benchmarks/hard_tail_curves.py")
    out = []
    for arm in study.arms:
        for seed in sorted(done.get(arm, {})):
            path = os.path.join(study.results, run_name(arm, seed), "metrics.json.gz")
            if not os.path.isfile(path):
                continue
            with gzip.open(path, "rt") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            curve = curves.eval_curve(rows)
            out.append((run_name(arm, seed), curve[-1][0] if curve else None,
                        curves.last_interval_change(curve, "AP"),
                        curves.last_interval_change(curve, "APr"), training_seconds(rows)))
    return out


def cmd_plots(args):
    """Regime plots of the finished runs, one folder per dataset, into --plots."""
    plot_gradients = _load_tool("tools/plot_gradients.py")

    chosen = _study(args)

    def study(runs):
        return [(run_name(a, s), os.path.join(chosen.results, run_name(a, s))) for a, s in runs]

    # BENCHMARKS.md's 700-iteration Cascade run on Synthetic-LT keeps its indicators here
    cascade = os.path.join(ROOT, "benchmarks", "results", "synthetic_lt_700", "cascade_sigmoid")
    groups = {
        f"hard_tail_seed{seed}": study([(a, seed) for a in HARD_TAIL_ARMS]) for seed in SEEDS
    } if chosen.name == "hard_tail" else {
        "synthetic_lvis_seed0": study([(a, 0) for a in MAIN]),
        "synthetic_lvis_seed0_ablations": study([(a, 0) for a in (
            "frcnn_eql", "frcnn_eql_no_excluding_function", "atss_focal",
            "atss_efl_focusing_only", "atss_efl_weighting_only", "atss_efl")]),
        "synthetic_lt": study([(a, 0) for a in SLT]) + [("cascade_sigmoid (700 it.)", cascade)],
        "synthetic_lvis_balanced": study([("balanced_atss_focal", 0), ("balanced_atss_efl", 0)]),
    }
    for folder, runs in groups.items():
        have = [(label, path) for label, path in runs
                if any(os.path.isfile(os.path.join(path, n)) for n in
                       ("regime_indicators.jsonl", "regime_indicators.jsonl.gz"))]
        if have:
            plot_gradients.plot_regime([p for _, p in have], [label for label, _ in have],
                        os.path.join(args.plots, folder))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--study", choices=("synthetic_lvis", "hard_tail"),
                       default="synthetic_lvis")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", parents=[which], help="train and evaluate the runs not done yet")
    r.add_argument("--out", help="run folders (default: output/study, or "
                   "output/hard_tail_calibration for --study hard_tail)")
    r.add_argument("--datasets", default=os.path.join(ROOT, "datasets"))
    r.add_argument("--arms", nargs="+", choices=sorted(set(ARMS) | set(HARD_TAIL_ARMS)))
    r.add_argument("--seeds", nargs="+", type=int)
    r.add_argument("--max-runs", type=int, default=0, help="stop after starting this many")
    r.add_argument("opts", nargs=argparse.REMAINDER, help="train_net.py overrides for every run")
    sub.add_parser("table", parents=[which], help="Markdown tables of the finished runs")
    pl = sub.add_parser("plots", parents=[which], help="regime plots of the finished runs")
    pl.add_argument("--plots", default=os.path.join(ROOT, "docs", "regime"))
    args = p.parse_args(argv)
    {"run": cmd_run, "table": cmd_table, "plots": cmd_plots}[args.command](args)


if __name__ == "__main__":
    main()
