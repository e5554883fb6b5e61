"""Static PNG figures for MLflow and offline reading (``dvc plots show`` needs a CDN, see ECOSYSTEM §4b).

Each function takes plain data and a path, so tracking and compare share them and tests can call them
without MLflow. matplotlib is imported inside each function (the non-interactive Agg backend) to keep
``selfalign --help`` fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["bar_counts", "delta_heatmap", "loss_curves", "value_heatmap", "variant_bars"]

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


def delta_heatmap(rows: Sequence[str], cols: Sequence[str], deltas: Sequence[Sequence[float]],
                  labels: Sequence[Sequence[str]], path: str | Path, title: str) -> Path:
    """Rows x columns of deltas (NaN = missing): diverging colours centred on 0, the text in each cell."""
    import numpy as np

    plt = _pyplot()
    data = np.array(deltas, dtype=float).reshape(len(rows), len(cols))
    # colour is scaled per column: columns mix rates (0-1) and counts, one scale would hide the rates
    scale = np.nanmax(np.abs(np.where(np.isfinite(data), data, np.nan)), axis=0, initial=0.0)
    shaded = data / np.where(scale > 0, scale, 1.0)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(cols) + 2), max(2.5, 0.6 * len(rows) + 1.5)))
    im = ax.imshow(np.ma.masked_invalid(shaded), cmap="RdBu", vmin=-1.0, vmax=1.0, aspect="auto")
    _label_grid(ax, rows, cols, labels, data, rotation=30, dark_above=math.inf)
    fig.colorbar(im, ax=ax, label="delta / max |delta| of the column")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


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

    Unlike :func:`delta_heatmap` every cell shares the colour scale: the cells are the same quantity
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
