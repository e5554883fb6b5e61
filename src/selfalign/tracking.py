"""MLflow side channel: one run per distinct pipeline state, and the queries ``compare`` needs.

DVC decides what runs and caches the outputs; MLflow only records the history for browsing and
comparison (DESIGN.md, "Tracking and experiments"). All MLflow calls of the project live in this module
so that the rest of the code never depends on MLflow's API.

One run per distinct *pipeline state* (:mod:`selfalign.lineage` says what that is and why): a
``dvc repro`` with nothing changed adds no run.

Why an absolute tracking URI: queued DVC experiments run in a temporary copy of the repository
(``.dvc/tmp/exps/...``); a relative ``sqlite:///mlflow.db`` there silently creates a throw-away store.

What a run holds is decided elsewhere: :mod:`selfalign.metrics_schema` splits the metrics files into
headline metrics and bookkeeping; this module only writes them (metrics, ``bookkeeping.json``), plus the
step datasets as MLflow dataset inputs named by their DVC hash and the adapters as loadable artifacts.
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
    "PIPELINE_KIND",
    "SUPERSEDED_TAG",
    "RunRecord",
    "TrackInputs",
    "download_artifact",
    "find_run",
    "flatten_params",
    "load_runs",
    "log_comparison",
    "log_pipeline_run",
    "open_experiment",
    "recorded_tracking_uri",
    "resolve_tracking_uri",
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

    # quiet MLflow's alembic/db-migration chatter on first use of a store
    logging.getLogger("alembic").setLevel(logging.WARNING)
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
    metrics: dict[str, float]
    histories: dict[str, list[tuple[int, float]]]
    tags: dict[str, str]
    state_id: str
    run_name: str
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
            "mlflow.runName": inputs.run_name}
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
    log.info("logged run %s (%d params, %d metrics, %d loss series, %d datasets) to %s", run_id,
             len(inputs.params), len(inputs.metrics), len(inputs.histories), len(inputs.datasets), uri)
    return run_id, exp_id, True


def _log_values(client, run_id: str, inputs: TrackInputs) -> None:
    """Params, headline metrics, per-step series, the resolved config and the bookkeeping JSON."""
    from mlflow.entities import Metric, Param

    now = _now_ms()
    params = [Param(k, v) for k, v in sorted(inputs.params.items())]
    metrics = [Metric(_clean_name(k), v, now, 0) for k, v in sorted(inputs.metrics.items())]
    for name, points in sorted(inputs.histories.items()):
        metrics.extend(Metric(_clean_name(name), v, now, step) for step, v in points)
    client.log_batch(run_id, params=params, metrics=metrics)
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
