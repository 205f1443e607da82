#!/usr/bin/env python
"""Tables of benchmarks/classification_seql.sh: per arm, mean ± standard deviation over
seeds of top-1, top-5 and many / medium / few-shot accuracy on the Synthetic-CLS-LT test
set; then SEQL minus softmax paired by seed; then the medium-shot classes split by SEQL's
frequency threshold (lambda of the seql runs' config.yaml): mean top-1 of the medium classes
under lambda (SEQL's tail set, whose negative gradients it suppresses) and above it, per
arm and seed, from each run's per_class_accuracy.csv.

    .venv/bin/python benchmarks/classification_table.py output/classification_seql
"""

import argparse
import csv
import json
import math
import os
import statistics
import sys

import yaml

KEYS = ("top1", "top5", "many", "medium", "few")
TEST_SET = "synthetic_cls_lt_test"
PER_CLASS = os.path.join("inference", TEST_SET, "per_class_accuracy.csv")


def read_runs(out):
    """{arm: {seed: metrics}} of every finished run under `out` (<arm>/seed<s>/)."""
    runs = {}
    for arm in sorted(os.listdir(out)):
        arm_dir = os.path.join(out, arm)
        if not os.path.isdir(arm_dir):
            continue
        for seed_dir in sorted(os.listdir(arm_dir)):
            path = os.path.join(arm_dir, seed_dir, "final_metrics.json")
            if seed_dir.startswith("seed") and os.path.isfile(path):
                with open(path) as f:
                    metrics = json.load(f)[TEST_SET]["classification"]
                runs.setdefault(arm, {})[int(seed_dir[4:])] = metrics
    return runs


def mean_std(values):
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def arm_table(runs, arms):
    lines = ["| arm | seeds | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for arm in arms:
        seeds = runs[arm]
        cells = [mean_std([seeds[s][k] for s in seeds]) for k in KEYS]
        lines.append(f"| {arm} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(runs, arm, reference):
    """SEQL minus softmax per key, over the seeds both finished, with how many seeds it is
    positive in."""
    seeds = sorted(set(runs.get(arm, {})) & set(runs.get(reference, {})))
    if not seeds:
        return None
    lines = [f"| {arm} - {reference} | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    cells = []
    for k in KEYS:
        d = [runs[arm][s][k] - runs[reference][s][k] for s in seeds]
        cells.append(f"{mean_std(d)} ({sum(x > 0 for x in d)}/{len(d)} seeds > 0)")
    lines.append(f"| seeds {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seql_lambda(out):
    """MODEL.CLS_LOSS.SEQL.LAMBDA of the first seql run's config.yaml, or None."""
    for seed_dir in sorted(os.listdir(os.path.join(out, "seql"))):
        path = os.path.join(out, "seql", seed_dir, "config.yaml")
        if os.path.isfile(path):
            with open(path) as f:
                return float(yaml.safe_load(f)["MODEL"]["CLS_LOSS"]["SEQL"]["LAMBDA"])
    return None


def medium_split(out, runs, arms, lam):
    """Per arm and seed, mean top-1 of the medium-shot classes whose train frequency is
    under `lam` and of those at or above it (class counts in the header)."""
    lines, header = [], None
    for arm in arms:
        for seed in sorted(runs[arm]):
            path = os.path.join(out, arm, f"seed{seed}", PER_CLASS)
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                rows = list(csv.DictReader(f))
            total = sum(int(r["train_image_count"]) for r in rows)
            medium = [r for r in rows if r["shot"] == "medium"]
            under = [float(r["top1"]) for r in medium if int(r["train_image_count"]) < lam * total]
            above = [float(r["top1"]) for r in medium if int(r["train_image_count"]) >= lam * total]
            header = header or (len(under), len(above))
            cells = [f"{statistics.mean(v):.2f}" if v else "n/a" for v in (under, above)]
            lines.append(f"| {arm} | {seed} | " + " | ".join(cells) + " |")
    if not lines:
        return None
    return "\n".join([f"| arm | seed | medium under lambda ({header[0]} classes) | "
                      f"medium above lambda ({header[1]} classes) |", "|---|---|---|---|"]
                     + lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the driver's OUT folder")
    args = parser.parse_args(argv)
    runs = read_runs(args.out)
    if not runs:
        print(f"no finished runs under {args.out}", file=sys.stderr)
        return 1
    main_arms = [a for a in ("softmax", "seql") if a in runs]
    sweep = sorted((a for a in runs if a.startswith("sweep_gamma")),
                   key=lambda a: float(a[len("sweep_gamma"):]))
    if main_arms:
        print("Main arms (accuracy %, mean ± std over seeds)\n")
        print(arm_table(runs, main_arms) + "\n")
        table = paired(runs, "seql", "softmax")
        if table:
            print(table + "\n")
        lam = seql_lambda(args.out) if "seql" in runs else None
        table = medium_split(args.out, runs, main_arms, lam) if lam else None
        if table:
            print(f"Medium-shot top-1 under / above SEQL's lambda = {lam:g}\n")
            print(table + "\n")
    if sweep:
        print("SEQL gamma sweep at reduced size (gamma 0: softmax)\n")
        print(arm_table(runs, sweep) + "\n")
        if "sweep_gamma0.0" in runs:
            for arm in sweep[1:]:
                table = paired(runs, arm, "sweep_gamma0.0")
                if table:
                    print(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
