"""Side-by-side table and plots of all evaluated variants, with paired-bootstrap deltas against the control.

Reads ``eval/results/<variant>.json`` (value + CI per metric), the per-item samples of each variant
(``eval/samples/<variant>/*.jsonl``: *paired* comparisons on the same items, so shared item difficulty
cancels) and, when present, the judge's ``eval/results/vicuna.json``. Writes a long-format CSV for ``dvc
plots``, a bar chart and a probe heatmap as PNG (``dvc plots show`` needs a CDN offline), and a JSON with:

- ``paired_vs_control``: every variant minus the control (``evaluate.control``, by default ``instructed``:
  the base weights under the engraved models' own prompt) on every benchmark metric with per-item scores.
  This is the effect of a step: engraved - control is what training changed, prompt held fixed;
- ``paired_vs_base``: the same against raw ``base`` (its own chat template, no system prompt), kept as a
  second block: it mixes the effect of the system prompt into every trained variant's delta;
- ``probes``: per probe set, each variant's margin / behaviour and its paired deltas vs the control and vs base;
- ``retention``: per probe set, ``(engraved - control) / (prompted - control)`` with a joint-resample CI,
  flagged where the prompted effect itself is significant, and its mean over those principles;
- ``harm``: the do-no-harm rates' (degeneration, harmful-request refusal) paired deltas vs the control and
  ``worse_than_control`` per variant: the delta's CI excludes 0 in the harmful direction;
- ``over_refusal``: refusal rate per variant on the benign-but-edgy probes, deltas vs control and base in points;
- ``vicuna_length``: mean answer characters per variant and the verbose / engraved ratio.

Every bootstrap seed derives from the metric's name (``stats.salted_seed``), so adding a metric never
moves another's interval.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

from selfalign.config import Config

log = logging.getLogger(__name__)

__all__ = ["run"]

# result keys that hold bookkeeping, not {value, n, ci_low, ci_high} metrics
_NOT_METRICS = ("lmeval", "checks", "setup", "timing_s", "vicuna_answers", "probe_setup")
PROBE_SCORES = ("margin", "behaviour", "judge")
# retention: the teacher (principles in context) and the student (principles in the weights)
TEACHER, STUDENT = "prompted", "engraved"
# the second reference of every paired delta (the first is evaluate.control): the raw base model, own chat template
RAW = "base"
RETENTION_SCORES = ("margin", "behaviour")


def _flat(results: dict[str, Any], prefix: str = "") -> dict[str, dict]:
    """{dotted metric: {value, n, ci_low, ci_high}} for every CI-carrying metric in a results JSON."""
    out = {}
    for key, val in results.items():
        if isinstance(val, dict) and "value" in val and "n" in val:
            out[f"{prefix}{key}"] = val
        elif isinstance(val, dict) and key not in _NOT_METRICS:
            out.update(_flat(val, f"{prefix}{key}."))
    return out


class _Samples:
    """Per-item sample files of every variant, read once each (a missing file is an empty list)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[tuple[str, str], list[dict]] = {}

    def records(self, variant: str, file: str) -> list[dict]:
        from selfalign.evaluation.paired import load_items

        key = (variant, file)
        if key not in self._cache:
            path = self.root / variant / file
            self._cache[key] = load_items(path) if path.exists() else []
        return self._cache[key]

    def scores(self, variant: str, metric: str) -> dict:
        """(benchmark, id) -> score of ``variant`` behind results metric ``metric`` (empty if none)."""
        from selfalign.evaluation.paired import item_scores, selector

        sel = selector(metric)
        if sel is None:
            return {}
        return item_scores(self.records(variant, sel.file), sel, str(self.root / variant / sel.file))


def _significant(delta: dict | None) -> bool:
    """A paired delta whose CI excludes 0."""
    if not delta or delta.get("ci_low") is None:
        return False
    return delta["ci_low"] > 0 or delta["ci_high"] < 0


def paired_vs(reference: str, table: dict[str, dict[str, dict]], samples: _Samples, iters: int, seed: int
              ) -> dict[str, dict[str, dict]]:
    """variant -> metric -> paired delta vs ``reference``, for every results metric that has per-item scores
    (empty when the reference variant was not evaluated)."""
    from selfalign.evaluation.paired import paired_delta

    out: dict[str, dict[str, dict]] = {}
    if reference not in table:
        return out
    for variant in table:
        if variant == reference:
            continue
        for metric in sorted(table[variant]):
            a, b = samples.scores(variant, metric), samples.scores(reference, metric)
            if a and b:
                delta = paired_delta(a, b, iters, seed, metric)
                if delta["n"]:
                    out.setdefault(variant, {})[metric] = delta
    return out


def probe_block(table: dict[str, dict[str, dict]], vs_control: dict[str, dict[str, dict]],
                vs_base: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """set -> {variants: {variant: {score: estimate}}, vs_control / vs_base: {variant: {score: paired delta}}}."""
    sets = sorted({m.split(".")[1] for rows in table.values() for m in rows
                   if m.startswith("probes.") and m.count(".") == 2})
    out: dict[str, dict] = {}
    for name in sets:
        block: dict[str, dict] = {"variants": {}, "vs_control": {}, "vs_base": {}}
        for variant, rows in table.items():
            est = {s: rows[f"probes.{name}.{s}"] for s in PROBE_SCORES if f"probes.{name}.{s}" in rows}
            if est:
                block["variants"][variant] = est
            for key, deltas in (("vs_control", vs_control), ("vs_base", vs_base)):
                d = {s: deltas[variant][f"probes.{name}.{s}"] for s in PROBE_SCORES
                     if f"probes.{name}.{s}" in deltas.get(variant, {})}
                if d:
                    block[key][variant] = d
        out[name] = block
    return out


def retention_block(sets: list[str], samples: _Samples, control: str, deltas: dict[str, dict[str, dict]],
                    iters: int, seed: int) -> dict[str, Any]:
    """Per set and score: retention vs ``control`` with its CI, whether prompted - control (``deltas``) is
    significant; the mean over the principle sets where it is."""
    from selfalign.evaluation.paired import NON_PRINCIPLE_SETS, retention

    per_set: dict[str, dict] = {}
    for name in sets:
        for score in RETENTION_SCORES:
            metric = f"probes.{name}.{score}"
            reference, teacher, student = (samples.scores(v, metric) for v in (control, TEACHER, STUDENT))
            if not (reference and teacher and student):
                continue
            est = retention(reference, teacher, student, iters, seed, f"retention.{name}.{score}")
            est["significant_prompted"] = _significant(deltas.get(TEACHER, {}).get(metric))
            per_set.setdefault(name, {})[score] = est
    mean: dict[str, dict] = {}
    for score in RETENTION_SCORES:
        chosen = [s for s, block in per_set.items() if s not in NON_PRINCIPLE_SETS and score in block
                  and block[score]["significant_prompted"] and block[score]["value"] is not None]
        values = [per_set[s][score]["value"] for s in chosen]
        mean[score] = {"value": sum(values) / len(values) if values else None, "n_sets": len(chosen),
                       "sets": chosen}
    return {"teacher": TEACHER, "student": STUDENT, "control": control, "sets": per_set,
            "mean_over_significant": mean}


def _worse(delta: dict, direction: int) -> bool:
    """The paired delta's CI excludes 0 on the harmful side (``direction`` +1: above 0, -1: below)."""
    if delta.get("ci_low") is None:
        return False
    return delta["ci_low"] > 0 if direction > 0 else delta["ci_high"] < 0


def harm_block(control: str, vs_control: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Per variant: the harm rates' paired deltas vs the control and whether each is worse than the control
    (more looping replies / fewer refusals of harmful requests, CI clear of 0). The rates themselves are in
    each variant's results (``harm.<metric>``)."""
    from selfalign.evaluation.harm import HARMFUL_DIRECTION

    deltas: dict[str, dict] = {}
    worse: dict[str, dict] = {}
    for variant, rows in vs_control.items():
        for metric, direction in HARMFUL_DIRECTION.items():
            d = rows.get(f"harm.{metric}")
            if d is not None:
                deltas.setdefault(variant, {})[metric] = d
                worse.setdefault(variant, {})[metric] = _worse(d, direction)
    if not deltas:
        return {}
    return {"control": control, "delta_vs_control": deltas, "worse_than_control": worse}


def _points(d: dict) -> dict:
    """A behaviour delta (share that did *not* refuse) as a refusal delta in points: negated, x100."""
    pts = (lambda x: None if x is None else -100.0 * x)
    return {"diff": pts(d["diff"]), "n": d["n"], "ci_low": pts(d["ci_high"]), "ci_high": pts(d["ci_low"]),
            "p_value": d["p_value"]}


def over_refusal_block(table: dict[str, dict[str, dict]], vs_control: dict[str, dict[str, dict]],
                       vs_base: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Refusal rate (1 - behaviour) per variant on the over-refusal probes and its deltas vs the control and
    vs base in points (the behaviour delta negated: the same paired resamples)."""
    from selfalign.evaluation.paired import OVER_REFUSAL_SET

    metric = f"probes.{OVER_REFUSAL_SET}.behaviour"
    rates: dict[str, dict] = {}
    points: dict[str, dict[str, dict]] = {"delta_vs_control_points": {}, "delta_vs_base_points": {}}
    for variant, rows in table.items():
        if metric in rows:
            b = rows[metric]
            flip = (lambda x: None if x is None else 1.0 - x)
            rates[variant] = {"value": flip(b["value"]), "n": b["n"], "ci_low": flip(b["ci_high"]),
                              "ci_high": flip(b["ci_low"])}
        for key, deltas in (("delta_vs_control_points", vs_control), ("delta_vs_base_points", vs_base)):
            d = deltas.get(variant, {}).get(metric)
            if d is not None:
                points[key][variant] = _points(d)
    if not rates:
        return {}
    return {"set": OVER_REFUSAL_SET, "refusal_rate": rates, **points}


def _vicuna_answers(path: Path) -> dict[tuple[str, str], dict]:
    """("vicuna", id) -> {chars, cut} from a variant's vicuna_answers.jsonl (fields ``id``, ``answer``, ``finish``)."""
    from selfalign.io import DataError, iter_jsonl

    out = {}
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec.get("id"), str) or not isinstance(rec.get("answer"), str):
            raise DataError(f"{path}: line {lineno}: fields 'id' and 'answer' must be strings")
        out[("vicuna", rec["id"])] = {"chars": float(len(rec["answer"])), "cut": rec.get("finish") == "length"}
    return out


def vicuna_length_block(variants: list[str], samples_dir: Path, iters: int, seed: int) -> dict[str, Any]:
    """Mean answer characters (CI) and share cut at the token budget per variant; verbose / engraved ratio."""
    from selfalign.evaluation.paired import ratio_of_means
    from selfalign.evaluation.stats import bootstrap_ci, salted_seed

    chars: dict[str, dict] = {}
    mean, cut = {}, {}
    for variant in variants:
        path = samples_dir / variant / "vicuna_answers.jsonl"
        if not path.exists():
            continue
        answers = _vicuna_answers(path)
        chars[variant] = {k: a["chars"] for k, a in answers.items()}
        vals = [chars[variant][k] for k in sorted(chars[variant])]
        mean[variant] = bootstrap_ci(vals, iters, salted_seed(seed, "vicuna_length.mean_chars"))
        cut[variant] = sum(a["cut"] for a in answers.values()) / len(answers) if answers else None
    if not mean:
        return {}
    out: dict[str, Any] = {"mean_chars": mean, "length_cut_rate": cut}
    if "verbose" in chars and "engraved" in chars:
        out["verbose_over_engraved"] = ratio_of_means(chars["verbose"], chars["engraved"], iters, seed,
                                                      "vicuna_length.verbose_over_engraved")
    return out


def _delta_cells(d: dict | None, scale: float = 1.0) -> list:
    d = d or {}
    return [None if d.get(k) is None else d[k] * scale for k in ("diff", "ci_low", "ci_high")]


def _csv(table: dict[str, dict[str, dict]], vs_control: dict[str, dict[str, dict]],
         vs_base: dict[str, dict[str, dict]], report: dict[str, Any]) -> str:
    """Long format: one row per (metric, variant); deltas vs the control and vs base where paired."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["metric", "variant", "value", "ci_low", "ci_high", "n", "delta_vs_control",
                     "delta_vs_control_ci_low", "delta_vs_control_ci_high", "delta_vs_base", "delta_vs_base_ci_low",
                     "delta_vs_base_ci_high"])
    for metric in sorted({m for rows in table.values() for m in rows}):
        for variant, rows in table.items():
            if metric in rows:
                r = rows[metric]
                writer.writerow([metric, variant, r["value"], r["ci_low"], r["ci_high"], r["n"],
                                 *_delta_cells(vs_control.get(variant, {}).get(metric)),
                                 *_delta_cells(vs_base.get(variant, {}).get(metric))])
    for name, block in sorted(report["retention"].get("sets", {}).items()):
        for score, r in sorted(block.items()):
            writer.writerow([f"retention.{name}.{score}", STUDENT, r["value"], r["ci_low"], r["ci_high"], r["n"],
                             *_delta_cells(None), *_delta_cells(None)])
    over = report["over_refusal"]
    for variant, r in over.get("refusal_rate", {}).items():
        writer.writerow(["over_refusal.refusal_rate", variant, r["value"], r["ci_low"], r["ci_high"], r["n"],
                         *_delta_cells(over["delta_vs_control_points"].get(variant), 1 / 100),
                         *_delta_cells(over["delta_vs_base_points"].get(variant), 1 / 100)])
    vic = report["vicuna_length"]
    for variant, r in vic.get("mean_chars", {}).items():
        writer.writerow(["vicuna.mean_chars", variant, r["value"], r["ci_low"], r["ci_high"], r["n"],
                         *_delta_cells(None), *_delta_cells(None)])
    if "verbose_over_engraved" in vic:
        r = vic["verbose_over_engraved"]
        writer.writerow(["vicuna.verbose_over_engraved", "verbose", r["value"], r["ci_low"], r["ci_high"], r["n"],
                         *_delta_cells(None), *_delta_cells(None)])
    return buf.getvalue()


def _probe_heatmap(table: dict[str, dict[str, dict]], probes: dict[str, dict], control: str, path: str) -> None:
    """Variants x probe sets of mean margins; '*' marks a paired delta vs the control whose CI excludes 0."""
    from selfalign.plots import value_heatmap

    variants, sets = list(table), sorted(probes)
    values, labels = [], []
    for variant in variants:
        row_v, row_l = [], []
        for name in sets:
            est = probes[name]["variants"].get(variant, {}).get("margin")
            star = "*" if _significant(probes[name]["vs_control"].get(variant, {}).get("margin")) else ""
            row_v.append(float("nan") if est is None or est["value"] is None else est["value"])
            row_l.append("" if est is None or est["value"] is None else f"{est['value']:.2f}{star}")
        values.append(row_v)
        labels.append(row_l)
    value_heatmap(variants, sets, values, labels, path,
                  "probe preference margin: log P(follows) - log P(breaks) per token\n"
                  f"* = paired 95% CI of the delta vs {control} (the control) excludes 0",
                  "mean margin (nats/token)")


def run(config: Config, results_dir: str, samples_dir: str, csv_path: str, png_path: str,
        report_path: str, probe_png_path: str | None = None) -> dict[str, Any]:
    from selfalign.io import UserError
    from selfalign.io import atomic_write_text, write_json
    from selfalign.plots import variant_bars

    start = time.perf_counter()
    ecfg = config.evaluate
    iters, seed = ecfg.bootstrap_iters, ecfg.seed
    table: dict[str, dict[str, dict]] = {}
    for variant in ecfg.variants:
        path = Path(results_dir) / f"{variant}.json"
        if path.exists():
            table[variant] = _flat(json.loads(path.read_text(encoding="utf-8")))
        else:
            log.warning("report: no results for %s (%s)", variant, path)
    if not table:
        raise UserError(f"report: no variant results under {results_dir}")
    judge_path = Path(results_dir) / "vicuna.json"
    if judge_path.exists():
        judge = json.loads(judge_path.read_text(encoding="utf-8"))
        for pair, summary in judge.get("pairs", {}).items():
            x, y = pair.split("_vs_")
            if x in table:
                table[x][f"vicuna.win_rate_vs_{y}"] = summary["win_rate"]

    control = ecfg.control
    if control not in table:
        log.warning("report: no results for the control %s: no effect vs the control, no retention", control)
    samples = _Samples(Path(samples_dir))
    vs_control = paired_vs(control, table, samples, iters, seed)
    vs_base = paired_vs(RAW, table, samples, iters, seed)
    probes = probe_block(table, vs_control, vs_base)

    def benchmarks(deltas: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
        # benchmark deltas only: probe deltas are under "probes", harm deltas under "harm"
        return {v: {m: d for m, d in rows.items() if not m.startswith(("probes.", "harm."))}
                for v, rows in deltas.items()}

    report: dict[str, Any] = {
        "variants": list(table),
        "control": control,
        "paired_vs_control": benchmarks(vs_control),
        "paired_vs_base": benchmarks(vs_base),
        "probes": probes,
        "retention": (retention_block(sorted(probes), samples, control, vs_control, iters, seed)
                      if probes and control in table else {}),
        "harm": harm_block(control, vs_control),
        "over_refusal": over_refusal_block(table, vs_control, vs_base),
        "vicuna_length": vicuna_length_block(list(table), Path(samples_dir), iters, seed),
    }
    atomic_write_text(csv_path, _csv(table, vs_control, vs_base, report))
    headline = sorted({m for rows in table.values() for m in rows
                       if not m.startswith(("hhh_acc_norm", "probes."))})
    variant_bars({v: {m: (r[m]["value"], r[m]["ci_low"], r[m]["ci_high"]) for m in headline if m in r}
                  for v, r in table.items()}, png_path)
    if probe_png_path is not None:
        _probe_heatmap(table, probes, control, probe_png_path)
    report["wall_time_s"] = round(time.perf_counter() - start, 2)
    write_json(report_path, report)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="eval/results", help="directory with <variant>.json (+ vicuna.json)")
    parser.add_argument("--samples", default="eval/samples", help="directory with <variant>/*.jsonl")
    parser.add_argument("--csv", default="plots/eval_variants.csv", help="long-format table for dvc plots")
    parser.add_argument("--png", default="plots/eval_variants.png", help="static bar chart")
    parser.add_argument("--probe-png", default="plots/probe_margins.png",
                        help="variants x probe sets heatmap of mean margins")
    parser.add_argument("--out", default="metrics/evaluate_report.json",
                        help="the report JSON: paired deltas vs the control and vs base, probes, retention, harm, "
                             "over-refusal, Vicuna lengths")


def main(args: argparse.Namespace, config: Config) -> None:
    run(config, args.results, args.samples, args.csv, args.png, args.out, args.probe_png)
