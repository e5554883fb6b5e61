"""Static PNG figures for MLflow and offline reading (``dvc plots show`` needs a CDN, see ECOSYSTEM §4b).

Each function takes plain data and a path, so tracking and compare share them and tests can call them
without MLflow. matplotlib is imported inside each function (the non-interactive Agg backend) to keep
``selfalign --help`` fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["ForestPanel", "bar_counts", "delta_forest", "loss_curves", "value_heatmap", "variant_bars"]

# (value, ci_low, ci_high); a missing bound is None
Estimate = tuple[float, float | None, float | None]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(series: Mapping[str, Sequence[tuple[int, float]]], path: str | Path) -> Path:
    """One line per training series (x = optimizer step)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in sorted(series.items()):
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def variant_bars(table: Mapping[str, Mapping[str, Estimate]], path: str | Path) -> Path:
    """Grouped bars: one group per metric, one bar per variant, 95% CI as error bars."""
    plt = _pyplot()
    variants = list(table)
    metrics = sorted({m for row in table.values() for m in row})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(metrics) + 2), 4))
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        xs, ys, err_lo, err_hi = [], [], [], []
        for j, metric in enumerate(metrics):
            est = table[variant].get(metric)
            if est is None:
                continue
            value, lo, hi = est
            xs.append(j + i * width - 0.4 + width / 2)
            ys.append(value)
            err_lo.append(value - lo if lo is not None else 0.0)
            err_hi.append(hi - value if hi is not None else 0.0)
        ax.bar(xs, ys, width=width, label=variant, yerr=[err_lo, err_hi], capsize=2)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics, rotation=30, ha="right", fontsize=8)
    ax.set_title("variants (95% bootstrap CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def bar_counts(counts: Mapping[str, float], path: str | Path, title: str) -> Path:
    """Horizontal bars (e.g. how often each principle is cited), largest on top."""
    plt = _pyplot()
    items = sorted(counts.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.3 * len(items) + 1)))
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


@dataclass(frozen=True)
class ForestPanel:
    """One column of a comparison: a delta and its interval per row, ``significant`` per row, and the x range
    (shared by the panels of comparable columns, so equal lengths mean equal effects)."""

    title: str
    rows: tuple[str, ...]
    deltas: tuple[float, ...]
    lows: tuple[float | None, ...]
    highs: tuple[float | None, ...]
    significant: tuple[bool, ...]
    xlim: tuple[float, float]


def delta_forest(panels: Sequence[ForestPanel], path: str | Path, title: str, note: str = "") -> Path:
    """A forest plot per column: each row's delta as a dot with its interval as a bar, a line at 0.

    A significant delta is a filled red/blue dot marked ``*``; any other delta is a hollow grey dot, however
    large: colour says "judged significant", never "large". With no panels the figure says so (still a file)."""
    plt = _pyplot()
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    height = max(1.6, 0.35 * max((len(p.rows) for p in panels), default=1) + 1.0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, height * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, panel in zip(flat, panels):
        _forest_panel(ax, panel)
    for ax in flat[len(panels):]:
        ax.set_axis_off()
    if not panels:
        flat[0].text(0.5, 0.5, "no deltas", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _forest_panel(ax: Any, panel: ForestPanel) -> None:
    ys = list(range(len(panel.rows)))[::-1]  # first row on top
    ax.axvline(0.0, color="black", lw=0.8)
    for y, d, lo, hi, sig in zip(ys, panel.deltas, panel.lows, panel.highs, panel.significant):
        if not math.isfinite(d):
            ax.text(0.0, y, "-", ha="center", va="center", fontsize=8)
            continue
        colour = ("tab:blue" if d > 0 else "tab:red") if sig else "0.55"
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [y, y], color=colour, lw=2 if sig else 1.2, solid_capstyle="butt")
        ax.plot([d], [y], "o", ms=6, color=colour, markerfacecolor=colour if sig else "white")
        ax.text(d, y + 0.22, f"{d:+.3f}" + ("*" if sig else ""), ha="center", va="bottom", fontsize=7,
                color=colour, fontweight="bold" if sig else "normal")
    ax.set_yticks(ys)
    ax.set_yticklabels(panel.rows, fontsize=8)
    ax.set_ylim(-0.7, len(panel.rows) - 0.2)
    ax.set_xlim(*panel.xlim)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(panel.title, fontsize=8)


def _label_grid(ax: Any, rows: Sequence[str], cols: Sequence[str], labels: Sequence[Sequence[str]], data: Any,
                rotation: int, dark_above: float) -> None:
    """Tick labels and one text label per cell ("-" where the value is missing); white text on cells whose
    |value| exceeds ``dark_above`` (deep colours)."""
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=rotation, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    for i in range(len(rows)):
        for j in range(len(cols)):
            finite = math.isfinite(data[i, j])
            dark = finite and abs(data[i, j]) > dark_above
            ax.text(j, i, labels[i][j] if finite else "-", ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")


def value_heatmap(rows: Sequence[str], cols: Sequence[str], values: Sequence[Sequence[float]],
                  labels: Sequence[Sequence[str]], path: str | Path, title: str, scale_label: str) -> Path:
    """Rows x columns of values on ONE diverging scale centred on 0 (NaN = missing, shown "-").

    Every cell shares the colour scale: the cells are the same quantity
    (e.g. a probe margin per variant and principle), so colours compare across columns too. With no
    columns the figure says so (the file is still written: it is a declared pipeline output).
    """
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cols) + 2.5), max(2.5, 0.55 * len(rows) + 1.8)))
    if not rows or not cols:
        ax.text(0.5, 0.5, "no data", ha="center", va="center")
        ax.set_axis_off()
    else:
        data = np.array(values, dtype=float).reshape(len(rows), len(cols))
        finite = data[np.isfinite(data)]
        bound = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
        im = ax.imshow(np.ma.masked_invalid(data), cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
        _label_grid(ax, rows, cols, labels, data, rotation=35, dark_above=0.6 * bound)
        fig.colorbar(im, ax=ax, label=scale_label)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
