#!/usr/bin/env python
"""Cascade Mask R-CNN runs seen stage by stage: what each stage learnt and how the test-time
score combination changes AP.

    python benchmarks/cascade_diagnosis.py output/bench700/cascade_seed0/{sigmoid,eqlv2,eqlv2_no_image_labels}

For each finished run (a train_net.py OUTPUT_DIR of an EQLCascadeROIHeads config):

1. training, from its metrics.json, the mean over the last ``--last`` logged iterations of
   each stage's foreground classification accuracy, foreground share of the classified
   proposals, and (EQLv2) rare / common / frequent gradient ratio and negative weight;
2. evaluation of its model_final.pth with every MODEL.ROI_BOX_CASCADE_HEAD.TEST_SCORES
   (``--eval-only`` into ``<run>/diagnosis/<mode>/``, skipped when already there; the run's
   own final_metrics.json is "mean_probs"), bbox AP / AP50 / APr / APc / APf.

Both tables print as Markdown; ``--json FILE`` also writes them.

Several seeds of the same arms, one table per seed folder and the paired differences
against a reference arm (mean ± standard deviation over the seeds that have both):

    python benchmarks/cascade_diagnosis.py --seeds output/bench700/cascade_seed{0,1,2}
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("mean_probs", "mean_logits", "stage1", "stage2", "stage3")
KEYS = ("AP", "AP50", "APr", "APc", "APf")


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_statistics(run, last=5):
    """{stage: {name: mean over the last `last` rows that log it}} from metrics.json."""
    rows = _rows(os.path.join(run, "metrics.json"))
    wanted = {
        "fg accuracy": "stage{k}/fast_rcnn/fg_cls_accuracy",
        "accuracy": "stage{k}/fast_rcnn/cls_accuracy",
        "fg share": ("stage{k}/roi_head/num_fg_samples", "stage{k}/roi_head/num_bg_samples"),
        "ratio r": "stage{k}/eqlv2/gradient_ratio/r",
        "ratio c": "stage{k}/eqlv2/gradient_ratio/c",
        "ratio f": "stage{k}/eqlv2/gradient_ratio/f",
        "neg weight r": "stage{k}/eqlv2/negative_weight/r",
        "neg weight c": "stage{k}/eqlv2/negative_weight/c",
    }
    out = {}
    for k in range(3):
        stats = {}
        for name, key in wanted.items():
            if isinstance(key, tuple):
                # the first stage's sampling logs without the stage prefix
                fg, bg = (x.format(k=k) if k else x.split("/", 1)[1] for x in key)
                values = [r[fg] / max(r[fg] + r[bg], 1e-9) for r in rows if fg in r and bg in r]
            else:
                values = [r[key.format(k=k)] for r in rows if key.format(k=k) in r]
            if values:
                stats[name] = statistics.mean(values[-last:])
        out[f"stage{k + 1}"] = stats
    return out


def _bbox(metrics_file):
    with open(metrics_file) as f:
        metrics = json.load(f)
    return next(iter(metrics.values()))["bbox"]


def evaluate(run, mode, python):
    """bbox metrics of the run's final model with TEST_SCORES `mode`."""
    if mode == "mean_probs":
        return _bbox(os.path.join(run, "final_metrics.json"))
    out = os.path.join(run, "diagnosis", mode)
    done = os.path.join(out, "eval_metrics.json")
    if not os.path.isfile(done):
        cmd = [python, "train_net.py", "--eval-only", "--config-file",
               os.path.join(run, "config.yaml"), "MODEL.WEIGHTS",
               os.path.join(run, "model_final.pth"), "OUTPUT_DIR", out,
               "MODEL.ROI_BOX_CASCADE_HEAD.TEST_SCORES", mode]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{run}: --eval-only with TEST_SCORES {mode} failed:\n"
                             + proc.stderr[-3000:])
    return _bbox(done)


def seeds_table(seed_dirs, reference="sigmoid"):
    """Markdown tables of the finished arms in each seed folder (``<dir>/<arm>/
    final_metrics.json``): bbox metrics per seed, mean ± std per arm, and each arm minus
    `reference` paired by seed. Returns (per-seed {arm: {seed dir: metrics}}, lines)."""
    runs = {}
    for d in seed_dirs:
        for arm in sorted(os.listdir(d)):
            metrics = os.path.join(d, arm, "final_metrics.json")
            if os.path.isfile(metrics):
                runs.setdefault(arm, {})[d] = _bbox(metrics)
    if reference not in runs:
        raise SystemExit(f"no finished {reference!r} run in {', '.join(seed_dirs)}")

    def spread(values):
        if len(values) == 1:
            return f"{values[0]:.2f} (1 seed)"
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

    lines = ["| seed folder | run | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for d in seed_dirs:
        for arm, per_seed in runs.items():
            if d in per_seed:
                m = per_seed[d]
                lines.append(f"| {os.path.basename(os.path.normpath(d))} | {arm} | "
                             + " | ".join(f"{m[k]:.2f}" for k in KEYS) + " |")
    lines += ["", "| run | seeds | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for arm, per_seed in runs.items():
        lines.append(f"| {arm} | {len(per_seed)} | " + " | ".join(
            spread([m[k] for m in per_seed.values()]) for k in KEYS) + " |")
    lines += ["", f"| run − {reference}, paired by seed | seeds | " + " | ".join(KEYS) + " |",
              "|---|---|" + "---|" * len(KEYS)]
    for arm, per_seed in runs.items():
        common = [d for d in per_seed if d in runs[reference]]
        if arm == reference or not common:
            continue
        lines.append(f"| {arm} | {len(common)} | " + " | ".join(
            spread([per_seed[d][k] - runs[reference][d][k] for d in common]) for k in KEYS)
            + " |")
    return runs, lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (with --seeds: seed folders of runs)")
    p.add_argument("--seeds", action="store_true",
                   help="tables over seed folders and paired differences (no evaluation)")
    p.add_argument("--reference", default="sigmoid", help="the arm paired differences subtract")
    p.add_argument("--last", type=int, default=5, help="logged rows averaged per statistic")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--json", help="also write both tables here")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    if args.seeds:
        runs, lines = seeds_table(args.runs, args.reference)
        print("\n".join(lines))
        return runs
    report = {}
    for run in args.runs:
        if not os.path.isfile(os.path.join(run, "final_metrics.json")):
            raise SystemExit(f"{run}: no final_metrics.json (not finished)")
        name = os.path.basename(os.path.normpath(run))
        report[name] = {"training": training_statistics(run, args.last),
                        "scores": {m: evaluate(run, m, args.python) for m in args.modes}}
    names = ("fg accuracy", "fg share", "ratio r", "ratio c", "ratio f", "neg weight r",
             "neg weight c")
    print("| run | stage | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for run, r in report.items():
        for stage, s in r["training"].items():
            cells = " | ".join(f"{s[n]:.3f}" if n in s else "-" for n in names)
            print(f"| {run} | {stage} | {cells} |")
    print("\n| run | test scores | " + " | ".join(KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for run, r in report.items():
        for mode, m in r["scores"].items():
            print(f"| {run} | {mode} | " + " | ".join(f"{m[k]:.2f}" for k in KEYS) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
