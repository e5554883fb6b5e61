"""Compare pipeline runs from MLflow: headline metrics of each ablation with deltas vs. the full-principle run.

``selfalign compare`` reads the latest run of each ``ablation`` tag and the seed replicates, and writes a table
(columns: ``tracking.compare.columns``; at most 120 characters wide, every number in the CSV) to the terminal and to
``--out-dir`` (text, CSV, forest plot), attached to the MLflow runs it compares (no run of its own). Deltas are
paired over the items both runs scored where they can be; a delta is significant only when its 95% CI with seed
variance excludes 0 and it exceeds the seed spread. The statistics and the rule: docs/tracking.md (Comparing runs).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from selfalign.config import Config
from selfalign.replicate import SEED_PARAMS

log = logging.getLogger(__name__)

BASELINE_LABEL = "full"
# the param that differs between an ablation run and its baseline
ABLATION_PARAM = "self_align.exclude"
# per-ablation probe sets in column keys: the row's own excluded principle(s) / every other principle
OWN, OTHERS = "{principle}", "{others}"
# the compared variant and the control variant in column keys
VARIANT, CONTROL = "{variant}", "{control}"
# marks a delta interval that combines two independent CIs (no per-item scores to pair)
INDEPENDENT_MARK = "\u2020"
# the judgement of an ablation delta against seed noise (module docstring), and its mark in the table
SIGNIFICANT, WITHIN_SPREAD, CI_INCLUDES_0, NO_SPREAD = ("significant", "within seed spread", "CI includes 0",
                                                        "no seed spread")
JUDGEMENT_MARKS = {SIGNIFICANT: "*", WITHIN_SPREAD: "~"}
Z95 = 1.96


@dataclass(frozen=True)
class Noise:
    """Seed noise of one column: from the deltas between every two seed replicates of the reference run."""

    pairs: int  # replicate pairs with a delta in this column
    spread: float  # the largest |delta| between two replicates
    between_var: float  # s_between^2: mean squared replicate-pair delta (the seed variance of a difference)


@dataclass(frozen=True)
class Cell:
    """One metric of one run, with its CI and (for ablation rows) the delta vs. the baseline."""

    value: float | None
    ci: tuple[float, float] | None
    delta: float | None = None
    delta_ci: tuple[float, float] | None = None
    paired: bool = False  # delta from a paired bootstrap on the same items (else: independent CIs)
    n: int | None = None  # paired items behind the delta
    noise: Noise | None = None  # seed noise this delta is judged against
    total_ci: tuple[float, float] | None = None  # delta CI with the between-run (seed) variance added
    judgement: str = ""  # SIGNIFICANT / WITHIN_SPREAD / CI_INCLUDES_0 / NO_SPREAD (ablation deltas only)

    def text(self) -> str:
        if self.value is None:
            return "-"
        if self.delta is None:
            ci = f" [{self.ci[0]:.3f},{self.ci[1]:.3f}]" if self.ci else ""
            return f"{self.value:.3f}{ci}"
        mark = "" if self.paired or not self.delta_ci else INDEPENDENT_MARK
        dci = f" [{self.delta_ci[0]:+.3f},{self.delta_ci[1]:+.3f}]{mark}" if self.delta_ci else ""
        tci = f"; +seeds [{self.total_ci[0]:+.3f},{self.total_ci[1]:+.3f}]" if self.total_ci else ""
        return f"{self.value:.3f} ({self.delta:+.3f}{dci}{tci}){JUDGEMENT_MARKS.get(self.judgement, '')}"

    @property
    def method(self) -> str:
        if self.delta is None:
            return ""
        return "paired" if self.paired else ("independent" if self.delta_ci else "")


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
    from selfalign.io import UserError

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


def column_keys(columns: dict[str, str], variant: str, control: str) -> list[str]:
    """The logged metric key behind each column: ``{variant}`` and ``{control}`` substituted (the per-ablation
    placeholders stay: :func:`item_source` resolves them per row)."""
    return [pattern.replace(VARIANT, variant).replace(CONTROL, control) for pattern in columns.values()]


def build_rows(runs: list, keys: list[str], baseline_run: str | None = None) -> list[Row]:
    """Baseline first, then the latest run per ablation (preferring runs with the baseline's params);
    one cell per metric key (:func:`column_keys`)."""
    base = pick_baseline(runs, baseline_run)
    latest: dict[str, object] = {}
    for run in sorted(runs, key=lambda r: r.start_time):
        if run.ablation == BASELINE_LABEL:
            continue
        current = latest.get(run.ablation)
        comparable = base is None or _setting(run) == _setting(base)
        if current is None or comparable or _setting(current) != _setting(base):
            latest[run.ablation] = run
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


# ------------------------------------------------------------------------------------ paired deltas
class RunItems:
    """Per-item sample files of logged runs (``items/<variant>/<file>`` artifacts), downloaded once each."""

    def __init__(self, uri: str, scratch: str | Path) -> None:
        self.uri, self.scratch = uri, Path(scratch)
        self._cache: dict[tuple[str, str], list[dict] | None] = {}

    def records(self, run_id: str, variant: str, file: str) -> list[dict] | None:
        """The run's records of ``items/<variant>/<file>``, or None when the run did not log it."""
        from selfalign import tracking
        from selfalign.evaluation.paired import load_items

        key = (run_id, f"items/{variant}/{file}")
        if key not in self._cache:
            path = tracking.download_artifact(self.uri, run_id, key[1], self.scratch / run_id / variant)
            self._cache[key] = load_items(path) if path is not None else None
        return self._cache[key]


def excluded_principles(run) -> list[str]:
    """The principles a run left out (its ``excluded_principles`` tag, else the ``self_align.exclude`` param)."""
    tag = run.tags.get("excluded_principles")
    if tag is not None:
        return [p for p in tag.split(",") if p]
    raw = run.params.get(ABLATION_PARAM, "[]")
    try:
        return [str(p) for p in json.loads(raw)]
    except json.JSONDecodeError:
        return []


_ITEM_KEY = re.compile(r"^(?:eval\.(?P<ev>[^.]+)\.(?P<metric>.+)|probe\.(?P<pv>[^.]+)\.(?P<set>[^.]+|\{principle\}|"
                       r"\{others\})\.(?P<score>[^.]+))$")


def item_source(key: str, excluded: list[str], sets_present: list[str]):
    """(variant, selector) of the items behind a logged metric key, or None when it has none.

    ``eval.<variant>.<metric>`` maps through :func:`selfalign.evaluation.paired.selector`;
    ``probe.<variant>.<set>.<score>`` is that probe set, with ``{principle}`` = the row's excluded
    principles and ``{others}`` = every other principle set present (identity and over-refusal are not
    principles)."""
    from selfalign.evaluation.paired import NON_PRINCIPLE_SETS, probe_selector, selector

    m = _ITEM_KEY.match(key)
    if m is None:
        return None
    if m["ev"] is not None:
        sel = selector(m["metric"])
        return (m["ev"], sel) if sel is not None else None
    if m["set"] == OWN:
        sets = list(excluded)
    elif m["set"] == OTHERS:
        sets = [s for s in sets_present if s not in excluded and s not in NON_PRINCIPLE_SETS]
    else:
        sets = [m["set"]]
    return (m["pv"], probe_selector(sets, m["score"])) if sets else None


def _probe_sets_present(items: RunItems, run_id: str, variant: str) -> list[str]:
    from selfalign.evaluation.paired import PROBE_FILE, probe_sets

    return probe_sets(items.records(run_id, variant, PROBE_FILE) or [])


def pair_cell(cell: Cell, key: str, run, base, items: RunItems, iters: int, seed: int,
              excluded: list[str] | None = None) -> Cell:
    """``cell`` with its delta vs ``base`` recomputed as a paired bootstrap on the items both runs logged
    (unchanged when there are none). For an ``{principle}`` / ``{others}`` column the value is the run's
    mean over those items (no single logged metric holds it); ``excluded`` (default: what ``run`` excluded)
    names the probe set of ``{principle}``, so two seed replicates can be compared on an ablation's set."""
    from selfalign.evaluation.paired import item_scores, paired_delta

    excluded = excluded_principles(run) if excluded is None else excluded
    placeholder = OWN in key or OTHERS in key
    m = _ITEM_KEY.match(key)
    sets_present = _probe_sets_present(items, base.run_id, m["pv"]) if m and m["pv"] and OTHERS in key else []
    source = item_source(key, excluded, sets_present)
    if source is None:
        return Cell(None, None) if placeholder else cell
    variant, sel = source
    mine, theirs = items.records(run.run_id, variant, sel.file), items.records(base.run_id, variant, sel.file)
    if mine is None or theirs is None:
        if placeholder:
            log.warning("run %s or %s logged no items/%s/%s: '%s' left empty", run.run_id, base.run_id, variant,
                        sel.file, key)
        return Cell(None, None) if placeholder else cell
    a = item_scores(mine, sel, f"run {run.run_id}: items/{variant}/{sel.file}")
    b = item_scores(theirs, sel, f"run {base.run_id}: items/{variant}/{sel.file}")
    name = "compare." + key.replace(OWN, ",".join(excluded)).replace(OTHERS, "others")
    d = paired_delta(a, b, iters, seed, name)
    if not d["n"]:
        return Cell(None, None) if placeholder else cell
    common = [k for k in a if k in b]
    value = sum(a[k] for k in common) / len(common) if placeholder else cell.value
    delta_ci = (d["ci_low"], d["ci_high"]) if d["ci_low"] is not None else None
    return Cell(value, None if placeholder else cell.ci, d["diff"], delta_ci, paired=True, n=d["n"])


def pair_rows(rows: list[Row], runs: list, keys: list[str], items: RunItems, iters: int, seed: int) -> list[Row]:
    """Every ablation row's cells with paired deltas vs the baseline row where items allow."""
    if not rows or rows[0].label != BASELINE_LABEL:
        return rows
    by_id = {r.run_id: r for r in runs}
    base = by_id[rows[0].run_id]
    out = [replace(rows[0], cells=tuple(Cell(None, None) if OWN in k or OTHERS in k else c
                                        for k, c in zip(keys, rows[0].cells)))]
    for row in rows[1:]:
        run = by_id[row.run_id]
        cells = tuple(pair_cell(c, k, run, base, items, iters, seed) for k, c in zip(keys, row.cells))
        out.append(replace(row, cells=cells))
    return out


# ------------------------------------------------------------------------------------------- seed noise
def _replicate_setting(run) -> dict[str, str]:
    """A run's params minus the ablation knob and the replicate seeds."""
    return {k: v for k, v in run.params.items() if k != ABLATION_PARAM and k not in SEED_PARAMS}


def seed_replicates(runs: list, base) -> list:
    """The seed replicates of ``base``: unablated runs equal to it in every param but :data:`SEED_PARAMS`,
    one per distinct seed tuple (``base`` for its own seeds, else the latest); ``base`` first."""
    if base is None:
        return []
    by_seeds: dict[tuple, object] = {}
    for run in sorted(runs, key=lambda r: r.start_time):
        if run.ablation == BASELINE_LABEL and not excluded_principles(run) \
                and _replicate_setting(run) == _replicate_setting(base):
            by_seeds[tuple(run.params.get(k) for k in SEED_PARAMS)] = run
    by_seeds[tuple(base.params.get(k) for k in SEED_PARAMS)] = base
    return [base, *(r for r in by_seeds.values() if r is not base)]


def seed_noise(key: str, excluded: list[str], replicates: list, items: RunItems, iters: int, seed: int) -> Noise | None:
    """The column's deltas between every two replicates, computed as an ablation delta is (:func:`pair_cell`
    on the items both logged, else the logged values' difference); None with no pair to compare."""
    from itertools import combinations

    deltas = []
    for a, b in combinations(replicates, 2):
        base_cell = Cell(*_estimate(b.metrics, key))
        cell = delta_cell(*_estimate(a.metrics, key), base_cell)
        cell = pair_cell(cell, key, a, b, items, iters, seed, excluded=excluded)
        if cell.delta is not None and math.isfinite(cell.delta):
            deltas.append(cell.delta)
    if not deltas:
        return None
    return Noise(len(deltas), max(abs(d) for d in deltas), sum(d * d for d in deltas) / len(deltas))


def judge(cell: Cell, noise: Noise | None) -> Cell:
    """``cell`` with its seed noise, the CI with seed variance, and the judgement (module docstring)."""
    if cell.delta is None:
        return cell
    if noise is None:
        return replace(cell, judgement=NO_SPREAD)
    total_ci = None
    if cell.delta_ci is not None:
        se_within = (cell.delta_ci[1] - cell.delta_ci[0]) / 2 / Z95
        half = Z95 * math.sqrt(se_within ** 2 + noise.between_var)
        total_ci = (cell.delta - half, cell.delta + half)
    if abs(cell.delta) <= noise.spread:
        verdict = WITHIN_SPREAD
    elif total_ci is None or total_ci[0] <= 0 <= total_ci[1]:  # the seed-widened interval decides
        verdict = CI_INCLUDES_0
    else:
        verdict = SIGNIFICANT
    return replace(cell, noise=noise, total_ci=total_ci, judgement=verdict)


def judge_rows(rows: list[Row], runs: list, keys: list[str], items: RunItems, iters: int,
               seed: int) -> tuple[list[Row], Row | None, int]:
    """Every ablation delta judged against the seed replicates of the baseline row; returns the rows, the
    ``seed spread (k=…)`` row (None with fewer than 2 replicates) and the number of replicates.

    A ``{principle}`` / ``{others}`` column has one spread per row (that row's probe set); the spread row
    shows the largest of them."""
    by_id = {r.run_id: r for r in runs}
    has_base = bool(rows) and rows[0].label == BASELINE_LABEL
    replicates = seed_replicates(runs, by_id[rows[0].run_id]) if has_base else []
    if len(replicates) < 2:
        return [rows[0], *(replace(r, cells=tuple(judge(c, None) for c in r.cells)) for r in rows[1:])] \
            if has_base else rows, None, len(replicates)
    per_row = [OWN in k or OTHERS in k for k in keys]
    cache: dict[tuple[int, tuple[str, ...]], Noise | None] = {}

    def noise(i: int, excluded: list[str]) -> Noise | None:
        ck = (i, tuple(excluded) if per_row[i] else ())
        if ck not in cache:
            cache[ck] = seed_noise(keys[i], excluded, replicates, items, iters, seed)
        return cache[ck]

    out = [rows[0]]
    for row in rows[1:]:
        excluded = excluded_principles(by_id[row.run_id])
        out.append(replace(row, cells=tuple(judge(c, noise(i, excluded)) for i, c in enumerate(row.cells))))
    spread_cells = []
    for i in range(len(keys)):
        if not per_row[i]:
            noise(i, [])  # the column's spread even when no ablation row has a value there
        found = [n for (col, _), n in cache.items() if col == i and n is not None]
        widest = max(found, key=lambda n: n.spread, default=None)
        spread_cells.append(Cell(widest.spread if widest else None, None, noise=widest))
    spread_row = Row(f"seed spread (k={len(replicates)})", ",".join(r.run_id for r in replicates),
                     ",".join(r.name for r in replicates), tuple(spread_cells))
    return out, spread_row, len(replicates)


# ------------------------------------------------------------------------------------------- output
TABLE_WIDTH = 120


def _cell_text(cell: Cell, row_label: str) -> str:
    """A compact terminal cell: the baseline's value [CI]; the spread; an ablation's delta with the interval its
    judgement used (with seed variance when there is one) and its mark. The CSV holds every number."""
    if cell.value is None and cell.delta is None:
        return "-"
    if row_label.startswith("seed spread"):
        return f"{cell.value:.3f}"
    if cell.delta is None:
        return f"{cell.value:.3f}" + (f" [{cell.ci[0]:.3f},{cell.ci[1]:.3f}]" if cell.ci else "")
    ci = cell.total_ci or cell.delta_ci
    mark = INDEPENDENT_MARK if ci is not None and not cell.paired else ""
    interval = f" [{ci[0]:+.3f},{ci[1]:+.3f}]{mark}" if ci else ""
    return f"{cell.delta:+.3f}{interval}{JUDGEMENT_MARKS.get(cell.judgement, '')}"


def _render(header: list[str], body: list[list[str]]) -> list[str]:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in header:
        table.add_column(Text(name), no_wrap=True, overflow="fold")
    for line in body:  # Text: "[0.1,0.2]" is data, not rich markup
        table.add_row(*(Text(cell) for cell in line))
    console = Console(file=io.StringIO(), color_system=None, force_terminal=False, highlight=False,
                      width=TABLE_WIDTH)
    console.print(table)
    return [line.rstrip() for line in console.file.getvalue().splitlines() if line.strip()]


def format_table(rows: list[Row], labels: list[str], seed_note: str | None = None,
                 width: int = TABLE_WIDTH) -> str:
    """The table as the terminal shows it, at most ``width`` characters wide: one line per column (metric),
    one column per run, in blocks of as many runs as fit (each block repeats the first run, the reference);
    a legend (``seed_note``: what the seed spread is, or that there is none) wrapped to the same width."""
    import textwrap

    label_w = min(max((len(x) for x in labels), default=6), 28)
    labels_shown = [x if len(x) <= label_w else x[:label_w - 1] + "\u2026" for x in labels]
    texts = [[_cell_text(c, r.label) for c in r.cells] for r in rows]
    widths = [max([len(r.label), len(r.run_name), *(len(t) for t in col)]) + 2 for r, col in zip(rows, texts)]
    lead, rest = (rows[:1], list(range(1, len(rows)))) if rows and rows[0].label == BASELINE_LABEL \
        else ([], list(range(len(rows))))
    blocks: list[list[int]] = []
    for i in rest:
        fixed = label_w + 2 + sum(widths[j] for j in range(len(lead)))
        if blocks and fixed + sum(widths[j] for j in blocks[-1]) + widths[i] <= width:
            blocks[-1].append(i)
        else:
            blocks.append([i])
    lines: list[str] = []
    for block in blocks or [[]]:
        cols = [*range(len(lead)), *block]
        header = ["column", *(f"{rows[j].label}\n{rows[j].run_name}" for j in cols)]
        body = [[labels_shown[k], *(texts[j][k] for j in cols)] for k in range(len(labels))]
        lines += _render(header, body) + [""]
    legend = (f"cells: {BASELINE_LABEL}: value [95% CI]; others: delta vs {BASELINE_LABEL} [95% CI, with seed "
              f"variance where there is a seed spread]; paired bootstraps over the items both runs scored, except "
              f"{INDEPENDENT_MARK}: no per-item scores, the runs' CIs combined as independent. Every number: compare.csv")
    for text in (legend, *([seed_note] if seed_note else [])):
        lines += textwrap.wrap(text, width=width)
    return "\n".join(lines)


def seed_note(k: int) -> str:
    """The legend line on seed noise: how deltas were judged, or plainly that they were not."""
    if k < 2:
        return (f"no seed spread: {k} seed replicate(s) of the {BASELINE_LABEL} run, 2 needed (`selfalign "
                "replicate --seeds 2 --run`); no delta is judged significant beyond seed noise")
    rough = " (k=2: one difference, a rough estimate)" if k == 2 else ""
    return (f"seed spread (k={k}): the largest |delta| between two seed replicates of {BASELINE_LABEL}, per "
            f"column (own/other-probe columns: per row, on that row's probes; the spread row shows the largest). "
            f"CI with seed variance: delta +- 1.96*sqrt(se_within^2 + s_between^2), s_between^2 = mean squared "
            f"replicate delta{rough}. * significant: the CI with seed variance excludes 0 and |delta| > seed spread; ~ within "
            "seed spread")


def to_csv(rows: list[Row], labels: list[str]) -> str:
    """Machine-readable table: value, CI, delta, delta CI and how the delta was computed, per column."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["ablation", "run_id", "column", "value", "ci_low", "ci_high", "delta",
                     "delta_ci_low", "delta_ci_high", "delta_method", "paired_n", "seed_spread", "seed_pairs",
                     "s_between", "seeds_ci_low", "seeds_ci_high", "judgement"])
    for row in rows:
        for label, c in zip(labels, row.cells):
            noise = (c.noise.spread, c.noise.pairs, math.sqrt(c.noise.between_var)) if c.noise else (None,) * 3
            writer.writerow([row.label, row.run_id, label, c.value, *(c.ci or (None, None)), c.delta,
                             *(c.delta_ci or (None, None)), c.method, c.n, *noise, *(c.total_ci or (None, None)),
                             c.judgement])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- the plot
# columns whose deltas share one x scale in the forest plot, by their metric key: same unit, same range
_SCALE_GROUPS = (("margin", re.compile(r"\.margin$")), ("behaviour", re.compile(r"\.behaviour$")),
                 ("NLL", re.compile(r"^distill\.")), ("count", re.compile(r"\.rejects\.")))


def scale_group(key: str) -> str:
    """Which x scale a column's deltas are drawn on: probe margins, probe behaviour, held-out NLL, counts, or
    rates (accuracies, win rates: fractions of items)."""
    return next((name for name, pattern in _SCALE_GROUPS if pattern.search(key)), "rate")


def forest_panels(rows: list[Row], labels: list[str], keys: list[str]) -> list:
    """The forest plot's data: per column with any delta, each ablation row's delta, the interval its judgement
    used (with seed variance where there is a spread, else the within-run CI) and whether it is significant;
    one symmetric x range per :func:`scale_group`, so comparable columns share a scale."""
    from selfalign.plots import ForestPanel

    ablations = [r for r in rows if r.label != BASELINE_LABEL]
    drafts = []
    for k, (label, key) in enumerate(zip(labels, keys)):
        cells = [r.cells[k] for r in ablations]
        if not any(c.delta is not None for c in cells):
            continue
        intervals = [c.total_ci or c.delta_ci for c in cells]
        drafts.append((label, scale_group(key),
                       tuple(c.delta if c.delta is not None else math.nan for c in cells),
                       tuple(i[0] if i else None for i in intervals), tuple(i[1] if i else None for i in intervals),
                       tuple(c.judgement == SIGNIFICANT for c in cells)))
    reach: dict[str, float] = {}
    for _, group, deltas, lows, highs, _ in drafts:
        values = [abs(v) for v in (*deltas, *lows, *highs) if v is not None and math.isfinite(v)]
        reach[group] = max([reach.get(group, 0.0), *values])
    return [ForestPanel(f"{label} ({group})", tuple(r.label for r in ablations), deltas, lows, highs, sig,
                        (-1.15 * reach[group] or -1.0, 1.15 * reach[group] or 1.0))
            for label, group, deltas, lows, highs, sig in drafts]


# ------------------------------------------------------------------------------------- back to MLflow
def run_notes(rows: list[Row], spread: Row | None, labels: list[str], k: int) -> tuple[dict[str, str], dict[str, list[str]]]:
    """compare's section of each compared run's description (run id -> markdown), and the significant columns
    of each ablation run (run id -> labels)."""
    notes: dict[str, str] = {}
    significant: dict[str, list[str]] = {}
    if not rows or rows[0].label != BASELINE_LABEL:
        return notes, significant
    base = rows[0]
    others = ", ".join(f"`{r.label}`" for r in rows[1:]) or "no ablation"
    notes[base.run_id] = (f"**selfalign compare** (reference run): compared with {others}; {k} seed replicate(s). "
                          f"Table and forest plot: artifacts `compare/`.")
    for rid in (spread.run_id.split(",") if spread else []):
        if rid != base.run_id:
            notes[rid] = f"**selfalign compare**: seed replicate of `{base.run_name}` ({base.run_id}), " \
                         "used for the seed spread. Artifacts `compare/`."
    for row in rows[1:]:
        sig = [lab for lab, c in zip(labels, row.cells) if c.judgement == SIGNIFICANT]
        significant[row.run_id] = sig
        lines = [f"**selfalign compare** vs `{base.run_name}` ({base.run_id}), {k} seed replicate(s): "
                 + (f"significant: {', '.join(sig)}" if sig else "no delta significant beyond seed noise"), ""]
        lines += [f"- {lab}: {c.text()}" + (f" — {c.judgement}" if c.judgement else "")
                  for lab, c in zip(labels, row.cells) if c.delta is not None]
        notes[row.run_id] = "\n".join(lines + ["", "Table and forest plot: artifacts `compare/`."])
    return notes, significant


def run(config: Config, *, root: str | Path, experiment: str | None, out_dir: str,
        baseline_run: str | None = None) -> dict:
    """Read the runs, print/save the table and forest plot, attach them to the runs compared; returns a summary."""
    from selfalign import plots, tracking
    from selfalign.io import UserError
    from selfalign.io import atomic_write_text

    root = Path(root).resolve()
    experiment = experiment or config.tracking.experiment_name
    uri = tracking.resolve_tracking_uri(root)
    runs = tracking.load_runs(uri, experiment)
    if not runs:
        raise UserError(f"no finished pipeline runs in MLflow experiment '{experiment}' at {uri}; "
                        "run `dvc repro` (and `selfalign ablate --run`) first")
    cmp = config.tracking.compare
    labels = list(cmp.columns)
    keys = column_keys(dict(cmp.columns), cmp.variant, config.evaluate.control)
    rows = build_rows(runs, keys, baseline_run)
    with tempfile.TemporaryDirectory(prefix="selfalign-compare-") as scratch:
        items = RunItems(uri, scratch)
        rows = pair_rows(rows, runs, keys, items, config.evaluate.bootstrap_iters, config.evaluate.seed)
        rows, spread_row, k = judge_rows(rows, runs, keys, items, config.evaluate.bootstrap_iters,
                                         config.evaluate.seed)
    has_base = bool(rows) and rows[0].label == BASELINE_LABEL
    if not has_base:
        log.warning("no full-principle run in '%s': deltas cannot be computed", experiment)
    elif k < 2:
        log.warning("%s", seed_note(k))
    shown = [*rows[:1], *([spread_row] if spread_row else []), *rows[1:]]
    table = format_table(shown, labels, seed_note(k) if has_base else None)
    out = root / out_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.txt", table + "\n")
    atomic_write_text(out / "compare.csv", to_csv(shown, labels))
    judged = "filled and * = significant (CI with seed variance excludes 0, |delta| > seed spread)" if k >= 2 \
        else "no seed spread (fewer than 2 replicates): nothing is judged significant; bars = within-run 95% CI"
    plots.delta_forest(forest_panels(rows, labels, keys), out / "compare.png",
                       f"{cmp.variant}: delta vs {BASELINE_LABEL} principle set, 95% intervals", judged)
    notes, significant = run_notes(rows, spread_row, labels, k)
    attached = tracking.attach_comparison(uri, experiment, rows[0].run_id if has_base else "",
                                          [out / "compare.txt", out / "compare.csv", out / "compare.png"],
                                          notes, significant)
    return {"table": table, "rows": rows, "spread": spread_row, "replicates": k, "attached_to": attached,
            "out_dir": str(out), "uri": uri}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: tracking.experiment_name)")
    parser.add_argument("--baseline", default=None, help="run id of the reference run (default: latest 'full')")
    parser.add_argument("--out-dir", default="eval/compare", help="where compare.{txt,csv,png} are written")
    parser.add_argument("--root", default=".", help="project root (for the default MLflow store)")


def main(args: argparse.Namespace, config: Config) -> None:
    result = run(config, root=args.root, experiment=args.experiment, out_dir=args.out_dir,
                 baseline_run=args.baseline)
    print(result["table"])
    print(f"\nforest plot: {Path(result['out_dir']) / 'compare.png'}")
    print(f"attached to {len(result['attached_to'])} MLflow runs (artifacts compare/, run descriptions); "
          "`selfalign ui` opens them")
