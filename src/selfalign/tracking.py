"""MLflow side channel: one run per distinct pipeline state, and the queries ``compare`` needs.

DVC decides what runs and caches the outputs; MLflow only records the history for browsing and
comparison (DESIGN.md, "Tracking and experiments"). All MLflow calls of the project live in this module
so that the rest of the code never depends on MLflow's API.

Why a *pipeline-state id* and not one run per invocation: ``dvc repro`` with nothing changed must not add
a run, and a queued DVC experiment that lands on a state already logged (the same ablation twice) must
not duplicate it. The id is the sha256 of the upstream stages' ``dvc.lock`` entries (commands, deps,
params and output hashes of every stage *except* ``track`` itself), the resolved params and the content
of the files ``track`` reads. It deliberately leaves out the git commit: a commit that only touches the
README is the same pipeline state. ``dvc.lock`` itself cannot be a dependency of the ``track`` stage (it
is the pipeline's own lock file), so it is read at run time; DVC has already written the upstream
entries when the last stage starts.

Why an absolute tracking URI: queued DVC experiments run in a temporary copy of the repository
(``.dvc/tmp/exps/...``); a relative ``sqlite:///mlflow.db`` there silently creates a throw-away store.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from selfalign.io import sha256_file, sha256_text

log = logging.getLogger(__name__)

__all__ = [
    "PIPELINE_KIND",
    "SUPERSEDED_TAG",
    "COMPARE_KIND",
    "RunRecord",
    "TrackInputs",
    "ablation_label",
    "download_artifact",
    "experiment_id",
    "find_run",
    "flatten_params",
    "git_info",
    "load_runs",
    "log_comparison",
    "log_pipeline_run",
    "metrics_from_json",
    "pipeline_state_id",
    "read_loss_history",
    "resolve_tracking_uri",
    "upstream_lock_entries",
]

# tag values that tell pipeline runs from comparison runs inside one experiment
KIND_TAG = "selfalign.run_kind"
PIPELINE_KIND = "pipeline"
COMPARE_KIND = "compare"
STATE_TAG = "pipeline_state"
# set on an unfinished (FAILED / killed) run of a state once a later run of that state finished
SUPERSEDED_TAG = "selfalign.superseded_by"

# keys that carry a metric's point estimate inside a {value, n, ci_low, ci_high} object (evaluation/stats)
_POINT_KEYS = ("value", "diff", "mean")
# keys that carry a confidence interval as a [low, high] pair
_CI_PAIR_KEYS = ("ci", "ci95", "ci_95", "confidence_interval")
_CI_BOUND_KEYS = {"ci_low": "_ci_low", "ci_lo": "_ci_low", "ci_high": "_ci_high", "ci_hi": "_ci_high"}
# characters MLflow accepts in metric/param names; anything else becomes "_"
_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


# ------------------------------------------------------------------------------------------ the store
def _absolute_local_uri(uri: str, root: Path) -> str:
    """Make a relative ``sqlite:///x.db`` / ``file:x`` / bare path absolute against ``root``."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path.startswith("/"):
            return "sqlite:///" + str((root / path).resolve())
        return uri
    if uri.startswith("file:"):
        path = uri[len("file:"):].removeprefix("//")
        return "file://" + str((root / path).resolve()) if not path.startswith("/") else "file://" + path
    if "://" not in uri:
        return str((root / uri).resolve())
    return uri


def _outside_dvc_temp_copy(root: Path) -> Path:
    """The repository that owns ``root`` when ``root`` is a DVC experiment's temporary copy
    (``<repo>/.dvc/tmp/exps/tmpXXXX``, used by ``dvc exp run --queue/--temp``), else ``root``."""
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def resolve_tracking_uri(project_root: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set (relative local stores made absolute), else ``<root>/mlflow.db``.

    Inside a DVC experiment's temporary copy the default store is the owning repository's, so a
    ``dvc exp run --queue`` started without ``MLFLOW_TRACKING_URI`` still lands in the project's store.
    """
    root = _outside_dvc_temp_copy(Path(project_root).resolve())
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        absolute = _absolute_local_uri(env, root)
        if absolute != env:
            log.warning("MLFLOW_TRACKING_URI=%s is relative; using %s", env, absolute)
        return absolute
    return f"sqlite:///{root / 'mlflow.db'}"


def _artifact_root_for(uri: str) -> str | None:
    """Artifacts next to a local sqlite store (absolute), so runs from temp copies keep them."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").as_uri()
    return None


def _client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    # quiet MLflow's alembic/db-migration chatter on first use of a store
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, uri: str, create: bool) -> str | None:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        return None
    return client.create_experiment(name, artifact_location=_artifact_root_for(uri))


# -------------------------------------------------------------------------------------- flattening
def _clean_name(name: str) -> str:
    return _BAD_NAME_CHARS.sub("_", name)


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> dotted keys (``engrave.train.learning_rate``); lists become JSON strings."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = _clean_name(f"{prefix}{key}")
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple, Mapping)):
            out[name] = json.dumps(value, ensure_ascii=False)
        else:
            out[name] = "null" if value is None else str(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metrics_from_json(data: Any, prefix: str) -> dict[str, float]:
    """Flatten a metrics JSON to MLflow metrics; CIs become ``<name>_ci_low`` / ``<name>_ci_high``.

    ``{"mc1": {"value": .3, "n": 100, "ci_low": .2, "ci_high": .4}}`` under prefix ``eval.base`` gives
    ``eval.base.mc1``, ``eval.base.mc1_n``, ``eval.base.mc1_ci_low``, ``eval.base.mc1_ci_high``.
    Booleans are logged as 0/1; strings, long lists and non-finite numbers are skipped (they are
    artifacts, not metrics).
    """
    out: dict[str, float] = {}
    if isinstance(data, bool):
        out[_clean_name(prefix)] = float(data)
    elif _is_number(data):
        out[_clean_name(prefix)] = float(data)
    elif isinstance(data, Mapping):
        for key, value in data.items():
            key = str(key)
            if key in _POINT_KEYS and (_is_number(value) or value is None):
                if value is not None:
                    out[_clean_name(prefix)] = float(value)
            elif key == "n" and _is_number(value):
                out[_clean_name(f"{prefix}_n")] = float(value)
            elif key in _CI_BOUND_KEYS:
                if _is_number(value):
                    out[_clean_name(prefix + _CI_BOUND_KEYS[key])] = float(value)
            elif key in _CI_PAIR_KEYS and isinstance(value, (list, tuple)) and len(value) == 2:
                lo, hi = value
                if _is_number(lo) and _is_number(hi):
                    out[_clean_name(f"{prefix}_ci_low")] = float(lo)
                    out[_clean_name(f"{prefix}_ci_high")] = float(hi)
            else:
                out.update(metrics_from_json(value, f"{prefix}.{key}" if prefix else key))
    return out


def read_loss_history(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Per-step series from a training CSV (``step,loss,...``): column -> [(step, value)]."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            step_raw = row.get("step")
            try:
                step = int(float(step_raw)) if step_raw not in (None, "") else i
            except ValueError:
                step = i
            for col, raw in row.items():
                if col == "step" or col is None or raw in (None, ""):
                    continue
                try:
                    value = float(raw)
                except ValueError:
                    continue
                if math.isfinite(value):
                    series.setdefault(_clean_name(col), []).append((step, value))
    return series


# ---------------------------------------------------------------------------------------- identity
def upstream_lock_entries(lock_path: str | Path, self_stage: str) -> dict[str, Any]:
    """The ``dvc.lock`` stages other than ``self_stage`` (and its ``foreach`` members)."""
    import yaml

    path = Path(lock_path)
    if not path.exists():
        return {}
    lock = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    stages = lock.get("stages") or {}
    return {k: v for k, v in stages.items() if k.split("@")[0] != self_stage}


def pipeline_state_id(upstream: Mapping[str, Any], params: Mapping[str, str],
                      input_hashes: Mapping[str, str]) -> str:
    """sha256 over the upstream lock entries, the flat params and the inputs' content hashes."""
    blob = json.dumps({"lock": upstream, "params": dict(params), "inputs": dict(input_hashes)},
                      sort_keys=True, default=str)
    return sha256_text(blob)


def git_info(root: str | Path) -> tuple[str, bool]:
    """(HEAD commit, working tree dirty) or ("", False) outside a git repository."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "", False
    return commit, bool(status.strip())


def ablation_label(excluded: Iterable[str]) -> str:
    """``full`` for the complete principle set, else ``exclude:<a>,<b>`` (sorted)."""
    names = sorted(excluded)
    return "exclude:" + ",".join(names) if names else "full"


# ------------------------------------------------------------------------------------- the pipeline
@dataclass
class TrackInputs:
    """Everything ``log_pipeline_run`` logs, gathered by the ``track`` stage from the workspace."""

    experiment_name: str
    params: dict[str, str]
    resolved_config: dict[str, Any]
    metrics: dict[str, float]
    histories: dict[str, list[tuple[int, float]]]
    tags: dict[str, str]
    state_id: str
    run_name: str
    # local files to log: artifact sub-directory -> list of paths
    artifacts: dict[str, list[Path]] = field(default_factory=dict)
    # text artifacts written on the fly: artifact path -> content
    texts: dict[str, str] = field(default_factory=dict)


def experiment_id(uri: str, experiment_name: str) -> str | None:
    """Id of the experiment called ``experiment_name`` in the store at ``uri`` (None if absent)."""
    return _experiment_id(_client(uri), experiment_name, uri, create=False)


def _runs_tagged(client, exp_id: str, tag: str, value: str, status: str | None = None) -> list:
    """Active runs of ``exp_id`` whose tag ``tag`` equals ``value`` (optionally of one status), oldest first."""
    safe = value.replace("'", "")
    where = f"tags.`{tag}` = '{safe}'" + (f" and attributes.status = '{status}'" if status else "")
    out, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=where, order_by=["attributes.start_time ASC"],
                                  max_results=500, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def find_run(uri: str, experiment_name: str, tag: str, value: str) -> str | None:
    """Id of a FINISHED run of ``experiment_name`` whose tag ``tag`` equals ``value``, if any.

    Only a finished run counts: a run that FAILED, or one left RUNNING by a killed process, holds no
    complete record of its state, and letting it count would block every later run of that state for
    good (``compare`` reads finished runs only, so the state would never show up there).
    """
    client = _client(uri)
    exp_id = _experiment_id(client, experiment_name, uri, create=False)
    if exp_id is None:
        return None
    runs = _runs_tagged(client, exp_id, tag, value, status="FINISHED")
    return runs[0].info.run_id if runs else None


def _supersede_unfinished(client, exp_id: str, state_id: str, new_run_id: str) -> list[str]:
    """Mark earlier unfinished runs of ``state_id`` as replaced by ``new_run_id``; returns their ids.

    They are kept (a failure's partial record can help a post-mortem) but tagged, and a run still
    RUNNING is closed as KILLED so no view mistakes it for work in progress: ``track`` takes seconds,
    so a RUNNING run of a state that a later ``track`` has just finished is one whose process died (a
    live twin from a parallel queue worker would still end FINISHED, leaving two finished runs of one
    state, which ``find_run`` and ``compare`` tolerate).
    """
    stale = []
    for run in _runs_tagged(client, exp_id, STATE_TAG, state_id):
        if run.info.run_id == new_run_id or run.info.status == "FINISHED":
            continue
        client.set_tag(run.info.run_id, SUPERSEDED_TAG, new_run_id)
        if run.info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(run.info.run_id, status="KILLED")
        stale.append(run.info.run_id)
    if stale:
        log.warning("pipeline state %s: %d unfinished run(s) %s replaced by %s", state_id[:12], len(stale),
                    ", ".join(stale), new_run_id)
    return stale


def log_pipeline_run(uri: str, inputs: TrackInputs, plots_dir: Path | None = None) -> tuple[str, str, bool]:
    """Log one run unless the state is already logged; returns (run_id, experiment_id, created)."""
    from mlflow.entities import Metric, Param

    client = _client(uri)
    exp_id = _experiment_id(client, inputs.experiment_name, uri, create=True)
    existing = find_run(uri, inputs.experiment_name, STATE_TAG, inputs.state_id)
    if existing is not None:
        log.info("pipeline state %s already logged as run %s; nothing to do", inputs.state_id[:12], existing)
        return existing, exp_id, False
    tags = {**inputs.tags, KIND_TAG: PIPELINE_KIND, STATE_TAG: inputs.state_id,
            "mlflow.runName": inputs.run_name}
    run = client.create_run(exp_id, tags=tags, run_name=inputs.run_name)
    run_id = run.info.run_id
    try:
        now = _now_ms()
        params = [Param(k, v) for k, v in sorted(inputs.params.items())]
        metrics = [Metric(k, v, now, 0) for k, v in sorted(inputs.metrics.items())]
        for name, points in sorted(inputs.histories.items()):
            metrics.extend(Metric(name, v, now, step) for step, v in points)
        client.log_batch(run_id, params=params, metrics=metrics)
        client.log_dict(run_id, inputs.resolved_config, "config/resolved_config.json")
        for artifact_path, text in sorted(inputs.texts.items()):
            client.log_text(run_id, text, artifact_path)
        for subdir, paths in sorted(inputs.artifacts.items()):
            for path in paths:
                client.log_artifact(run_id, str(path), artifact_path=subdir or None)
        if plots_dir is not None:
            for png in sorted(plots_dir.glob("*.png")):
                client.log_artifact(run_id, str(png), artifact_path="plots")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    _supersede_unfinished(client, exp_id, inputs.state_id, run_id)
    log.info("logged run %s (%d params, %d metrics, %d loss series) to %s", run_id, len(inputs.params),
             len(inputs.metrics), len(inputs.histories), uri)
    return run_id, exp_id, True


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


# ----------------------------------------------------------------------------------------- compare
@dataclass
class RunRecord:
    """One pipeline run as ``compare`` sees it."""

    run_id: str
    name: str
    start_time: int
    metrics: dict[str, float]
    tags: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)

    @property
    def ablation(self) -> str:
        return self.tags.get("ablation", "full")


def load_runs(uri: str, experiment_name: str) -> list[RunRecord]:
    """Every finished pipeline run of ``experiment_name``, oldest first."""
    client = _client(uri)
    exp_id = _experiment_id(client, experiment_name, uri, create=False)
    if exp_id is None:
        return []
    out: list[RunRecord] = []
    token = None
    while True:
        page = client.search_runs([exp_id], filter_string=f"tags.`{KIND_TAG}` = '{PIPELINE_KIND}'",
                                  order_by=["attributes.start_time ASC"], max_results=500,
                                  page_token=token)
        for r in page:
            if r.info.status != "FINISHED":
                continue
            out.append(RunRecord(r.info.run_id, r.info.run_name or r.info.run_id, r.info.start_time,
                                 dict(r.data.metrics), dict(r.data.tags), dict(r.data.params)))
        token = page.token
        if not token:
            break
    return out


def log_comparison(uri: str, experiment_name: str, key: str, files: Iterable[Path],
                   tags: Mapping[str, str]) -> str:
    """Log comparison files to the compare run for ``key`` (re-used when the same runs are compared)."""
    client = _client(uri)
    exp_id = _experiment_id(client, experiment_name, uri, create=True)
    safe = key.replace("'", "")
    found = client.search_runs([exp_id], filter_string=f"tags.`compare_key` = '{safe}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        run = client.create_run(exp_id, run_name="compare",
                                tags={**tags, KIND_TAG: COMPARE_KIND, "compare_key": key})
        run_id = run.info.run_id
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="comparison")
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def download_artifact(uri: str, run_id: str, artifact_path: str, dst_dir: str | Path) -> Path | None:
    """Download one artifact file of a run into ``dst_dir``; None when the run has no such file (a run
    logged before the artifact existed, or one whose stage did not produce it)."""
    client = _client(uri)
    parent = artifact_path.rsplit("/", 1)[0] if "/" in artifact_path else None
    if artifact_path not in {a.path for a in client.list_artifacts(run_id, parent) if not a.is_dir}:
        return None
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, artifact_path, str(dst_dir)))


def scratch_dir() -> tempfile.TemporaryDirectory:
    """A temporary directory for plots and samples written only to be logged."""
    return tempfile.TemporaryDirectory(prefix="selfalign-track-")


def file_hashes(paths: Iterable[Path], root: Path) -> dict[str, str]:
    """Relative path -> sha256 for the inputs that define the state."""
    return {str(p.relative_to(root) if p.is_absolute() and p.is_relative_to(root) else p): sha256_file(p)
            for p in sorted(paths)}
