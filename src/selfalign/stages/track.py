"""Log the pipeline state to MLflow: one run per distinct state (params, metrics, loss curves, artifacts).

The last DVC stage. It reads what the other stages left in the workspace — metrics JSON, evaluation
results, per-step loss CSVs, the rendered self-align prompt, the first lines of every generated JSONL —
and logs them as one MLflow run tagged with its lineage (git commit, ``dvc.lock`` sha256, DVC experiment
name, principle-set hash, excluded principles, model source). An input that a stage has not produced
(the stage is not in this pipeline yet) is skipped with a logged note. If a run with the same
pipeline-state id already exists (see :mod:`selfalign.lineage`: outputs, params and headline metric
values, never wall times), nothing is logged; the run id is written to ``eval/mlflow_run.json`` either
way, with the store's URI relative to the repository when the store lies inside it (the file is committed:
it must not differ per checkout location). So ``dvc repro -f``, whose reruns differ only in timings, lands
on the run already logged.

What each metrics file holds is declared in :mod:`selfalign.metrics_schema`. The headline set (the values DVC
shows, written to the ``--headline`` file) and their 95% bounds are the run's MLflow metrics, and only they;
every metric (under the short names ``compare`` reads: ``probe.<variant>.<set>.<score>``,
``distill.<stage>.delta`` ...) is in the ``metrics.json`` / ``metrics_table.json`` artifacts, the rest in
``bookkeeping.json``, the loss curves in ``train/<stage>_loss.csv`` and ``plots/loss_curves.png``.

The run is named by what it is (``full``, ``exclude:<principles>``, or the DVC experiment's name such as
``seed-1``) and described (``mlflow.note.content``): what it changes against the committed params, and the
headline values that moved most against the latest ``full`` run. Also logged: each variant's per-item sample files,
whole, under ``items/<variant>/`` (so ``compare`` can pair any two runs item by item), the step datasets
as MLflow dataset inputs named by their DVC md5, and the LoRA adapters under ``adapters/<name>/``
(``PeftModel.from_pretrained`` loads a downloaded copy).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from selfalign.config import Config
from selfalign.metrics_schema import Classified

if TYPE_CHECKING:
    from selfalign.lineage import DatasetRef
    from selfalign.tracking import TrackInputs

log = logging.getLogger(__name__)

# files in the samples dirs that are unfinished resumable outputs, not results
_PARTIAL_SUFFIX = ".partial.jsonl"


def _read_json(path: Path, where: str) -> Any:
    """A metrics file's content. Invalid JSON is an error, not a skip: stages write these files atomically,
    so a broken one is a corrupt input, and skipping it would log a run that silently lacks its metrics."""
    from selfalign.io import DataError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: line {exc.lineno}: invalid JSON: {exc.msg}") from None


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
    from selfalign.prompts.annotation import load_principles
    from selfalign.prompts.self_align import active_principles, principle_set_sha256

    path = root / config.self_align.principles_file
    if not path.exists():
        log.info("%s: not found; principle_set_hash left empty", path)
        return ""
    return principle_set_sha256(active_principles(load_principles(path), config.self_align.exclude))


@dataclass
class _Workspace:
    """What the other stages left in the workspace, as ``track`` logs it."""

    values: Classified = field(default_factory=Classified)
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    variants: list[str] = field(default_factory=list)
    # every file read (logged as artifacts); the metrics files among them enter the pipeline state only
    # through their headline values, the others (data) by content
    read: list[Path] = field(default_factory=list)
    metric_files: list[Path] = field(default_factory=list)
    item_files: dict[str, list[Path]] = field(default_factory=dict)
    prompt: Path | None = None


def _read_metrics(ws: _Workspace, directory: Path, kind: str, root: Path) -> list[str]:
    """Classify every ``*.json`` in ``directory`` by its declared schema; returns the stems read."""
    from selfalign.metrics_schema import classify

    stems = []
    for path in _glob(directory, "*.json", "stage metrics" if kind == "stage" else "evaluation results"):
        where = str(path.relative_to(root))
        data = _read_json(path, where)
        ws.read.append(path)
        ws.metric_files.append(path)
        ws.values.update(classify(kind, path.stem, data, where))
        stems.append(path.stem)
    return stems


def _gather(config: Config, root: Path, metrics_dir: Path, results_dir: Path, plots_dir: Path,
            prompt_path: str, items_dir: str | None) -> _Workspace:
    """Metrics and results (classified), loss series, per-item files and the prompt, in a fixed order
    (tables, plots and artifacts follow it)."""
    from selfalign.metrics_schema import read_loss_series

    ws = _Workspace()
    _read_metrics(ws, metrics_dir, "stage", root)
    order = list(config.evaluate.variants)  # tables and plots in the configured order
    ws.variants = sorted(_read_metrics(ws, results_dir, "results", root),
                         key=lambda v: (order.index(v) if v in order else len(order), v))
    for path in _glob(plots_dir, "*_loss.csv", "loss curves"):
        ws.read.append(path)
        stage = path.stem.removesuffix("_loss")
        for col, points in read_loss_series(path).items():
            ws.histories[f"train.{stage}.{col}"] = points
    ws.item_files = _item_files(root / items_dir) if items_dir is not None else {}
    ws.read.extend(p for paths in ws.item_files.values() for p in paths)
    prompt = root / prompt_path
    if prompt.exists():
        ws.read.append(prompt)
        ws.prompt = prompt
    else:
        log.info("%s: not found (self_align not run yet?); prompt artifact skipped", prompt_path)
    return ws


def _state_id(root: Path, ws: _Workspace, upstream: dict[str, Any], params_path: str) -> str:
    """The pipeline-state id (:mod:`selfalign.lineage`): upstream outputs, data files read, params and the
    headline metric values. A metrics file enters only through the values metrics_schema declares
    headline (``ws.values.metrics``), so neither its bytes nor its ``dvc.lock`` hash (wall times) count.
    It hashes the params *file*, not the resolved config, so that a new default added to config.py does
    not turn an unchanged pipeline into a "new state"."""
    from selfalign import lineage, tracking
    from selfalign.io import load_yaml

    raw_params = tracking.flatten_params(load_yaml(root / params_path))
    metric_paths = {p.relative_to(root).as_posix() for p in ws.metric_files}
    data_files = [p for p in ws.read if p not in ws.metric_files]
    return lineage.pipeline_state_id(outputs=lineage.output_hashes(upstream, exclude=metric_paths),
                                     files=lineage.file_hashes(data_files, root), params=raw_params,
                                     metrics=ws.values.metrics)


def _lineage_tags(config: Config, root: Path, lock_file: Path) -> dict[str, str]:
    """Where the run comes from: git, dvc.lock, the DVC experiment, the principle set, the model."""
    from selfalign import lineage
    from selfalign.io import sha256_file

    commit, dirty = lineage.git_info(root)
    excluded = list(config.self_align.exclude)
    return {
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "dvc_lock_sha256": sha256_file(lock_file) if lock_file.exists() else "",
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "principle_set_hash": _principle_set_hash(config, root),
        "excluded_principles": ",".join(sorted(excluded)),
        "ablation": lineage.ablation_label(excluded),
        "model_source": config.model.source + (f"#{config.model.gguf_file}" if config.model.gguf_file else ""),
    }


def run_name(excluded: Sequence[str], dvc_exp_name: str) -> str:
    """What the run is: ``exclude:<a>,<b>`` for an ablation, else the DVC experiment's name (``seed-1`` for a
    seed replicate, whatever ``dvc exp run -n`` said), else ``full``."""
    from selfalign import lineage

    return lineage.ablation_label(excluded) if excluded else (dvc_exp_name or lineage.ablation_label(()))


def _committed_params(root: Path, params_path: str) -> dict[str, str] | None:
    """The params file as committed at the run's baseline (``$DVC_EXP_BASELINE_REV`` inside a DVC experiment,
    else ``HEAD``), flattened; None outside git or when it is not committed there."""
    import subprocess

    import yaml

    from selfalign import tracking

    rev = os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"
    path = (root / params_path).resolve()
    if not path.is_relative_to(root):
        return None
    rel = path.relative_to(root).as_posix()
    try:
        text = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=root, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return tracking.flatten_params(yaml.safe_load(text) or {})


def describe_run(name: str, changed: dict[str, tuple[str | None, str | None]] | None,
                 reference: tuple[str, dict[str, float]] | None, headline: dict[str, float], top: int = 8) -> str:
    """The run's description (markdown): what it is, the params it changes against the committed ones, and
    the ``top`` headline values that moved most against the ``reference`` run (name, its headline metrics)."""
    lines = [f"**{name}**: " + ("the full principle set" if name == "full" else
                                f"principles left out: {name.removeprefix('exclude:')}" if name.startswith("exclude:")
                                else "a variant of the pipeline (DVC experiment)")]
    if changed is None:
        lines.append("\nParams vs committed: unknown (no git history here).")
    elif not changed:
        lines.append("\nParams: the committed params.yaml, unchanged.")
    else:
        lines.append("\nParams changed vs committed:")
        lines += [f"- `{k}`: {old} → {new}" for k, (old, new) in sorted(changed.items())]
    if reference is not None:
        ref_name, ref = reference
        deltas = {k: v - ref[k] for k, v in headline.items() if k in ref}
        moved = sorted(deltas, key=lambda k: -abs(deltas[k]))[:top]
        if moved:
            lines.append(f"\nLargest headline changes vs run `{ref_name}` (point values; `selfalign compare` "
                         "judges them with paired intervals and seed spread):")
            lines += [f"- `{k}`: {ref[k]:.4g} → {headline[k]:.4g} ({deltas[k]:+.4g})" for k in moved]
    return "\n".join(lines)


def _description(root: Path, params_path: str, name: str, uri: str, experiment: str,
                 headline: dict[str, float]) -> str:
    from selfalign import tracking
    from selfalign.io import load_yaml

    committed = _committed_params(root, params_path)
    changed = None
    if committed is not None:
        now = tracking.flatten_params(load_yaml(root / params_path))
        changed = {k: (committed.get(k), now.get(k)) for k in sorted({*committed, *now})
                   if committed.get(k) != now.get(k)}
    ref = tracking.latest_run_named(uri, experiment, "full") if name != "full" else None
    return describe_run(name, changed, (ref.name, ref.metrics) if ref else None, headline)


def _datasets(upstream: dict[str, Any], paths: Sequence[str]) -> list[DatasetRef]:
    """The step datasets with the md5 ``dvc.lock`` recorded for them (skipped, with a note, if none)."""
    from selfalign import lineage

    found = []
    for path in paths:
        ref = lineage.dvc_dataset(upstream, path)
        if ref is None:
            log.info("%s: no dvc.lock entry (not made by dvc repro?); dataset input skipped", path)
        else:
            found.append(ref)
    return found


def _adapter_dirs(root: Path, adapters: Sequence[str]) -> dict[str, Path]:
    """``adapters/<name>`` -> each PEFT adapter directory present (one with ``adapter_config.json``)."""
    out = {}
    for adapter in adapters:
        path = root / adapter
        if (path / "adapter_config.json").is_file():
            out[f"adapters/{path.name}"] = path
        else:
            log.info("%s: no adapter (stage not run yet?); adapter artifact skipped", adapter)
    return out


def _artifacts(inputs: TrackInputs, ws: _Workspace, root: Path, dirs: dict[str, Path], config_files: list[Path],
               sample_dirs: Sequence[str], sample_lines: int) -> None:
    """The files a run carries: metrics and results, config, prompt, per-item files, heatmap, samples."""
    inputs.artifacts["metrics"] = [p for p in ws.read if p.parent == dirs["metrics"]]
    inputs.artifacts["eval/results"] = [p for p in ws.read if p.parent == dirs["results"]]
    inputs.artifacts["config"] = [p for p in config_files if p.exists()]
    if ws.prompt is not None:
        inputs.artifacts["prompts"] = [ws.prompt]
    # whole files, not heads: compare pairs two runs item by item from these
    inputs.artifacts.update(ws.item_files)
    losses = [p for p in ws.read if p.parent == dirs["plots"] and p.name.endswith("_loss.csv")]
    if losses:
        inputs.artifacts["train"] = losses
    heatmap = dirs["plots"] / "probe_margins.png"  # drawn by evaluate_report
    if heatmap.exists():
        inputs.artifacts["plots"] = [heatmap]
    if ws.variants:
        inputs.texts["eval/summary.csv"] = _eval_summary_csv(ws.values.metrics, ws.variants)
    for sample_dir in sample_dirs if sample_lines else []:
        for path in _glob(root / sample_dir, "**/*.jsonl", "sample generations"):
            if not path.name.endswith(_PARTIAL_SUFFIX):
                inputs.texts[f"samples/{path.relative_to(root)}"] = _head(path, sample_lines)


def _draw_plots(config: Config, ws: _Workspace, scratch: Path) -> None:
    """Loss curves, variant bars and principle citations as PNGs in ``scratch`` (logged under plots/)."""
    from selfalign import plots

    if ws.histories:
        plots.loss_curves({k: v for k, v in ws.histories.items() if k.endswith(".loss")} or ws.histories,
                          scratch / "loss_curves.png")
    table = _variant_table(config, ws.values.metrics, ws.variants)
    if table:
        plots.variant_bars(table, scratch / "variants.png")
    # per-principle citation counts of step 2 (metrics_schema: self_align "citations", bookkeeping)
    counts = ws.values.bookkeeping.get("self_align.citations") or {}
    if counts:
        plots.bar_counts(counts, scratch / "principle_citations.png", "principle citations")


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
            key = pattern.replace("{variant}", variant).replace("{control}", config.evaluate.control)
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
        out_path: str, stage_name: str = "track", items_dir: str | None = None,
        headline_path: str | None = None, adapter_dirs: Sequence[str] = (),
        dataset_paths: Sequence[str] = ()) -> dict[str, Any]:
    """Gather the workspace's results and log them as one MLflow run (or find the existing one)."""
    from selfalign import lineage, tracking
    from selfalign.io import write_json
    from selfalign.metrics_schema import headline

    start = time.perf_counter()
    root = Path(root).resolve()
    dirs = {"metrics": root / metrics_dir, "results": root / results_dir, "plots": root / plots_dir}
    ws = _gather(config, root, dirs["metrics"], dirs["results"], dirs["plots"], prompt_path, items_dir)
    heads = headline(ws.values.metrics)
    if headline_path is not None:
        write_json(root / headline_path, heads)
    if not config.tracking.enabled:
        log.info("tracking.enabled is false; no MLflow run")
        write_json(out_path, {"enabled": False})
        return {"enabled": False}

    upstream = lineage.upstream_lock_entries(root / lock_path, stage_name)
    if not upstream:
        log.info("%s: no upstream stage entries (not run through dvc repro?)", lock_path)
    state_id = _state_id(root, ws, upstream, params_path)
    tags = _lineage_tags(config, root, root / lock_path)
    uri = tracking.resolve_tracking_uri(root)
    existing = tracking.find_run(uri, config.tracking.experiment_name, tracking.STATE_TAG, state_id)
    if existing is not None:
        log.info("state %s already logged (run %s); no new run", state_id[:12], existing)
        run_id, created = existing, False
        exp_id = tracking.open_experiment(uri, config.tracking.experiment_name)
    else:
        resolved = json.loads(config.model_dump_json())
        name = run_name(config.self_align.exclude, tags["dvc_exp_name"])
        inputs = tracking.TrackInputs(
            experiment_name=config.tracking.experiment_name, params=tracking.flatten_params(resolved),
            resolved_config=resolved, metrics=ws.values.metrics, headline=list(heads), tags=tags,
            state_id=state_id, run_name=name,
            description=_description(root, params_path, name, uri, config.tracking.experiment_name, heads),
            bookkeeping=ws.values.bookkeeping, datasets=_datasets(upstream, dataset_paths),
            artifact_dirs=_adapter_dirs(root, adapter_dirs))
        _artifacts(inputs, ws, root, dirs, [root / params_path, root / lock_path], sample_dirs,
                   config.tracking.sample_lines)
        with tracking.scratch_dir() as scratch:
            _draw_plots(config, ws, Path(scratch))
            run_id, exp_id, created = tracking.log_pipeline_run(uri, inputs, plots_dir=Path(scratch))

    # the store relative to the repository when it lies inside it: a committed output names no machine path
    result = {"run_id": run_id, "experiment_id": exp_id, "experiment_name": config.tracking.experiment_name,
              "tracking_uri": tracking.recorded_tracking_uri(uri, root), "pipeline_state": state_id}
    write_json(out_path, result)
    wall = round(time.perf_counter() - start, 2)
    n_metrics = len(ws.values.metrics)
    log.info("track: %s run %s in %s in %.1fs (%d metrics, %d headline; %d loss series)",
             "logged" if created else "reused", run_id, uri, wall, n_metrics, len(heads), len(ws.histories))
    return {**result, "created": created, "n_metrics": n_metrics, "wall_time_s": wall}


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
    parser.add_argument("--headline", default=None,
                        help="JSON of the headline metrics DVC shows (metrics_schema.DVC_HEADLINE)")
    parser.add_argument("--adapters", nargs="*", default=[],
                        help="LoRA adapter directories logged whole as adapters/<name>/")
    parser.add_argument("--datasets", nargs="*", default=[],
                        help="step data files logged as MLflow dataset inputs (digest = their dvc.lock md5)")
    parser.add_argument("--stage-name", default="track", help="this stage's name in dvc.lock (excluded)")
    parser.add_argument("--out", default="eval/mlflow_run.json", help="where the run id is written")


def main(args: argparse.Namespace, config: Config) -> None:
    run(config, root=args.root, metrics_dir=args.metrics_dir, results_dir=args.results_dir,
        plots_dir=args.plots_dir, prompt_path=args.prompt, sample_dirs=args.samples, lock_path=args.lock,
        params_path=args.params, out_path=args.out, stage_name=args.stage_name, items_dir=args.items,
        headline_path=args.headline, adapter_dirs=args.adapters, dataset_paths=args.datasets)
