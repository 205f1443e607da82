#!/usr/bin/env python
"""Gradient diagnostics of an EQLv2 or EFL / EQFL model from its checkpoint and metrics.

    python tools/plot_gradients.py --checkpoint output/run/model_final.pth

reads ``config.yaml`` and ``metrics.json`` beside the checkpoint (the files train_net.py
leaves in OUTPUT_DIR; --config / --metrics point elsewhere) and writes into --output-dir
(default ``<checkpoint dir>/gradients``):

- ``gradient_ratio_per_category.png`` / ``.csv``: the accumulated gradient ratio
  g_j = pos_grad_j / neg_grad_j of every category, sorted by train image count (most
  frequent first), coloured by LVIS frequency group. EQLv2 uses g_j unclamped; EFL clamps it
  to [0, 1] (Li et al. 2022, eq. 3). Categories without negative gradient yet have no g_j.
- ``focusing_factor_per_category.png`` (EFL / EQFL): gamma_j = gamma_b + s (1 - g_j), with
  gamma_b = MODEL.CLS_LOSS.<EFL or EQFL>.GAMMA_B and s = ...SCALE from the saved config.
- ``gradient_ratio_over_training.png``: the rare / common / frequent means of g_j (and, for
  EFL, of gamma_j) that the losses log into metrics.json, against the iteration.

Regime indicators of any runs, whatever their loss (``regime_indicators.jsonl`` that training
writes, see README "How faithful is it?"):

    python tools/plot_gradients.py --regime output/a output/b --labels focal EFL --output-dir D

- ``regime_samples_per_category.png``: positives / negatives seen by every category at the
  end of each run (the EFL paper's Fig. 2), categories by positives seen, coloured by group;
- ``regime_gradient_ratio_over_training.png``: the median raw g_j = pos_grad_j / neg_grad_j of
  the rare / common / frequent categories seen so far, against the iteration (log scale,
  dashed line at 1: below it a category's negatives outweigh its positives);
- ``regime_summary.csv``: those figures by group at the last snapshot of each run.
"""

import argparse
import csv
import json
import math
import os

import torch
from detectron2.config import get_cfg
from matplotlib.figure import Figure

from eql_d2.config import add_eql_config
from eql_d2.data import load_category_metadata, register_all
from eql_d2.evaluation.plots import GROUP_COLORS, save_figure
from eql_d2.evaluation.regime import group_summary, head_names, read_regime_indicators
from eql_d2.modeling.cls_losses import resolve_loss_name
from eql_d2.utils.groups import GROUP_NAMES, GROUPS
from eql_d2.utils.io import atomic_write

# registry name of a loss with gradient statistics -> what this tool plots of it
# (EFL and EQFL keep the same statistics)
LOSS_KINDS = {"EQLv2": "eqlv2", "EFL": "efl", "EQFL": "efl"}


def loss_kind(cfg, config_path):
    """(registry name, "eqlv2" or "efl") of the config's loss, else a clear error."""
    name = cfg.MODEL.CLS_LOSS.NAME
    try:
        registered = resolve_loss_name(name) if name else None
    except KeyError:
        registered = None
    if registered in LOSS_KINDS:
        return registered, LOSS_KINDS[registered]
    raise ValueError(f"{config_path}: {cfg.MODEL.META_ARCHITECTURE} with MODEL.CLS_LOSS.NAME "
                     f"{name!r} keeps no gradient statistics; they exist for "
                     f"{', '.join(LOSS_KINDS)}")


def read_statistics(checkpoint):
    """(prefix, pos_grad [C], neg_grad [C]) of the loss buffers in a detectron2 checkpoint."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"Checkpoint not found: {checkpoint}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    prefixes = sorted(k[: -len("pos_grad")] for k in state if k.endswith("pos_grad")
                      and k[: -len("pos_grad")] + "neg_grad" in state)
    if not prefixes:
        raise ValueError(f"{checkpoint}: no pos_grad / neg_grad buffers (not an EQLv2 / EFL model?)")
    if len(prefixes) > 1:
        raise ValueError(f"{checkpoint}: several gradient statistics ({prefixes}); expected one loss")
    p = prefixes[0]
    return p.rstrip("."), state[p + "pos_grad"].double(), state[p + "neg_grad"].double()


def read_history(metrics_path, kind):
    """{scalar name: ([iterations], [values])} of the logged group means."""
    names = [f"{kind}/gradient_ratio/{g}" for g in GROUPS]
    if kind == "efl":
        names += [f"efl/focusing_factor/{g}" for g in GROUPS]
    history = {n: ([], []) for n in names}
    with open(metrics_path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{metrics_path}: line {line_no} is not JSON ({e})") from e
            for n in names:
                if n in row:
                    history[n][0].append(row["iteration"])
                    history[n][1].append(row[n])
    return {n: v for n, v in history.items() if v[0]}


def _bar_by_frequency(rows, key, ylabel, title, path, hline=None):
    fig = Figure(figsize=(max(6.0, 0.12 * len(rows) + 2), 3.8))
    ax = fig.subplots()
    xs = range(len(rows))
    ys = [r[key] if r[key] is not None else 0.0 for r in rows]
    ax.bar(xs, ys, width=0.85, color=[GROUP_COLORS.get(r["frequency"], "gray") for r in rows])
    missing = [i for i, r in enumerate(rows) if r[key] is None]
    if missing:
        ax.scatter(missing, [0] * len(missing), marker="x", color="black",
                   label="no negative gradient yet")
    for g in GROUPS:
        ax.bar([0], [0], color=GROUP_COLORS[g], label=GROUP_NAMES[g])
    if hline is not None:
        ax.axhline(hline, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("categories, most train images first")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(-1, len(rows))
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _group_legend(ax):
    for g in GROUPS:
        ax.plot([], [], color=GROUP_COLORS[g], marker="o", linestyle="", label=GROUP_NAMES[g])
    ax.legend(fontsize=7)


def plot_regime(runs, labels, out_dir, head=None):
    """The regime plots and summary of `runs` (run folders or indicator files); see the
    module docstring. Returns the paths written."""
    if labels and len(labels) != len(runs):
        raise ValueError(f"--labels has {len(labels)} names for {len(runs)} runs")
    labels = labels or [os.path.basename(os.path.normpath(r)) for r in runs]
    series = [read_regime_indicators(r) for r in runs]
    n = len(runs)
    fig_s = Figure(figsize=(8, 2.7 * n))
    axes_s = fig_s.subplots(n, 1, squeeze=False)
    fig_g = Figure(figsize=(3.6 * n, 3.2))
    axes_g = fig_g.subplots(1, n, squeeze=False, sharey=True)
    rows = []
    for k, (label, snaps) in enumerate(zip(labels, series)):
        last = snaps[-1]
        name = head or head_names(last)[0]
        values = last["heads"][name]
        num = len(values["pos_count"])
        groups = last.get("class_frequency") or ["c"] * num
        order = sorted(range(num), key=lambda j: -values["pos_count"][j])
        ratio = [values["pos_count"][j] / values["neg_count"][j] if values["neg_count"][j]
                 else math.nan for j in order]
        ax = axes_s[k][0]
        ax.scatter(range(num), [r if r > 0 else math.nan for r in ratio], s=4,
                   c=[GROUP_COLORS.get(groups[j], "gray") for j in order])
        ax.set_yscale("log")
        ax.set_ylabel("positives / negatives")
        ax.set_title(f"{label}: samples seen by iteration {last['iteration']} ({name})",
                     fontsize=9)
        _group_legend(ax)
        ax = axes_g[0][k]
        for g in GROUPS:
            its, med = [], []
            for snap in snaps:
                summary = group_summary(snap, name)
                if g in summary and summary[g]["seen"]:
                    its.append(snap["iteration"])
                    med.append(summary[g]["median_g"])
            if its:
                ax.plot(its, med, color=GROUP_COLORS[g], marker=".", label=GROUP_NAMES[g])
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        if k == 0:
            ax.set_ylabel("median g_j = pos_grad / neg_grad")
            ax.legend(fontsize=7)
        for group, stats in group_summary(last, name).items():
            rows.append({"run": label, "head": name, "iteration": last["iteration"],
                         "group": group, **stats})
    axes_s[-1][0].set_xlabel("categories, most positives seen first")
    fig_s.tight_layout()
    fig_g.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "regime_samples_per_category.png"),
               os.path.join(out_dir, "regime_gradient_ratio_over_training.png"),
               os.path.join(out_dir, "regime_summary.csv")]
    save_figure(fig_s, written[0])
    save_figure(fig_g, written[1])
    with atomic_write(written[2]) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for path in written:
        print(f"wrote {path}")
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="an EQLv2 / EFL / EQFL checkpoint (its loss statistics)")
    p.add_argument("--config", help="default: config.yaml beside the checkpoint")
    p.add_argument("--metrics", help="default: metrics.json beside the checkpoint")
    p.add_argument("--output-dir", help="default: <checkpoint dir>/gradients")
    p.add_argument("--regime", nargs="+", metavar="RUN",
                   help="run folders or regime_indicators.jsonl[.gz] files of any losses")
    p.add_argument("--labels", nargs="+", help="with --regime: a name per run")
    p.add_argument("--head", help="with --regime: module path of the head (default: first)")
    args = p.parse_args(argv)
    if args.regime:
        if not args.output_dir:
            p.error("--regime needs --output-dir")
        return plot_regime(args.regime, args.labels, args.output_dir, args.head)
    if not args.checkpoint:
        p.error("give --checkpoint or --regime")

    run_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    config_path = args.config or os.path.join(run_dir, "config.yaml")
    metrics_path = args.metrics or os.path.join(run_dir, "metrics.json")
    out_dir = args.output_dir or os.path.join(run_dir, "gradients")
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"Checkpoint not found: {args.checkpoint}")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"Config not found: {config_path} (pass --config)")
    cfg = get_cfg()
    add_eql_config(cfg)
    cfg.set_new_allowed(True)  # a config saved by a newer eql_d2 may carry more keys
    cfg.merge_from_file(config_path)
    loss, kind = loss_kind(cfg, config_path)
    prefix, pos, neg = read_statistics(args.checkpoint)
    if not cfg.DATASETS.TRAIN:
        raise ValueError(f"{config_path}: DATASETS.TRAIN is empty; the category order comes from it")
    register_all()
    meta = load_category_metadata(cfg.DATASETS.TRAIN[0])
    names = meta.get("thing_classes")
    counts = meta.get("class_image_count")
    groups = meta.get("class_frequency")
    if names is None or counts is None or groups is None:
        raise ValueError(f"Dataset '{cfg.DATASETS.TRAIN[0]}' has no category counts / frequencies")
    if len(names) != pos.numel():
        raise ValueError(f"{args.checkpoint}: {prefix} has {pos.numel()} categories, dataset "
                         f"'{cfg.DATASETS.TRAIN[0]}' has {len(names)}")

    ratio = torch.where(neg > 0, pos / neg.clamp_min(1e-300), torch.full_like(pos, math.inf))
    if kind == "efl":
        ratio = ratio.clamp(0.0, 1.0)  # clamp(inf) = 1: no statistics, as the loss treats it
        node = cfg.MODEL.CLS_LOSS[loss]  # MODEL.CLS_LOSS.EFL or .EQFL
        gamma_b, scale = node.GAMMA_B, node.SCALE
        focusing = gamma_b + scale * (1.0 - ratio)
    rows = []
    for j, name in enumerate(names):
        g = float(ratio[j])
        rows.append({"category_id": counts[j]["id"], "name": name, "frequency": groups[j],
                     "train_image_count": counts[j]["image_count"],
                     "pos_grad": float(pos[j]), "neg_grad": float(neg[j]),
                     "gradient_ratio": None if math.isinf(g) else g})
        if kind == "efl":
            rows[-1]["focusing_factor"] = float(focusing[j])
    rows.sort(key=lambda r: (-r["train_image_count"], r["category_id"]))

    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "gradient_ratio_per_category.csv")
    with atomic_write(csv_path) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    label = loss
    _bar_by_frequency(rows, "gradient_ratio", "gradient ratio g_j",
                      f"{label}: accumulated gradient ratio per category ({os.path.basename(args.checkpoint)})",
                      os.path.join(out_dir, "gradient_ratio_per_category.png"),
                      hline=cfg.MODEL.CLS_LOSS.EQLV2.MU if kind == "eqlv2" else None)
    written = [csv_path, os.path.join(out_dir, "gradient_ratio_per_category.png")]
    if kind == "efl":
        _bar_by_frequency(rows, "focusing_factor", "focusing factor gamma_j",
                          f"{label}: gamma_j = {gamma_b:g} + {scale:g} (1 - g_j)",
                          os.path.join(out_dir, "focusing_factor_per_category.png"), hline=gamma_b)
        written.append(os.path.join(out_dir, "focusing_factor_per_category.png"))

    if os.path.isfile(metrics_path):
        history = read_history(metrics_path, kind)
        if history:
            panels = ["gradient_ratio"] + (["focusing_factor"] if kind == "efl" else [])
            fig = Figure(figsize=(5.2 * len(panels), 3.6))
            axes = fig.subplots(1, len(panels), squeeze=False)
            for ax, panel in zip(axes[0], panels):
                for g in GROUPS:
                    key = f"{kind}/{panel}/{g}"
                    if key in history:
                        ax.plot(*history[key], color=GROUP_COLORS[g], label=GROUP_NAMES[g])
                ax.set_xlabel("iteration")
                ax.set_ylabel(f"mean {panel.replace('_', ' ')}")
                ax.grid(alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
            fig.suptitle(f"{label}: group means logged during training", fontsize=10)
            path = os.path.join(out_dir, "gradient_ratio_over_training.png")
            save_figure(fig, path)
            written.append(path)
        else:
            print(f"{metrics_path}: no {kind}/gradient_ratio scalars; no plot over training")
    else:
        print(f"{metrics_path} not found; no plot over training")
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
