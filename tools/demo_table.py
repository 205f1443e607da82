#!/usr/bin/env python
"""The demo's table: LVIS AP, APr, APc, APf of finished runs beside a measured reference.

    python tools/demo_table.py output/demo                           # this run + reference
    python tools/demo_table.py output/demo output/demo_baseline      # + a baseline run here
    python tools/demo_table.py --write-reference benchmarks/results/demo_reference.json \\
        --command "make demo-reference" output/demo_reference/*      # record the reference

A run is a train_net.py OUTPUT_DIR: its ``final_metrics.json`` (or ``eval_metrics.json`` of
``--eval-only``) gives the metrics and its ``config.yaml`` the classification loss and seed
that label the row. Every figure printed is read from those files or from the reference
JSON; none is written in this script. The reference JSON (``--write-reference``) copies the
metrics, loss, seed and config file of each run, with the command that made them, so
``make demo`` can show the baseline without training it.
"""

import argparse
import datetime
import math
import os
import platform
import re
import sys

import yaml

from eql_d2.utils.io import read_json, write_json_atomic

KEYS = ("AP", "APr", "APc", "APf")
METRICS_FILES = ("final_metrics.json", "eval_metrics.json")
DEFAULT_REFERENCE = "benchmarks/results/demo_reference.json"
# detectron2's log line prefix: "[04/12 19:22:05 d2.engine...]"
_LOG_TIME = re.compile(r"^\[(\d\d)/(\d\d) (\d\d):(\d\d):(\d\d)")
# default_setup logs the command line: "Namespace(config_file='configs/...yaml', ..."
_LOG_CONFIG_FILE = re.compile(r"config_file='([^']*)'")


def read_metrics(run_dir):
    """{dataset: {task: {metric: value}}} of the run, or None when it wrote no metrics."""
    for name in METRICS_FILES:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            return read_json(path, "metrics file")
    return None


def read_run_config(run_dir):
    """The run's config.yaml (written by detectron2's default_setup) as a dict, or {}."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}


def loss_name(cfg):
    """The classification loss a run's config names ("" when it names none)."""
    model = cfg.get("MODEL", {})
    name = model.get("CLS_LOSS", {}).get("NAME")
    if name is None:  # configs written before MODEL.CLS_LOSS
        name = model.get("EQL", {}).get("LOSS")
    return name or ""


def log_wall_seconds(run_dir):
    """Seconds between the first and the last time-stamped line of the run's log.txt (the
    train_net.py process: set-up, training, evaluation), or None."""
    path = os.path.join(run_dir, "log.txt")
    if not os.path.isfile(path):
        return None
    stamps = []
    with open(path, errors="replace") as f:
        for line in f:
            m = _LOG_TIME.match(line)
            if m:
                stamps.append(tuple(int(x) for x in m.groups()))
    if len(stamps) < 2:
        return None

    def seconds(s):  # month/day/h/m/s; runs crossing a month end are not expected here
        mo, d, h, mi, se = s
        return (((mo * 31 + d) * 24 + h) * 60 + mi) * 60 + se

    return seconds(stamps[-1]) - seconds(stamps[0])


def log_config_file(run_dir):
    """The --config-file of the run's first command line in log.txt, or None."""
    path = os.path.join(run_dir, "log.txt")
    if os.path.isfile(path):
        with open(path, errors="replace") as f:
            for line in f:
                m = _LOG_CONFIG_FILE.search(line)
                if m:
                    return m.group(1)
    return None


def run_record(run_dir, dataset=None, task="bbox"):
    """What one run contributes to a table: label parts and the task's metrics."""
    results = read_metrics(run_dir)
    if results is None:
        raise FileNotFoundError(
            f"{run_dir}: no {' or '.join(METRICS_FILES)} (has the run finished?)")
    datasets = [d for d, tasks in results.items() if isinstance(tasks, dict)]
    if dataset is None:
        if not datasets:
            raise ValueError(f"{run_dir}: its metrics hold no dataset")
        dataset = datasets[0]
    if task not in results.get(dataset, {}):
        raise KeyError(f"{run_dir}: no {dataset!r} {task!r} metrics (has {datasets})")
    cfg = read_run_config(run_dir)
    return {
        "run_dir": run_dir,
        "loss": loss_name(cfg),
        "seed": cfg.get("SEED"),
        "max_iter": cfg.get("SOLVER", {}).get("MAX_ITER"),
        "dataset": dataset,
        "task": task,
        "metrics": results[dataset][task],
        "wall_s": log_wall_seconds(run_dir),
    }


def _fmt(v, signed=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>6}"
    return f"{v:+6.2f}" if signed else f"{v:6.2f}"


def format_table(rows, differences=()):
    """rows: (label, metrics dict); differences: (label, metrics dict) printed signed below a
    rule. A fixed-width text table of KEYS."""
    width = max([len("run")] + [len(label) for label, _ in list(rows) + list(differences)])
    lines = ["  ".join([f"{'run':<{width}}"] + [f"{k:>6}" for k in KEYS])]
    rule = "-" * len(lines[0])
    lines.append(rule)
    for label, metrics in rows:
        lines.append("  ".join([f"{label:<{width}}"] + [_fmt(metrics.get(k)) for k in KEYS]))
    if differences:
        lines.append(rule)
        for label, metrics in differences:
            lines.append("  ".join([f"{label:<{width}}"]
                                   + [_fmt(metrics.get(k), signed=True) for k in KEYS]))
    return "\n".join(lines)


def _same_loss(a, b):
    def norm(name):
        return (name or "").lower().replace("_", "")
    return norm(a) == norm(b)


def difference(a, b):
    """Key-wise a - b (None where either lacks the key)."""
    return {k: None if a.get(k) is None or b.get(k) is None else a[k] - b[k] for k in KEYS}


def mean_metrics(records):
    """Key-wise mean of the records' metrics (None where a record lacks the key)."""
    out = {}
    for k in KEYS:
        vals = [r["metrics"].get(k) for r in records]
        out[k] = None if any(v is None for v in vals) else sum(vals) / len(vals)
    return out


def spread_metrics(records):
    """Key-wise max - min of the records' metrics (None where a record lacks the key)."""
    out = {}
    for k in KEYS:
        vals = [r["metrics"].get(k) for r in records]
        out[k] = None if any(v is None for v in vals) else max(vals) - min(vals)
    return out


def _seed_label(r):
    return f"seed {r['seed']}" if r.get("seed") is not None else "seed ?"


def load_reference(path):
    ref = read_json(path, "demo reference")
    if not isinstance(ref.get("runs"), list):
        raise ValueError(f"{path}: not a demo reference (no 'runs' list)")
    return ref


def build_table(runs, reference=None, reference_path=None):
    """The printed report: this machine's runs, then the reference runs (and the means of
    each loss's reference runs when there are several seeds), the differences between this
    run and the runs of other losses, then where the per-category outputs are."""
    this = runs[0]
    this_label = f"{this['loss'] or '?'} (this run)"
    rows, differences = [], []
    for i, r in enumerate(runs):
        where = "this run" if i == 0 else "run here"
        rows.append((f"{r['loss'] or '?'} ({where}, {_seed_label(r)})", r["metrics"]))
        if i > 0 and not _same_loss(r["loss"], this["loss"]):
            differences.append((f"{this_label} - {r['loss']} (run here)",
                                difference(this["metrics"], r["metrics"])))
    notes = []
    if reference is not None:
        by_loss = {}
        for r in reference["runs"]:
            by_loss.setdefault(r["loss"], []).append(r)
        for loss, recs in by_loss.items():
            for r in recs:
                rows.append((f"{loss} (reference, {_seed_label(r)})", r["metrics"]))
            ref_metrics, which = recs[0]["metrics"], "reference"
            if len(recs) > 1:
                ref_metrics, which = mean_metrics(recs), f"reference mean of {len(recs)}"
                rows.append((f"{loss} ({which})", ref_metrics))
                spread = spread_metrics(recs)
                notes.append(f"{loss}: spread over the reference seeds (max - min): "
                             + ", ".join(f"{k} {spread[k]:.2f}" for k in KEYS
                                         if spread[k] is not None))
            if not _same_loss(loss, this["loss"]):
                differences.append((f"{this_label} - {loss} ({which})",
                                    difference(this["metrics"], ref_metrics)))
        other = sorted({r.get("max_iter") for r in reference["runs"]} - {this.get("max_iter")},
                       key=str)
        if this.get("max_iter") is not None and other:
            notes.append(f"note: reference runs of {other} iterations, this run "
                         f"{this['max_iter']}: not the same schedule")
        notes.insert(0, f"reference: {reference_path}, measured with `{reference['command']}`"
                     + (f" on a {reference['machine']}" if reference.get("machine") else "")
                     + (f", {reference['date']}" if reference.get("date") else ""))
    head = (f"{this['dataset']} {this['task']}: LVIS AP (%) over all / rare / common / frequent "
            "categories" + (f"; {this['max_iter']} iterations" if this.get("max_iter") else ""))
    out = [head, "", format_table(rows, differences), ""]
    out += notes
    for r in runs:
        inference = os.path.join(r["run_dir"], "inference", r["dataset"])
        plot = os.path.join(inference, f"ap_vs_train_images_{r['task']}.png")
        if os.path.isfile(plot):
            out.append(f"per-category AP against train images ({r['loss']}): {plot}")
        csv = os.path.join(inference, f"per_category_{r['task']}.csv")
        if os.path.isfile(csv):
            out.append(f"per-category AP table ({r['loss']}): {csv}")
    return "\n".join(out)


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}"


def write_reference(path, run_dirs, command, dataset=None, task="bbox"):
    runs = []
    for d in run_dirs:
        r = run_record(d, dataset, task)
        runs.append({"loss": r["loss"], "seed": r["seed"], "max_iter": r["max_iter"],
                     "config_file": log_config_file(d),
                     "dataset": r["dataset"], "task": task, "run_dir": d,
                     "wall_s": r["wall_s"],
                     "metrics": r["metrics"]})
    ref = {"command": command, "machine": _machine(),
           "date": datetime.date.today().isoformat(), "runs": runs}
    write_json_atomic(path, ref, indent=1, sort_keys=True)
    return ref


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="train_net.py output folders; the first is 'this run'")
    p.add_argument("--reference", default=None,
                   help=f"reference JSON to print beside the runs (e.g. {DEFAULT_REFERENCE})")
    p.add_argument("--dataset", default=None, help="dataset of the metrics (default: the first)")
    p.add_argument("--task", default="bbox", help="bbox or segm (default bbox)")
    p.add_argument("--write-reference", metavar="JSON", default=None,
                   help="write the runs as a reference JSON instead of printing a table")
    p.add_argument("--command", default=None, help="with --write-reference: the command that made the runs")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out runs that have no metrics (yet); the first left is 'this run'")
    args = p.parse_args(argv)

    if args.write_reference:
        if not args.command:
            p.error("--write-reference needs --command (how the runs were made)")
        write_reference(args.write_reference, args.runs, args.command, args.dataset, args.task)
        print(f"wrote {args.write_reference} ({len(args.runs)} runs)")
        return 0

    dirs = args.runs
    if args.skip_missing:
        dirs = [d for d in dirs if read_metrics(d) is not None]
        if not dirs:
            p.error(f"none of {args.runs} has {' or '.join(METRICS_FILES)} yet")
    runs = [run_record(dirs[0], args.dataset, args.task)]
    runs += [run_record(d, runs[0]["dataset"], args.task) for d in dirs[1:]]
    reference = None
    if args.reference and os.path.isfile(args.reference):
        reference = load_reference(args.reference)
    print(build_table(runs, reference, args.reference))
    if args.reference and reference is None:
        print(f"no reference table at {args.reference} (`make demo-reference` measures it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
