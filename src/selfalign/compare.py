"""Compare pipeline runs from MLflow: a table of headline metrics with deltas vs. the full-principle run.

Rows are ablations (the latest run of each ``ablation`` tag: ``full``, ``exclude:<name>`` ...); columns
come from ``tracking.compare.columns`` in params (TruthfulQA MC1/MC2, HHH per category, Vicuna win
rate, refusal-related counts ...), read for ``tracking.compare.variant``. Each cell of an ablation row
shows its value, the delta vs. the ``full`` row and a 95% interval for that delta.

The delta interval combines the two runs' bootstrap CIs as independent (half-widths added in
quadrature). Both runs are scored on the same items, so a paired bootstrap would be tighter; this
interval is the conservative one and needs nothing but the logged metrics. The table is printed, saved
as CSV/Markdown, drawn as a heatmap PNG, and logged to a ``compare`` run of the same MLflow experiment.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from selfalign.config import Config

log = logging.getLogger(__name__)

BASELINE_LABEL = "full"
# the param that differs between an ablation run and its baseline
ABLATION_PARAM = "self_align.exclude"


@dataclass(frozen=True)
class Cell:
    """One metric of one run, with its CI and (for ablation rows) the delta vs. the baseline."""

    value: float | None
    ci: tuple[float, float] | None
    delta: float | None = None
    delta_ci: tuple[float, float] | None = None

    def text(self) -> str:
        if self.value is None:
            return "-"
        if self.delta is None:
            ci = f" [{self.ci[0]:.3f},{self.ci[1]:.3f}]" if self.ci else ""
            return f"{self.value:.3f}{ci}"
        dci = f" [{self.delta_ci[0]:+.3f},{self.delta_ci[1]:+.3f}]" if self.delta_ci else ""
        return f"{self.value:.3f} ({self.delta:+.3f}{dci})"


@dataclass(frozen=True)
class Row:
    label: str
    run_id: str
    run_name: str
    cells: tuple[Cell, ...]


def _estimate(metrics: dict[str, float], key: str) -> tuple[float | None, tuple[float, float] | None]:
    value = metrics.get(key)
    parent = key.rsplit(".", 1)[0] + "."
    if value is None and ".rejects." in key and any(k.startswith(parent) for k in metrics):
        value = 0.0  # reject counts list only the reasons that occurred: a logged group without this one means 0
    lo, hi = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return value, ((lo, hi) if lo is not None and hi is not None else None)


def delta_cell(value: float | None, ci: tuple[float, float] | None, base: Cell) -> Cell:
    """Delta vs. the baseline cell; its interval adds both CI half-widths in quadrature."""
    if value is None or base.value is None:
        return Cell(value, ci)
    delta = value - base.value
    delta_ci = None
    if ci is not None and base.ci is not None:
        half = math.hypot((ci[1] - ci[0]) / 2, (base.ci[1] - base.ci[0]) / 2)
        delta_ci = (delta - half, delta + half)
    return Cell(value, ci, delta, delta_ci)


def _setting(run) -> dict[str, str]:
    """A run's params minus the ablation knob: runs with equal settings are comparable."""
    return {k: v for k, v in run.params.items() if k != ABLATION_PARAM}


def pick_baseline(runs: list, baseline_run: str | None = None):
    """The reference run: ``baseline_run`` if given, else the latest ``full`` run whose other params
    equal those of the latest ablation run (so a full run of another profile is not the reference),
    else the latest ``full`` run."""
    from selfalign.cli import UserError

    if baseline_run is not None:
        found = next((r for r in runs if r.run_id == baseline_run), None)
        if found is None:
            raise UserError(f"--baseline: no pipeline run with id {baseline_run}")
        return found
    ordered = sorted(runs, key=lambda r: r.start_time)
    fulls = [r for r in ordered if r.ablation == BASELINE_LABEL]
    ablations = [r for r in ordered if r.ablation != BASELINE_LABEL]
    if not fulls:
        return None
    if ablations:
        same = [r for r in fulls if _setting(r) == _setting(ablations[-1])]
        if same:
            return same[-1]
        log.warning("no full run with the same params as %s; using the latest full run", ablations[-1].name)
    return fulls[-1]


def build_rows(runs: list, columns: dict[str, str], variant: str, baseline_run: str | None = None) -> list[Row]:
    """Baseline first, then the latest run per ablation (preferring runs with the baseline's params)."""
    base = pick_baseline(runs, baseline_run)
    latest: dict[str, object] = {}
    for run in sorted(runs, key=lambda r: r.start_time):
        if run.ablation == BASELINE_LABEL:
            continue
        current = latest.get(run.ablation)
        comparable = base is None or _setting(run) == _setting(base)
        if current is None or comparable or _setting(current) != _setting(base):
            latest[run.ablation] = run
    keys = [pattern.format(variant=variant) for pattern in columns.values()]
    base_cells = tuple(Cell(*_estimate(base.metrics, k)) for k in keys) if base is not None else ()
    rows = [Row(BASELINE_LABEL, base.run_id, base.name, base_cells)] if base is not None else []
    for label in sorted(latest):
        run = latest[label]
        name = run.name
        if base is not None and _setting(run) != _setting(base):
            log.warning("%s (%s) differs from the baseline in more than the exclusion", label, run.run_id)
            name += "*"
        cells = []
        for i, key in enumerate(keys):
            value, ci = _estimate(run.metrics, key)
            cells.append(delta_cell(value, ci, base_cells[i]) if base_cells else Cell(value, ci))
        rows.append(Row(label, run.run_id, name, tuple(cells)))
    return rows


def format_table(rows: list[Row], labels: list[str]) -> str:
    """Fixed-width text table (what the terminal shows)."""
    header = ["ablation", "run", *labels]
    body = [[r.label, r.run_name, *(c.text() for c in r.cells)] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out.extend(fmt.format(*line) for line in body)
    return "\n".join(out)


def to_csv(rows: list[Row], labels: list[str]) -> str:
    """Machine-readable table: value, CI, delta and delta CI per column."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["ablation", "run_id", "column", "value", "ci_low", "ci_high", "delta",
                     "delta_ci_low", "delta_ci_high"])
    for row in rows:
        for label, c in zip(labels, row.cells):
            writer.writerow([row.label, row.run_id, label, c.value, *(c.ci or (None, None)), c.delta,
                             *(c.delta_ci or (None, None))])
    return buf.getvalue()


def run(config: Config, *, root: str | Path, experiment: str | None, out_dir: str,
        baseline_run: str | None = None) -> dict:
    """Read the runs, print/save the table and heatmap, log them to MLflow; returns a summary."""
    from selfalign import plots, tracking
    from selfalign.cli import UserError
    from selfalign.io import atomic_write_text, sha256_text

    root = Path(root).resolve()
    experiment = experiment or config.tracking.experiment_name
    uri = tracking.resolve_tracking_uri(root)
    runs = tracking.load_runs(uri, experiment)
    if not runs:
        raise UserError(f"no finished pipeline runs in MLflow experiment '{experiment}' at {uri}; "
                        "run `dvc repro` (and `selfalign ablate --run`) first")
    cmp = config.tracking.compare
    labels = list(cmp.columns)
    rows = build_rows(runs, dict(cmp.columns), cmp.variant, baseline_run)
    if not rows or rows[0].label != BASELINE_LABEL:
        log.warning("no full-principle run in '%s': deltas cannot be computed", experiment)
    table = format_table(rows, labels)
    out = root / out_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.txt", table + "\n")
    atomic_write_text(out / "compare.csv", to_csv(rows, labels))
    deltas = [[(c.delta if c.delta is not None else (0.0 if r.label == BASELINE_LABEL and c.value is not None
                                                    else float("nan"))) for c in r.cells] for r in rows]
    cell_text = [[(f"{c.delta:+.3f}" if c.delta is not None else (f"{c.value:.3f}" if c.value is not None
                                                                   else "-")) for c in r.cells] for r in rows]
    plots.delta_heatmap([r.label for r in rows], labels, deltas, cell_text, out / "compare.png",
                        f"{cmp.variant}: delta vs full principle set")
    key = sha256_text("|".join([experiment, cmp.variant, *labels, *(r.run_id for r in rows)]))
    compare_run = tracking.log_comparison(uri, experiment, key,
                                          [out / "compare.txt", out / "compare.csv", out / "compare.png"],
                                          {"compared_runs": ",".join(r.run_id for r in rows)})
    return {"table": table, "rows": rows, "compare_run": compare_run, "out_dir": str(out), "uri": uri}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: tracking.experiment_name)")
    parser.add_argument("--baseline", default=None, help="run id of the reference run (default: latest 'full')")
    parser.add_argument("--out-dir", default="eval/compare", help="where compare.{txt,csv,png} are written")
    parser.add_argument("--root", default=".", help="project root (for the default MLflow store)")


def main(args: argparse.Namespace, config: Config) -> None:
    result = run(config, root=args.root, experiment=args.experiment, out_dir=args.out_dir,
                 baseline_run=args.baseline)
    print(result["table"])
    print(f"\nheatmap: {Path(result['out_dir']) / 'compare.png'}; MLflow compare run {result['compare_run']}")
