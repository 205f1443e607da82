#!/usr/bin/env python
"""The demo's table: LVIS AP, APr, APc, APf of finished runs beside a measured reference.

    python tools/demo_table.py output/demo                           # this run + reference
    python tools/demo_table.py output/demo output/demo_baseline      # + a baseline run here
    python tools/demo_table.py --write-reference benchmarks/results/demo_reference.json \\
        --command "make demo-reference" output/demo_reference/*      # record the reference

A run is a train_net.py OUTPUT_DIR: its ``final_metrics.json`` (or ``eval_metrics.json`` of
``--eval-only``) gives the metrics, its ``config.yaml`` the classification loss and seed
that label the row, and the evaluator's ``inference/<dataset>/per_category_<task>.csv`` the
number of rare categories with AP > 0 (column "rare AP>0"). Every figure printed is read
from those files or from the reference JSON; none is written in this script. The
reference JSON (``--write-reference``) copies the metrics, loss, seed, config file and rare
count of each run, with the command that made them, so ``make demo`` can show the baseline
without training it. Several seeds of a loss are printed with their mean and spread.
"""

import argparse
import datetime
import math
import os
import platform
import re
import sys

import yaml

from eql_d2.evaluation.lvis_evaluation import read_per_category_ap
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


def rare_detected(run_dir, dataset, task):
    """[categories with AP > 0, categories with an AP] of the rare group, from the run's
    per-category CSV (LVISPerCategoryEvaluator), or None without one."""
    path = os.path.join(run_dir, "inference", dataset, f"per_category_{task}.csv")
    if not os.path.isfile(path):
        return None
    rare = [ap for frequency, ap in read_per_category_ap(path).values() if frequency == "r"]
    return [sum(ap > 0 for ap in rare), len(rare)] if rare else None


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
        "rare_detected": rare_detected(run_dir, dataset, task),
        "wall_s": log_wall_seconds(run_dir),
    }


RARE_FOUND = "rare AP>0"  # column: rare categories with AP > 0 / rare categories evaluated
COLUMNS = KEYS + (RARE_FOUND,)


def _fmt(v, signed=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>6}"
    return f"{v:+6.2f}" if signed else f"{v:6.2f}"


def _fmt_found(v, signed=False):
    """[found, total] as "found/total" (found a mean: one decimal); signed: a difference."""
    if v is None:
        text = "-"
    elif signed:
        text = f"{v:+g}" if float(v).is_integer() else f"{v:+.1f}"
    else:
        found, total = v
        text = f"{found:g}/{total}" if float(found).is_integer() else f"{found:.1f}/{total}"
    return f"{text:>{len(RARE_FOUND)}}"


def format_table(rows, differences=()):
    """rows: (label, values); differences: (label, values) printed signed below a rule;
    values: {column: value} as made by row_values, mean_values and difference."""
    width = max([len("run")] + [len(label) for label, _ in list(rows) + list(differences)])
    lines = ["  ".join([f"{'run':<{width}}"] + [f"{k:>6}" for k in KEYS] + [RARE_FOUND])]
    rule = "-" * len(lines[0])
    lines.append(rule)
    for block, signed in ((rows, False), (differences, True)):
        if signed and block:
            lines.append(rule)
        for label, values in block:
            lines.append("  ".join([f"{label:<{width}}"]
                                   + [_fmt(values.get(k), signed) for k in KEYS]
                                   + [_fmt_found(values.get(RARE_FOUND), signed)]))
    return "\n".join(lines)


def _same_loss(a, b):
    def norm(name):
        return (name or "").lower().replace("_", "")
    return norm(a) == norm(b)


def row_values(record):
    """{column: value} of one run (a run_record or a reference run)."""
    values = {k: record["metrics"].get(k) for k in KEYS}
    values[RARE_FOUND] = record.get("rare_detected")
    return values


def difference(a, b):
    """Column-wise a - b of two row values (None where either lacks the value; the rare
    count only when both evaluated the same number of rare categories)."""
    out = {k: None if a.get(k) is None or b.get(k) is None else a[k] - b[k] for k in KEYS}
    fa, fb = a.get(RARE_FOUND), b.get(RARE_FOUND)
    out[RARE_FOUND] = fa[0] - fb[0] if fa and fb and fa[1] == fb[1] else None
    return out


def _over_seeds(records, reduce):
    values = [row_values(r) for r in records]
    out = {}
    for k in KEYS:
        vals = [v[k] for v in values]
        out[k] = None if any(x is None for x in vals) else reduce(vals)
    found = [v[RARE_FOUND] for v in values]
    same_total = all(f for f in found) and len({f[1] for f in found}) == 1
    out[RARE_FOUND] = [reduce([f[0] for f in found]), found[0][1]] if same_total else None
    return out


def mean_values(records):
    """Column-wise mean over the records (None where a record lacks the value)."""
    return _over_seeds(records, lambda xs: sum(xs) / len(xs))


def spread_values(records):
    """Column-wise max - min over the records (None where a record lacks the value)."""
    return _over_seeds(records, lambda xs: max(xs) - min(xs))


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
        rows.append((f"{r['loss'] or '?'} ({where}, {_seed_label(r)})", row_values(r)))
        if i > 0 and not _same_loss(r["loss"], this["loss"]):
            differences.append((f"{this_label} - {r['loss']} (run here)",
                                difference(row_values(this), row_values(r))))
    notes = []
    if reference is not None:
        by_loss = {}
        for r in reference["runs"]:
            by_loss.setdefault(r["loss"], []).append(r)
        for loss, recs in by_loss.items():
            for r in recs:
                rows.append((f"{loss} (reference, {_seed_label(r)})", row_values(r)))
            ref_values, which = row_values(recs[0]), "reference"
            if len(recs) > 1:
                ref_values, which = mean_values(recs), f"reference mean of {len(recs)}"
                rows.append((f"{loss} ({which})", ref_values))
                spread = spread_values(recs)
                notes.append(f"{loss}: spread over the reference seeds (max - min): "
                             + ", ".join(f"{k} {spread[k]:.2f}" for k in KEYS
                                         if spread[k] is not None))
            if not _same_loss(loss, this["loss"]):
                differences.append((f"{this_label} - {loss} ({which})",
                                    difference(row_values(this), ref_values)))
        other = sorted({r.get("max_iter") for r in reference["runs"]} - {this.get("max_iter")},
                       key=str)
        if this.get("max_iter") is not None and other:
            notes.append(f"note: reference runs of {other} iterations, this run "
                         f"{this['max_iter']}: not the same schedule")
        notes.insert(0, f"reference: {reference_path}, measured with `{reference['command']}`"
                     + (f" on a {reference['machine']}" if reference.get("machine") else "")
                     + (f", {reference['date']}" if reference.get("date") else ""))
    head = (f"{this['dataset']} {this['task']}"
            + (f", {this['max_iter']} iterations" if this.get("max_iter") else "")
            + ": LVIS AP (%) over all / rare / common / frequent categories;\n"
            + f"{RARE_FOUND}: rare categories with AP > 0 / rare categories evaluated")
    out = [head, "", format_table(rows, differences), ""]
    out += notes
    for r in runs:
        inference = os.path.join(r["run_dir"], "inference", r["dataset"])
        plot = os.path.join(inference, f"ap_vs_train_images_{r['task']}.png")
        if os.path.isfile(plot):
            out.append(f"per-category AP against train images ({r['loss']}): {plot}")
        table = os.path.join(inference, f"per_category_{r['task']}.csv")
        if os.path.isfile(table):
            out.append(f"per-category AP table ({r['loss']}): {table}")
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
                     "wall_s": r["wall_s"], "rare_detected": r["rare_detected"],
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
