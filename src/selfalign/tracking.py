"""MLflow side channel: one run per distinct pipeline state, and the queries ``compare`` needs.

DVC decides what runs and caches the outputs; MLflow only records the history for browsing and
comparison (DESIGN.md, "Tracking and experiments"). All MLflow calls of the project live in this module
so that the rest of the code never depends on MLflow's API.

One run per distinct *pipeline state* (:mod:`selfalign.lineage` says what that is and why): a
``dvc repro`` with nothing changed adds no run.

Why an absolute tracking URI: queued DVC experiments run in a temporary copy of the repository
(``.dvc/tmp/exps/...``); a relative ``sqlite:///mlflow.db`` there silently creates a throw-away store.

What a run holds is decided elsewhere: :mod:`selfalign.metrics_schema` splits the metrics files into
headline metrics and bookkeeping and picks the headline set (``eval/headline.json``). Only that set, with its
95% bounds, becomes MLflow *metrics* (a few dozen columns a person can read in the runs table); every number
is in the run's ``metrics.json`` artifact (what ``compare`` reads) and ``metrics_table.json`` (one row per
metric with its interval, a table in the UI's artifact view), the rest in ``bookkeeping.json``; plus the step
datasets as MLflow dataset inputs named by their DVC hash and the adapters as loadable artifacts.

Each run carries a name that says what it is (``full``, ``exclude:static``, ``seed-1``) and a description
(``mlflow.note.content``) that ``compare`` extends with its verdicts; ``compare`` attaches its table to the
runs it compares instead of logging a run of its own. :func:`save_runs_view` stores the view ``selfalign ui``
opens: the runs table with the headline columns selected.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from selfalign.lineage import DatasetRef

log = logging.getLogger(__name__)

__all__ = [
    "BOOKKEEPING_ARTIFACT",
    "COMPARE_KIND",
    "EXPERIMENT_KIND_TAG",
    "METRICS_ARTIFACT",
    "NOTE_TAG",
    "PIPELINE_KIND",
    "SUPERSEDED_TAG",
    "RunRecord",
    "TrackInputs",
    "attach_comparison",
    "download_artifact",
    "find_run",
    "flatten_params",
    "headline_metrics",
    "latest_run_named",
    "load_runs",
    "log_pipeline_run",
    "open_experiment",
    "recorded_tracking_uri",
    "resolve_tracking_uri",
    "experiment_metric_names",
    "runs_view_url",
    "save_runs_view",
]

# tag values that tell pipeline runs from comparison runs inside one experiment
KIND_TAG = "selfalign.run_kind"
PIPELINE_KIND = "pipeline"
COMPARE_KIND = "compare"
STATE_TAG = "pipeline_state"
# set on an unfinished (FAILED / killed) run of a state once a later run of that state finished
SUPERSEDED_TAG = "selfalign.superseded_by"
# the experiment tag MLflow's UI (3.x) reads to choose an experiment's page: "custom_model_development"
# ("Machine learning") opens on the training runs, not on the empty GenAI traces overview
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_RUNS_KIND = "custom_model_development"
# where the non-headline numbers of a run go (metrics_schema: Kind.BOOKKEEPING)
BOOKKEEPING_ARTIFACT = "bookkeeping.json"
# every metric of a run (headline or not, with its bounds), name -> value: what `compare` reads
METRICS_ARTIFACT = "metrics.json"
# the same numbers as an MLflow table (metric, value, ci_low, ci_high, headline): readable in the artifact view
METRICS_TABLE_ARTIFACT = "metrics_table.json"
# the run description MLflow's UI shows (run page "Description", runs-table column "Description")
NOTE_TAG = "mlflow.note.content"
# `compare`'s section of a run's description (replaced, not appended, when compare runs again)
COMPARE_NOTE_START, COMPARE_NOTE_END = "<!-- selfalign compare -->", "<!-- /selfalign compare -->"
# tags `compare` sets on each run it compares
COMPARE_BASELINE_TAG = "selfalign.compare.baseline"
COMPARE_SIGNIFICANT_TAG = "selfalign.compare.significant"
# what compare attaches to the runs (artifact directory)
COMPARE_ARTIFACT_DIR = "compare"
# MLflow 3's UI: an experiment tag holding a saved runs-table view, opened by ?viewStateShareKey=<key>; and the
# global GenAI / machine-learning switch, which overrides mlflow.experimentKind (default "genai" in a new browser)
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RUNS_VIEW_KEY = "selfalign-headline"
ML_WORKFLOW = "machine_learning"
_CI_SUFFIXES = ("_ci_low", "_ci_high")
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


def recorded_tracking_uri(uri: str, project_root: str | Path) -> str:
    """``uri`` as an output file records it: a local store inside the repository relative to the repository's
    root (``sqlite:///mlflow.db``, ``file:mlruns``), anything else unchanged.

    Why: ``eval/mlflow_run.json`` is a committed output; with the absolute path a fresh clone in another
    directory reproduced every byte of the pipeline except this one. Running code still uses the absolute
    URI (:func:`resolve_tracking_uri`); the record says where the store is *within* the repository."""
    root = _outside_dvc_temp_copy(Path(project_root).resolve())
    for scheme, relative_scheme in (("sqlite:///", "sqlite:///"), ("file://", "file:")):
        if uri.startswith(scheme):
            path = Path(uri[len(scheme):])
            if path.is_absolute() and path.is_relative_to(root):
                return relative_scheme + path.relative_to(root).as_posix()
    return uri


def _artifact_root_for(uri: str) -> str | None:
    """Artifacts next to a local sqlite store (absolute), so runs from temp copies keep them."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").as_uri()
    return None


def _client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    # quiet MLflow's alembic/db-migration chatter on first use of a store, and its per-download progress bars
    # (compare downloads a few files per run); an explicit MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR still wins
    logging.getLogger("alembic").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, uri: str, create: bool) -> str | None:
    """The experiment's id; with ``create``, made if absent and marked as a training-runs experiment
    (an experiment made before the tag existed gets it on the next write)."""
    exp = client.get_experiment_by_name(name)
    if exp is None and not create:
        return None
    if exp is None:
        return client.create_experiment(name, artifact_location=_artifact_root_for(uri),
                                        tags={EXPERIMENT_KIND_TAG: TRAINING_RUNS_KIND})
    if create and EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_RUNS_KIND)
    return exp.experiment_id


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


# ------------------------------------------------------------------------------------- the pipeline
@dataclass
class TrackInputs:
    """Everything ``log_pipeline_run`` logs, gathered by the ``track`` stage from the workspace."""

    experiment_name: str
    params: dict[str, str]
    resolved_config: dict[str, Any]
    # every metric (MLflow names, bounds as <name>_ci_low/_ci_high): the metrics.json / metrics_table.json artifacts
    metrics: dict[str, float]
    # the headline names (eval/headline.json): these and their bounds are the run's MLflow metrics
    headline: list[str]
    tags: dict[str, str]
    state_id: str
    run_name: str
    # the run's description (markdown, the mlflow.note.content tag)
    description: str = ""
    # local files to log: artifact sub-directory -> list of paths
    artifacts: dict[str, list[Path]] = field(default_factory=dict)
    # text artifacts written on the fly: artifact path -> content
    texts: dict[str, str] = field(default_factory=dict)
    # numbers that are not headline metrics (metrics_schema), logged as one JSON artifact
    bookkeeping: dict[str, Any] = field(default_factory=dict)
    # the step datasets, logged as MLflow dataset inputs
    datasets: list[DatasetRef] = field(default_factory=list)
    # directories logged whole: artifact path -> local directory (the LoRA adapters, loadable by PEFT)
    artifact_dirs: dict[str, Path] = field(default_factory=dict)


def open_experiment(uri: str, experiment_name: str) -> str:
    """Id of the experiment called ``experiment_name`` in the store at ``uri``, made if absent and tagged
    to open on its training runs (also when ``track`` finds its state already logged)."""
    return _experiment_id(_client(uri), experiment_name, uri, create=True)


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
    client = _client(uri)
    exp_id = _experiment_id(client, inputs.experiment_name, uri, create=True)
    existing = find_run(uri, inputs.experiment_name, STATE_TAG, inputs.state_id)
    if existing is not None:
        log.info("pipeline state %s already logged as run %s; nothing to do", inputs.state_id[:12], existing)
        return existing, exp_id, False
    tags = {**inputs.tags, KIND_TAG: PIPELINE_KIND, STATE_TAG: inputs.state_id,
            "mlflow.runName": inputs.run_name, **({NOTE_TAG: inputs.description} if inputs.description else {})}
    run = client.create_run(exp_id, tags=tags, run_name=inputs.run_name)
    run_id = run.info.run_id
    try:
        _log_values(client, run_id, inputs)
        _log_datasets(client, run_id, inputs.datasets)
        _log_files(client, run_id, inputs, plots_dir)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    _supersede_unfinished(client, exp_id, inputs.state_id, run_id)
    log.info("logged run %s '%s' (%d params, %d headline metrics of %d, %d datasets) to %s", run_id,
             inputs.run_name, len(inputs.params), len(headline_metrics(inputs.headline, inputs.metrics)),
             len(inputs.metrics), len(inputs.datasets), uri)
    return run_id, exp_id, True


def headline_metrics(headline: Iterable[str], metrics: Mapping[str, float]) -> dict[str, float]:
    """The MLflow metrics of a run: each headline name present in ``metrics`` and its 95% bounds
    (``<name>_ci_low`` / ``<name>_ci_high``) where it has them; nothing else."""
    out: dict[str, float] = {}
    for name in headline:
        for key in (name, *(name + s for s in _CI_SUFFIXES)):
            if key in metrics:
                out[key] = metrics[key]
    return out


def _metrics_table(metrics: Mapping[str, float], headline: Iterable[str]) -> dict[str, list]:
    """One row per metric (bounds folded into their metric's row), headline ones first."""
    heads = set(headline)
    names = [k for k in metrics if not (k.endswith(_CI_SUFFIXES) and k.rsplit("_ci_", 1)[0] in metrics)]
    names.sort(key=lambda k: (k not in heads, k))
    return {"metric": names, "value": [metrics[k] for k in names],
            "ci_low": [metrics.get(k + "_ci_low") for k in names],
            "ci_high": [metrics.get(k + "_ci_high") for k in names],
            "headline": [k in heads for k in names]}


def _log_values(client, run_id: str, inputs: TrackInputs) -> None:
    """Params, the headline metrics (and only those), every metric as JSON and as a table, the resolved config
    and the bookkeeping JSON."""
    from mlflow.entities import Metric, Param

    now = _now_ms()
    params = [Param(k, v) for k, v in sorted(inputs.params.items())]
    metrics = [Metric(_clean_name(k), v, now, 0)
               for k, v in sorted(headline_metrics(inputs.headline, inputs.metrics).items())]
    client.log_batch(run_id, params=params, metrics=metrics)
    client.log_dict(run_id, dict(sorted(inputs.metrics.items())), METRICS_ARTIFACT)
    client.log_table(run_id, _metrics_table(inputs.metrics, inputs.headline), METRICS_TABLE_ARTIFACT)
    client.log_dict(run_id, inputs.resolved_config, "config/resolved_config.json")
    client.log_dict(run_id, dict(sorted(inputs.bookkeeping.items())), BOOKKEEPING_ARTIFACT)


def _log_datasets(client, run_id: str, datasets: Iterable[DatasetRef]) -> None:
    """Each step dataset as an MLflow dataset input: name = its path, digest = its DVC md5, context =
    the stage that wrote it. Metadata only: the data stays in DVC's cache, found there by the md5."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    entries = [DatasetInput(MetaDataset(LocalArtifactDatasetSource(d.path), name=d.path, digest=d.md5)
                            ._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, d.stage)])
               for d in datasets]
    if entries:
        client.log_inputs(run_id, datasets=entries)


def _log_files(client, run_id: str, inputs: TrackInputs, plots_dir: Path | None) -> None:
    """Text artifacts, files per artifact directory, whole directories (adapters) and the drawn plots."""
    for artifact_path, text in sorted(inputs.texts.items()):
        client.log_text(run_id, text, artifact_path)
    for subdir, paths in sorted(inputs.artifacts.items()):
        for path in paths:
            client.log_artifact(run_id, str(path), artifact_path=subdir or None)
    for artifact_path, directory in sorted(inputs.artifact_dirs.items()):
        client.log_artifacts(run_id, str(directory), artifact_path=artifact_path)
    if plots_dir is not None:
        for png in sorted(plots_dir.glob("*.png")):
            client.log_artifact(run_id, str(png), artifact_path="plots")


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


def _pipeline_runs(client, exp_id: str) -> list:
    """Every finished pipeline run of the experiment (MLflow entities), oldest first."""
    out, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=f"tags.`{KIND_TAG}` = '{PIPELINE_KIND}'",
                                  order_by=["attributes.start_time ASC"], max_results=500, page_token=token)
        out.extend(r for r in page if r.info.status == "FINISHED")
        token = page.token
        if not token:
            return out


def _all_metrics(client, run, scratch: Path) -> dict[str, float]:
    """Every metric of a run: its ``metrics.json`` artifact over its MLflow metrics (a run logged before the
    artifact existed has every metric as an MLflow metric)."""
    metrics = dict(run.data.metrics)
    path = download_artifact(client, run.info.run_id, METRICS_ARTIFACT, scratch / run.info.run_id)
    if path is not None:
        metrics.update(json.loads(path.read_text(encoding="utf-8")))
    return metrics


def load_runs(uri: str, experiment_name: str) -> list[RunRecord]:
    """Every finished pipeline run of ``experiment_name``, oldest first, with all its metrics."""
    client = _client(uri)
    exp_id = _experiment_id(client, experiment_name, uri, create=False)
    if exp_id is None:
        return []
    with tempfile.TemporaryDirectory(prefix="selfalign-runs-") as scratch:
        return [RunRecord(r.info.run_id, r.info.run_name or r.info.run_id, r.info.start_time,
                          _all_metrics(client, r, Path(scratch)), dict(r.data.tags), dict(r.data.params))
                for r in _pipeline_runs(client, exp_id)]


def latest_run_named(uri: str, experiment_name: str, name: str, exclude: str | None = None) -> RunRecord | None:
    """The latest finished pipeline run called ``name`` (other than ``exclude``), with its MLflow metrics (the
    headline set) only: the reference a new run's description compares against."""
    client = _client(uri)
    exp_id = _experiment_id(client, experiment_name, uri, create=False)
    if exp_id is None:
        return None
    found = [r for r in _pipeline_runs(client, exp_id) if r.info.run_name == name and r.info.run_id != exclude]
    if not found:
        return None
    r = found[-1]
    return RunRecord(r.info.run_id, r.info.run_name, r.info.start_time, dict(r.data.metrics), dict(r.data.tags),
                     dict(r.data.params))


def _with_compare_note(note: str, section: str) -> str:
    """``note`` with its compare section replaced by ``section`` (appended when it has none)."""
    if COMPARE_NOTE_START in note and COMPARE_NOTE_END in note:
        head, rest = note.split(COMPARE_NOTE_START, 1)
        note = head.rstrip() + rest.split(COMPARE_NOTE_END, 1)[1]
    block = f"{COMPARE_NOTE_START}\n{section.strip()}\n{COMPARE_NOTE_END}"
    return f"{note.rstrip()}\n\n{block}" if note.strip() else block


def attach_comparison(uri: str, experiment_name: str, baseline_id: str, files: Iterable[Path],
                      notes: Mapping[str, str], significant: Mapping[str, list[str]]) -> list[str]:
    """Attach a comparison to the runs it compares: ``files`` under ``compare/`` of each run in ``notes``, its
    section of each run's description (``notes``: run id -> markdown), the baseline's id and the significant
    columns (``significant``: run id -> labels) as tags. Creates no run; returns the run ids written to.

    Earlier versions logged each comparison as a run of its own, without metrics, between the pipeline runs;
    those are deleted (MLflow's soft delete: ``mlflow gc`` purges, the UI's "deleted" filter restores)."""
    client = _client(uri)
    exp_id = _experiment_id(client, experiment_name, uri, create=True)
    files = list(files)
    for run_id, section in notes.items():
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path=COMPARE_ARTIFACT_DIR)
        note = client.get_run(run_id).data.tags.get(NOTE_TAG, "")
        client.set_tag(run_id, NOTE_TAG, _with_compare_note(note, section))
        client.set_tag(run_id, COMPARE_BASELINE_TAG, baseline_id)
        if run_id in significant:
            client.set_tag(run_id, COMPARE_SIGNIFICANT_TAG, ", ".join(significant[run_id]) or "none")
    for legacy in _runs_tagged(client, exp_id, KIND_TAG, COMPARE_KIND):
        client.delete_run(legacy.info.run_id)
        log.info("deleted the metric-less compare run %s of an earlier version", legacy.info.run_id)
    return list(notes)


# ---------------------------------------------------------------------------------------------- the UI
def save_runs_view(uri: str, experiment_name: str, columns: Iterable[str]) -> tuple[str, str]:
    """Store the runs-table view ``selfalign ui`` opens: these metric columns (plus the run description)
    selected, newest run first. Returns (experiment id, view key).

    MLflow 3's UI shows no metric column until one is picked in the column chooser; a view saved as the
    experiment tag ``mlflow.sharedViewState.<key>`` (what the UI's "Share" button writes) is applied by opening
    the experiment with ``?viewStateShareKey=<key>``."""
    client = _client(uri)
    exp_id = _experiment_id(client, experiment_name, uri, create=True)
    view = {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False,
            "selectedColumns": ["attributes.`Description`", *(f"metrics.`{_clean_name(c)}`" for c in columns)],
            "runListHidden": False, "viewMaximized": False}
    client.set_experiment_tag(exp_id, SHARED_VIEW_TAG_PREFIX + RUNS_VIEW_KEY, json.dumps(view))
    return exp_id, RUNS_VIEW_KEY


def runs_view_url(server: str, experiment_id: str, view_key: str) -> str:
    """The address of the experiment's runs table in that view, in the machine-learning workflow (the UI's
    GenAI / machine-learning switch defaults to GenAI in a new browser and then ignores mlflow.experimentKind)."""
    return (f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType={ML_WORKFLOW}&viewStateShareKey={view_key}")


def experiment_metric_names(uri: str, experiment_name: str) -> list[str]:
    """The MLflow metric names of the experiment's finished pipeline runs (their headline sets), sorted."""
    client = _client(uri)
    exp_id = _experiment_id(client, experiment_name, uri, create=False)
    if exp_id is None:
        return []
    return sorted({k for r in _pipeline_runs(client, exp_id) for k in r.data.metrics})


def download_artifact(uri, run_id: str, artifact_path: str, dst_dir: str | Path) -> Path | None:
    """Download one artifact file of a run into ``dst_dir``; None when the run has no such file (a run
    logged before the artifact existed, or one whose stage did not produce it). ``uri``: the store, or an
    MlflowClient already open on it."""
    client = _client(uri) if isinstance(uri, str) else uri
    parent = artifact_path.rsplit("/", 1)[0] if "/" in artifact_path else None
    if artifact_path not in {a.path for a in client.list_artifacts(run_id, parent) if not a.is_dir}:
        return None
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, artifact_path, str(dst_dir)))


def scratch_dir() -> tempfile.TemporaryDirectory:
    """A temporary directory for plots and samples written only to be logged."""
    return tempfile.TemporaryDirectory(prefix="selfalign-track-")
