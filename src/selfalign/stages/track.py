"""Log the pipeline state to MLflow: one run per distinct state (params, metrics, loss curves, artifacts).

The last DVC stage. It reads what the other stages left in the workspace — metrics JSON, evaluation
results, per-step loss CSVs, the rendered self-align prompt, the first lines of every generated JSONL —
and logs them as one MLflow run tagged with its lineage (git commit, ``dvc.lock`` sha256, DVC experiment
name, principle-set hash, excluded principles, model source). An input that a stage has not produced
(the stage is not in this pipeline yet) is skipped with a logged note. If a run with the same
pipeline-state id already exists (see :mod:`selfalign.tracking`), nothing is logged; the run id is
written to ``eval/mlflow_run.json`` either way.

What ``compare`` needs later is logged explicitly: each variant's per-item sample files, whole, under
``items/<variant>/`` (so any two runs can be paired item by item), and the probe / retention /
over-refusal / length / distillation numbers under short keys (:func:`curated_metrics`) instead of the
generic dotted flattening of their JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from selfalign.config import Config

log = logging.getLogger(__name__)

# files in the samples dirs that are unfinished resumable outputs, not results
_PARTIAL_SUFFIX = ".partial.jsonl"


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        log.warning("skipping %s: invalid JSON (%s)", path, exc.msg)
        return None


def _existing(paths: list[Path], what: str) -> list[Path]:
    if not paths:
        log.info("no %s found (stage not run yet?); skipped", what)
    return paths


def _glob(directory: Path, pattern: str, what: str) -> list[Path]:
    if not directory.is_dir():
        log.info("%s: not found (stage not run yet?); %s skipped", directory, what)
        return []
    return _existing(sorted(p for p in directory.glob(pattern) if p.is_file()), f"{what} in {directory}")


def _head(path: Path, n: int) -> str:
    lines = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if len(lines) >= n:
                break
            lines.append(line)
    return "".join(lines)


def _principle_set_hash(config: Config, root: Path) -> str:
    """sha256 of the active principle set, computed as step 2 records it on every record."""
    from selfalign.prompts import active_principles, load_principles, principle_set_sha256

    path = root / config.self_align.principles_file
    if not path.exists():
        log.info("%s: not found; principle_set_hash left empty", path)
        return ""
    return principle_set_sha256(active_principles(load_principles(path), config.self_align.exclude))


def _citation_counts(plots_dir: Path, self_align_metrics: dict[str, Any]) -> dict[str, float]:
    """Principle -> citation count, from plots/principle_citations.csv or the step-2 metrics."""
    import csv

    path = plots_dir / "principle_citations.csv"
    if path.exists():
        counts: dict[str, float] = {}
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                label = next((c for c in row if c and not _is_float(c)), None)
                number = next((float(c) for c in row if _is_float(c)), None)
                if label is not None and number is not None:
                    counts[label] = number
        return counts
    for key, value in self_align_metrics.items():
        if "citation" in key or "cited" in key:
            if isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
                return {str(k): float(v) for k, v in value.items()}
    return {}


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _flat(data: Any, prefix: str) -> dict[str, float]:
    from selfalign.tracking import metrics_from_json

    return metrics_from_json(data, prefix)


def _results_probes(variant: str, probes: dict[str, Any]) -> dict[str, float]:
    """``probe.<variant>.<set>.<score>`` (+ ``_ci_low`` / ``_ci_high`` / ``_n``) from a results JSON."""
    out: dict[str, float] = {}
    for name, scores in probes.items():
        out.update(_flat(scores, f"probe.{variant}.{name}"))
    return out


def _report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Short keys for metrics/evaluate_report.json's probe deltas, retention, over-refusal and lengths."""
    out: dict[str, float] = {}
    for name, block in report.get("probes", {}).items():
        for variant, scores in block.get("vs_base", {}).items():
            out.update(_flat(scores, f"probe_delta.{variant}.{name}"))
    retention = report.get("retention", {})
    for name, scores in retention.get("sets", {}).items():
        out.update(_flat(scores, f"retention.{name}"))
    for score, mean in retention.get("mean_over_significant", {}).items():
        out.update(_flat({"value": mean.get("value"), "n_sets": mean.get("n_sets")},
                         f"retention.mean_significant.{score}"))
    over = report.get("over_refusal", {})
    for variant, rate in over.get("refusal_rate", {}).items():
        out.update(_flat(rate, f"over_refusal.{variant}.refusal_rate"))
    for variant, delta in over.get("delta_vs_base_points", {}).items():
        out.update(_flat(delta, f"over_refusal.{variant}.delta_points"))
    lengths = report.get("vicuna_length", {})
    for variant, est in lengths.get("mean_chars", {}).items():
        out.update(_flat(est, f"vicuna_length.{variant}.mean_chars"))
    for variant, rate in lengths.get("length_cut_rate", {}).items():
        out.update(_flat(rate, f"vicuna_length.{variant}.cut_rate"))
    if "verbose_over_engraved" in lengths:
        out.update(_flat(lengths["verbose_over_engraved"], "vicuna_length.verbose_over_engraved"))
    return out


# JSON blocks given short keys by curated_metrics, left out of the generic flattening (no duplicates)
_CURATED_BLOCKS = {
    "evaluate_report": ("probes", "retention", "over_refusal", "vicuna_length"),
    "engrave": ("distillation",),
    "verbose_clone": ("distillation",),
}


def curated_metrics(kind: str, name: str, data: Any) -> tuple[Any, dict[str, float]]:
    """(the JSON minus its curated blocks, their metrics under short keys) for one file ``track`` reads.

    ``kind`` is "stage" (``metrics/<name>.json``) or "results" (``eval/results/<name>.json``). Keys:
    ``probe.<variant>.<set>.<score>`` (margin / behaviour / judge, with CIs), ``probe_delta.<variant>.<set>.
    <score>`` (paired vs base), ``retention.<set>.<score>``, ``retention.mean_significant.<score>``,
    ``over_refusal.<variant>.refusal_rate`` / ``.delta_points``, ``vicuna_length.<variant>.mean_chars``,
    ``vicuna_length.verbose_over_engraved`` and ``distill.<stage>.{nll_reference,nll_student,delta}``.
    """
    if not isinstance(data, dict):
        return data, {}
    if kind == "results":
        rest = {k: v for k, v in data.items() if k != "probes"}
        return rest, _results_probes(name, data.get("probes") or {})
    blocks = _CURATED_BLOCKS.get(name, ())
    rest = {k: v for k, v in data.items() if k not in blocks}
    if name == "evaluate_report":
        return rest, _report_metrics(data)
    if "distillation" in blocks and isinstance(data.get("distillation"), dict):
        return rest, _flat(data["distillation"], f"distill.{name}")
    return rest, {}


def _item_files(items_dir: Path) -> dict[str, list[Path]]:
    """``items/<variant>`` -> that variant's per-item sample files (finished ones only)."""
    out: dict[str, list[Path]] = {}
    if not items_dir.is_dir():
        log.info("%s: not found (evaluate not run yet?); per-item artifacts skipped", items_dir)
        return out
    for variant_dir in sorted(p for p in items_dir.iterdir() if p.is_dir()):
        files = sorted(p for p in variant_dir.glob("*.jsonl") if not p.name.endswith(_PARTIAL_SUFFIX))
        if files:
            out[f"items/{variant_dir.name}"] = files
    return out


def _variant_table(config: Config, metrics: dict[str, float], variants: list[str]) -> dict[str, dict]:
    """variant -> column label -> (value, ci_low, ci_high) for the compare columns that name a variant."""
    table: dict[str, dict] = {}
    for variant in variants:
        row = {}
        for label, pattern in config.tracking.compare.columns.items():
            if "{variant}" not in pattern or "{principle}" in pattern or "{others}" in pattern:
                continue  # per-ablation columns exist only in compare
            key = pattern.replace("{variant}", variant)
            if key in metrics:
                row[label] = (metrics[key], metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high"))
        if row:
            table[variant] = row
    return table


def _eval_summary_csv(metrics: dict[str, float], variants: list[str]) -> str:
    """One row per evaluation metric, one column per variant (value [ci_low, ci_high])."""
    rows: dict[str, dict[str, str]] = {}
    for variant in variants:
        prefix = f"eval.{variant}."
        for key, value in metrics.items():
            if not key.startswith(prefix) or key.endswith(("_ci_low", "_ci_high")):
                continue
            lo, hi = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
            cell = f"{value:.4g}" + (f" [{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else "")
            rows.setdefault(key[len(prefix):], {})[variant] = cell
    lines = ["metric," + ",".join(variants)]
    for name in sorted(rows):
        lines.append(",".join([name] + [f'"{rows[name].get(v, "")}"' for v in variants]))
    return "\n".join(lines) + "\n"


def run(config: Config, *, root: str | Path, metrics_dir: str, results_dir: str, plots_dir: str,
        prompt_path: str, sample_dirs: list[str], lock_path: str, params_path: str,
        out_path: str, stage_name: str = "track", items_dir: str | None = None) -> dict[str, Any]:
    """Gather the workspace's results and log them as one MLflow run (or find the existing one)."""
    import yaml

    from selfalign import plots, tracking
    from selfalign.io import sha256_file, write_json

    start = time.perf_counter()
    root = Path(root).resolve()
    if not config.tracking.enabled:
        log.info("tracking.enabled is false; no MLflow run")
        write_json(out_path, {"enabled": False})
        return {"enabled": False}

    metrics_dir_p, results_dir_p, plots_dir_p = root / metrics_dir, root / results_dir, root / plots_dir
    read: list[Path] = []
    metrics: dict[str, float] = {}
    stage_metrics: dict[str, dict[str, Any]] = {}
    for path in _glob(metrics_dir_p, "*.json", "stage metrics"):
        data = _read_json(path)
        if data is not None:
            read.append(path)
            stage_metrics[path.stem] = data if isinstance(data, dict) else {}
            rest, curated = curated_metrics("stage", path.stem, data)
            metrics.update(tracking.metrics_from_json(rest, path.stem))
            metrics.update(curated)
    variants: list[str] = []
    for path in _glob(results_dir_p, "*.json", "evaluation results"):
        data = _read_json(path)
        if data is not None:
            read.append(path)
            variants.append(path.stem)
            rest, curated = curated_metrics("results", path.stem, data)
            metrics.update(tracking.metrics_from_json(rest, f"eval.{path.stem}"))
            metrics.update(curated)
    order = list(config.evaluate.variants)  # tables and plots in the configured order
    variants.sort(key=lambda v: (order.index(v) if v in order else len(order), v))
    histories: dict[str, list[tuple[int, float]]] = {}
    for path in _glob(plots_dir_p, "*_loss.csv", "loss curves"):
        read.append(path)
        stage = path.stem.removesuffix("_loss")
        for col, points in tracking.read_loss_history(path).items():
            histories[f"train.{stage}.{col}"] = points

    # logged params: the resolved config (defaults included); the identity uses the params *file*, so
    # that a new default added to config.py does not turn an unchanged pipeline into a "new state"
    params = tracking.flatten_params(json.loads(config.model_dump_json()))
    raw_params = tracking.flatten_params(yaml.safe_load((root / params_path).read_text(encoding="utf-8")))
    upstream = tracking.upstream_lock_entries(root / lock_path, stage_name)
    if not upstream:
        log.info("%s: no upstream stage entries (not run through dvc repro?)", lock_path)
    item_files = _item_files(root / items_dir) if items_dir is not None else {}
    read.extend(p for paths in item_files.values() for p in paths)
    prompt = root / prompt_path
    if prompt.exists():
        read.append(prompt)
    else:
        log.info("%s: not found (self_align not run yet?); prompt artifact skipped", prompt_path)
    state_id = tracking.pipeline_state_id(upstream, raw_params, tracking.file_hashes(read, root))

    commit, dirty = tracking.git_info(root)
    excluded = list(config.self_align.exclude)
    lock_file = root / lock_path
    tags = {
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "dvc_lock_sha256": sha256_file(lock_file) if lock_file.exists() else "",
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "principle_set_hash": _principle_set_hash(config, root),
        "excluded_principles": ",".join(sorted(excluded)),
        "ablation": tracking.ablation_label(excluded),
        "model_source": config.model.source + (f"#{config.model.gguf_file}" if config.model.gguf_file else ""),
    }
    run_name = tags["dvc_exp_name"] or tags["ablation"]
    uri = tracking.resolve_tracking_uri(root)

    existing = tracking.find_run(uri, config.tracking.experiment_name, tracking.STATE_TAG, state_id)
    if existing is not None:
        log.info("state %s already logged (run %s); no new run", state_id[:12], existing)
        run_id, created = existing, False
        exp_id = tracking.experiment_id(uri, config.tracking.experiment_name)
    else:
        inputs = tracking.TrackInputs(
            experiment_name=config.tracking.experiment_name, params=params,
            resolved_config=json.loads(config.model_dump_json()), metrics=metrics, histories=histories,
            tags=tags, state_id=state_id, run_name=run_name,
        )
        inputs.artifacts["metrics"] = [p for p in read if p.parent == metrics_dir_p]
        inputs.artifacts["eval/results"] = [p for p in read if p.parent == results_dir_p]
        inputs.artifacts["config"] = [p for p in (root / params_path, lock_file) if p.exists()]
        if prompt.exists():
            inputs.artifacts["prompts"] = [prompt]
        # whole files, not heads: compare pairs two runs item by item from these
        inputs.artifacts.update(item_files)
        heatmap = plots_dir_p / "probe_margins.png"  # drawn by evaluate_report
        if heatmap.exists():
            inputs.artifacts["plots"] = [heatmap]
        if variants:
            inputs.texts["eval/summary.csv"] = _eval_summary_csv(metrics, variants)
        n = config.tracking.sample_lines
        for sample_dir in sample_dirs if n else []:
            for path in _glob(root / sample_dir, "**/*.jsonl", "sample generations"):
                if not path.name.endswith(_PARTIAL_SUFFIX):
                    inputs.texts[f"samples/{path.relative_to(root)}"] = _head(path, n)
        with tracking.scratch_dir() as scratch:
            scratch_p = Path(scratch)
            if histories:
                plots.loss_curves({k: v for k, v in histories.items() if k.endswith(".loss")} or histories,
                                  scratch_p / "loss_curves.png")
            table = _variant_table(config, metrics, variants)
            if table:
                plots.variant_bars(table, scratch_p / "variants.png")
            counts = _citation_counts(plots_dir_p, stage_metrics.get("self_align", {}))
            if counts:
                plots.bar_counts(counts, scratch_p / "principle_citations.png", "principle citations")
            run_id, exp_id, created = tracking.log_pipeline_run(uri, inputs, plots_dir=scratch_p)

    result = {"run_id": run_id, "experiment_id": exp_id, "experiment_name": config.tracking.experiment_name,
              "tracking_uri": uri, "pipeline_state": state_id}
    write_json(out_path, result)
    wall = round(time.perf_counter() - start, 2)
    log.info("track: %s run %s in %.1fs (%d metrics, %d loss series)",
             "logged" if created else "reused", run_id, wall, len(metrics), len(histories))
    return {**result, "created": created, "n_metrics": len(metrics), "wall_time_s": wall}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=".", help="project root (paths below are relative to it)")
    parser.add_argument("--metrics-dir", default="metrics", help="stage metrics JSON directory")
    parser.add_argument("--results-dir", default="eval/results", help="evaluation results directory")
    parser.add_argument("--plots-dir", default="plots", help="plot CSV directory (*_loss.csv)")
    parser.add_argument("--prompt", default="data/self_align/prompt.txt", help="rendered self-align prompt")
    parser.add_argument("--samples", nargs="*", default=["data/prompts", "data/self_align", "data/verbose",
                                                         "eval/samples"],
                        help="directories whose JSONL files are sampled as artifacts")
    parser.add_argument("--items", default="eval/samples",
                        help="per-item sample files <items>/<variant>/*.jsonl, logged whole as items/<variant>/")
    parser.add_argument("--lock", default="dvc.lock", help="the pipeline's dvc.lock")
    parser.add_argument("--stage-name", default="track", help="this stage's name in dvc.lock (excluded)")
    parser.add_argument("--out", default="eval/mlflow_run.json", help="where the run id is written")


def main(args: argparse.Namespace, config: Config) -> None:
    run(config, root=args.root, metrics_dir=args.metrics_dir, results_dir=args.results_dir,
        plots_dir=args.plots_dir, prompt_path=args.prompt, sample_dirs=args.samples, lock_path=args.lock,
        params_path=args.params, out_path=args.out, stage_name=args.stage_name, items_dir=args.items)
