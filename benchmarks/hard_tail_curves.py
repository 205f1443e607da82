#!/usr/bin/env python
"""Convergence curves and the calibration table of the hard-tail preset's baselines.

    benchmarks/hard_tail_curves.py output/hard_tail_calibration --png docs/hard_tail_convergence.png
    benchmarks/hard_tail_curves.py output/hard_tail_calibration output/hard_tail_calibration_24e \
        --png curves.png      # two schedules side by side
    benchmarks/hard_tail_curves.py runs_12e/atss_focal runs_24e/frcnn_sigmoid   # one arm of each

Reads ``<runs>/<arm>/seed<s>/`` as ``benchmarks/hard_tail_calibration.sh`` leaves them:

- ``metrics.json`` (detectron2's JSON lines): the periodic evaluations on the federated val
  (``bbox/AP``, ``APr``, ``APc``, ``APf`` at ``TEST.EVAL_PERIOD``) and the training loss;
- ``final_metrics.json``: the evaluation of the final model;
- ``regime_indicators.jsonl`` (optional): the per-category gradient statistics.

The PNG has one panel per metric (AP, APr, APc, APf on the federated val, and the training
loss, a running median over 100 iterations) against the iteration; a line per run, one
colour per arm. With several run folders (e.g. the same baselines on two schedules) each
arm is named "arm [folder]" and each folder has its own line style. The Markdown table
(stdout) gives per arm the final AP, APr, APc, APf and APr / APf as mean ± sample standard
deviation over seeds, the change of AP and APr over the last evaluation interval (a
converged run changes little there), and the median gradient ratio g_j = pos_grad /
neg_grad of each LVIS group over that same last evaluation interval (the regime indicators'
snapshots from the last one at or before the second-last evaluation to the end).
"""

import argparse
import json
import math
import os
import statistics
import sys

KEYS = ("AP", "APr", "APc", "APf")
LOSS_WINDOW = 100


def read_json_lines(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def _bbox_prefix(row):
    """The key prefix of the federated val's bbox metrics in a metrics.json row, or None.

    With one test set detectron2 writes ``bbox/AP``; with several, ``<dataset>/bbox/AP``,
    of which the federated val (``*_val_fed``) is taken."""
    if "bbox/AP" in row:
        return "bbox/"
    for key in row:
        if key.endswith("_val_fed/bbox/AP"):
            return key[: -len("AP")]
    return None


def eval_curve(rows):
    """[(iteration, {AP, APr, APc, APf})] of the periodic evaluations, by iteration."""
    curve = {}
    for row in rows:
        prefix = _bbox_prefix(row)
        if prefix is not None:
            curve[row["iteration"]] = {k: row[prefix + k] for k in KEYS}
    return sorted(curve.items())


def loss_curve(rows, window=LOSS_WINDOW):
    """[(iteration, running median of total_loss over `window` iterations)]."""
    points = sorted((r["iteration"], r["total_loss"]) for r in rows if "total_loss" in r)
    out = []
    for i, (it, _) in enumerate(points):
        recent = [v for j, v in points[: i + 1] if j > it - window]
        out.append((it, statistics.median(recent)))
    return out


def final_bbox(run_dir):
    """The federated val's bbox metrics of final_metrics.json, or None if absent."""
    path = os.path.join(run_dir, "final_metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    fed = [name for name in results if name.endswith("_val_fed")]
    return results[fed[0] if fed else next(iter(results))]["bbox"]


def find_runs_in(roots, arms=None, seeds=None):
    """``(runs, styles)`` over several folders: `runs` as :func:`find_runs` with each arm
    named "arm [folder name]" when there is more than one folder, and `styles` {that name:
    (arm, index of its folder)}. A folder may also be one arm's (``<runs>/<arm>``, holding
    ``seed<s>/``): that arm alone, named by the folder above it, e.g. baselines kept on
    different schedules side by side."""
    runs, styles = {}, {}
    for i, root in enumerate(roots):
        only = arms
        if _is_arm_folder(root):  # one arm's seeds, e.g. <runs>/atss_focal
            root, arm = os.path.split(os.path.normpath(root))
            if arms and arm not in arms:
                continue
            only = [arm]
        for arm, by_seed in find_runs(root, only, seeds).items():
            name = arm if len(roots) == 1 else f"{arm} [{os.path.basename(os.path.normpath(root))}]"
            if name in runs:
                raise ValueError(f"two run folders are both named {name!r}: {roots}")
            runs[name] = by_seed
            styles[name] = (arm, i)
    return runs, styles


def _is_arm_folder(path):
    """Whether `path` holds seed<s>/ run folders itself (one arm) rather than arms."""
    return os.path.isdir(path) and any(
        name.startswith("seed") and name[4:].isdigit() and os.path.isdir(os.path.join(path, name))
        for name in os.listdir(path))


def find_runs(root, arms=None, seeds=None):
    """{arm: {seed: run folder}} of the runs under `root` that have a metrics.json."""
    runs = {}
    for arm in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if arms and arm not in arms:
            continue
        arm_dir = os.path.join(root, arm)
        if not os.path.isdir(arm_dir):
            continue
        for name in sorted(os.listdir(arm_dir)):
            if not name.startswith("seed") or not name[4:].isdigit():
                continue
            seed = int(name[4:])
            run_dir = os.path.join(arm_dir, name)
            if (seeds is None or seed in seeds) and os.path.isfile(
                    os.path.join(run_dir, "metrics.json")):
                runs.setdefault(arm, {})[seed] = run_dir
    return runs


def mean_std(values):
    """"mean ± std" (sample standard deviation) of the values; one value as itself."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def ratio(apr, apf):
    return apr / apf if apf > 0 else math.nan


def last_interval_change(curve, key):
    """Change of `key` between the last two evaluations (None with fewer than two)."""
    if len(curve) < 2:
        return None
    return curve[-1][1][key] - curve[-2][1][key]


def regime_last_interval(run_dir, start=None):
    """{group: median g_j} of the gradients accumulated from iteration `start` (the run's
    last snapshot at or before it; the run's start when there is none) to its last snapshot,
    or {}. `start` None: between the last two snapshots."""
    from eql_d2.evaluation.regime import group_summary, read_regime_indicators, since

    try:
        snaps = read_regime_indicators(run_dir)
    except FileNotFoundError:
        return {}
    if start is None and len(snaps) < 2:
        return {}
    grads = since(snaps, start)
    summary = group_summary(grads)
    return {g: s["median_g"] for g, s in summary.items() if s["seen"]}


def table(runs):
    """The Markdown calibration table of `runs` ({arm: {seed: folder}}), finished runs only."""
    lines = ["| arm | seeds | AP | APr | APc | APf | APr / APf | ΔAP last interval | "
             "ΔAPr last interval | median g, last interval (r / c / f) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, by_seed in sorted(runs.items()):
        finals = {s: final_bbox(d) for s, d in sorted(by_seed.items())}
        done = [s for s, m in finals.items() if m is not None]
        if not done:
            continue
        cells = [mean_std([finals[s][k] for s in done]) for k in KEYS]
        cells.append(mean_std([ratio(finals[s]["APr"], finals[s]["APf"]) for s in done]))
        curves = {s: eval_curve(read_json_lines(os.path.join(by_seed[s], "metrics.json")))
                  for s in done}
        for key in ("AP", "APr"):
            cells.append(mean_std([last_interval_change(curves[s], key) for s in done]))
        # over the same last evaluation interval as the changes of AP and APr
        g = [regime_last_interval(by_seed[s], curves[s][-2][0] if len(curves[s]) > 1 else None)
             for s in done]
        cells.append(" / ".join(mean_std([r.get(grp, math.nan) for r in g])
                                for grp in ("r", "c", "f")))
        lines.append(f"| {arm} | {','.join(map(str, done))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs, png, styles=None):
    """The curves of `runs` into `png`: one colour per arm, one line style per folder
    (`styles` from :func:`find_runs_in`; default: every run an arm of one folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = KEYS + ("training loss",)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    line_styles = ("-", "--", ":", "-.")
    styles = styles or {name: (name, 0) for name in runs}
    base_arms = sorted({arm for arm, _ in styles.values()})
    for arm, by_seed in sorted(runs.items()):
        base, folder = styles[arm]
        colour = colours[base_arms.index(base) % len(colours)]
        line = line_styles[folder % len(line_styles)]
        for i, (seed, run_dir) in enumerate(sorted(by_seed.items())):
            rows = read_json_lines(os.path.join(run_dir, "metrics.json"))
            curve = eval_curve(rows)
            label = arm if i == 0 else None
            for ax, key in zip(axes, KEYS):
                if curve:
                    ax.plot([it for it, _ in curve], [m[key] for _, m in curve], marker="o",
                            linestyle=line, color=colour, alpha=0.8, markersize=3,
                            label=label)
            loss = loss_curve(rows)
            if loss:
                axes[-1].plot([it for it, _ in loss], [v for _, v in loss], color=colour,
                              linestyle=line, alpha=0.8, label=label)
    for ax, title in zip(axes, panels):
        ax.set_title(title if title == "training loss" else f"bbox {title}, federated val")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", default=["output/hard_tail_calibration"],
                   help="folders of <arm>/seed<s>/ runs (several: compared, e.g. schedules), "
                   "or one arm's folder of seed<s>/ runs")
    p.add_argument("--png", help="write the convergence curves here")
    p.add_argument("--arms", nargs="+")
    p.add_argument("--seeds", nargs="+", type=int)
    args = p.parse_args(argv)
    runs, styles = find_runs_in(args.runs, args.arms, args.seeds)
    if not runs:
        sys.exit(f"no runs with a metrics.json under {' '.join(args.runs)}")
    if args.png:
        plot(runs, args.png, styles)
        print(f"curves: {args.png}", file=sys.stderr)
    print(table(runs))


if __name__ == "__main__":
    main()
