"""PNG plots of per-category LVIS results.

Figures are plain ``matplotlib.figure.Figure`` objects, not pyplot ones: no display is
needed, and importing this module leaves the process's matplotlib backend alone.
"""

import math

from matplotlib.figure import Figure

from ..utils.groups import GROUP_NAMES, GROUPS
from ..utils.io import atomic_write

__all__ = ["GROUP_COLORS", "save_figure", "plot_ap_vs_train_images", "plot_ap_by_frequency"]

GROUP_COLORS = {"r": "tab:red", "c": "tab:orange", "f": "tab:blue"}


def save_figure(fig, path):
    """Save `fig` as PNG at `path` (complete or absent)."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def plot_ap_vs_train_images(rows, path, title, ap_key="AP"):
    """Scatter of per-category AP against train image count (log x), coloured by group.

    rows: dicts with "frequency", "train_image_count" and `ap_key` (percent; NaN or None
    for categories without ground truth in the evaluated split, which are not drawn).
    Categories with an unknown or zero train image count cannot sit on a log axis and are
    counted in the legend title instead.
    """
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    off_axis = 0
    for group in GROUPS:
        xs, ys = [], []
        for r in rows:
            ap = r.get(ap_key)
            if r["frequency"] != group or ap is None or math.isnan(ap):
                continue
            n = r.get("train_image_count")
            if not n:
                off_axis += 1
                continue
            xs.append(n)
            ys.append(ap)
        if xs:
            ax.scatter(xs, ys, s=18, alpha=0.8, color=GROUP_COLORS[group],
                       label=f"{GROUP_NAMES[group]} ({len(xs)})")
    ax.set_xscale("log")
    ax.set_xlabel("train images of the category (log scale)")
    ax.set_ylabel(f"{ap_key} (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        legend_title = f"{off_axis} without train count" if off_axis else None
        ax.legend(loc="upper left", fontsize=8, title=legend_title)
    save_figure(fig, path)


def plot_ap_by_frequency(metrics, path, title):
    """Bars of AP, APr, APc, APf (and their AP-fixed values when `metrics` has them)."""
    keys = ["AP", "APr", "APc", "APf"]
    series = [("standard", "")]
    if any(f"{k}-fixed" in metrics for k in keys):
        series.append(("AP-fixed", "-fixed"))
    fig = Figure(figsize=(5.2, 3.8))
    ax = fig.subplots()
    width = 0.8 / len(series)
    for s, (label, suffix) in enumerate(series):
        values = [metrics.get(k + suffix, float("nan")) for k in keys]
        xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(keys))]
        colors = ["tab:gray", GROUP_COLORS["r"], GROUP_COLORS["c"], GROUP_COLORS["f"]]
        bars = ax.bar(xs, [0 if math.isnan(v) or v < 0 else v for v in values], width,
                      color=colors, alpha=1.0 if s == 0 else 0.55, hatch="//" if s else None,
                      edgecolor="black", linewidth=0.5, label=label)
        for b, v in zip(bars, values):
            text = "n/a" if math.isnan(v) or v < 0 else f"{v:.1f}"
            ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(keys)), ["AP (all)", "APr", "APc", "APf"])
    ax.set_ylabel("AP (%)")
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.set_ylim(0, max(5.0, ax.get_ylim()[1] * 1.1))
    save_figure(fig, path)
