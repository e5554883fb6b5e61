"""Side-by-side table and plot of all evaluated variants, with paired-bootstrap deltas against base.

Reads ``eval/results/<variant>.json`` (value + CI per metric), the per-item samples of each variant
(for *paired* comparisons: the same items, so shared item difficulty cancels) and, when present, the
judge's ``eval/results/vicuna.json``. Writes a long-format CSV for ``dvc plots``, a PNG (``dvc plots
show`` needs a CDN offline), and ``comparisons.json`` with every paired delta vs ``base``.
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

# per-item sample file (written by evaluate) -> metric name in the table, for paired deltas
_PAIRED = (
    ("truthfulqa_mc1.jsonl", "truthfulqa_mc1"),
    ("truthfulqa_mc2.jsonl", "truthfulqa_mc2"),
    ("hhh.jsonl", "hhh.overall"),
    ("paper_truthfulqa_tf_mc1.jsonl", "paper.truthfulqa_tf_mc1"),
    ("paper_hhh_ab.jsonl", "paper.hhh_ab.overall"),
)


def _flat(results: dict[str, Any], prefix: str = "") -> dict[str, dict]:
    """{dotted metric: {value, n, ci_low, ci_high}} for every CI-carrying metric in a results JSON."""
    out = {}
    for key, val in results.items():
        if isinstance(val, dict) and "value" in val and "n" in val:
            out[f"{prefix}{key}"] = val
        elif isinstance(val, dict) and key not in ("lmeval", "checks", "setup", "timing_s", "vicuna_answers"):
            out.update(_flat(val, f"{prefix}{key}."))
    return out


def _item_values(samples_dir: Path, file: str, metric: str) -> dict[str, float]:
    from selfalign.io import read_jsonl

    path = samples_dir / file
    if not path.exists():
        return {}
    key = "mc2" if metric == "truthfulqa_mc2" else "credit"
    return {r["id"]: float(r["scores"][key]) for r in read_jsonl(path)}


def run(config: Config, results_dir: str, samples_dir: str, csv_path: str, png_path: str,
        comparisons_path: str) -> dict[str, Any]:
    from selfalign.cli import UserError
    from selfalign.evaluation.stats import paired_bootstrap
    from selfalign.io import atomic_write_text, write_json
    from selfalign.plots import variant_bars

    start = time.perf_counter()
    ecfg = config.evaluate
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

    comparisons: dict[str, Any] = {}
    if "base" in table:
        for variant in table:
            if variant == "base":
                continue
            for salt, (file, metric) in enumerate(_PAIRED):
                a = _item_values(Path(samples_dir) / variant, file, metric)
                b = _item_values(Path(samples_dir) / "base", file, metric)
                common = [i for i in a if i in b]
                if not common:
                    continue
                comparisons.setdefault(variant, {})[metric] = paired_bootstrap(
                    [a[i] for i in common], [b[i] for i in common], ecfg.bootstrap_iters, ecfg.seed + salt)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["metric", "variant", "value", "ci_low", "ci_high", "n", "delta_vs_base", "delta_ci_low",
                     "delta_ci_high"])
    metrics = sorted({m for rows in table.values() for m in rows})
    for metric in metrics:
        for variant, rows in table.items():
            if metric not in rows:
                continue
            r = rows[metric]
            d = comparisons.get(variant, {}).get(metric, {})
            writer.writerow([metric, variant, r["value"], r["ci_low"], r["ci_high"], r["n"], d.get("diff"),
                             d.get("ci_low"), d.get("ci_high")])
    atomic_write_text(csv_path, buf.getvalue())
    headline = [m for m in metrics if not m.startswith("hhh_acc_norm")]
    variant_bars({v: {m: (r[m]["value"], r[m]["ci_low"], r[m]["ci_high"]) for m in headline if m in r}
                  for v, r in table.items()}, png_path)
    out = {"variants": list(table), "paired_vs_base": comparisons,
           "wall_time_s": round(time.perf_counter() - start, 2)}
    write_json(comparisons_path, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="eval/results", help="directory with <variant>.json (+ vicuna.json)")
    parser.add_argument("--samples", default="eval/samples", help="directory with <variant>/*.jsonl")
    parser.add_argument("--csv", default="plots/eval_variants.csv", help="long-format table for dvc plots")
    parser.add_argument("--png", default="plots/eval_variants.png", help="static bar chart")
    parser.add_argument("--out", default="metrics/evaluate_report.json", help="paired comparisons JSON")


def main(args: argparse.Namespace, config: Config) -> None:
    run(config, args.results, args.samples, args.csv, args.png, args.out)
