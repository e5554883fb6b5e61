"""selfalign.tracking: params flattening, URIs, and runs, dataset inputs and bookkeeping in a real sqlite store."""

from __future__ import annotations

import json

import pytest

from selfalign import tracking


def test_flatten_params_dotted_keys_and_json_lists():
    flat = tracking.flatten_params({"a": {"b": {"c": 1}, "l": [1, 2], "n": None, "e": {}}, "x": "y(z)"})
    assert flat == {"a.b.c": "1", "a.l": "[1, 2]", "a.n": "null", "a.e": "{}", "x": "y(z)"}
    # characters MLflow rejects in a key are replaced
    assert tracking.flatten_params({"k(1)": 2}) == {"k_1_": "2"}


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/store.db")
    assert tracking.resolve_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/rel/store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////abs/x.db")
    assert tracking.resolve_tracking_uri(tmp_path) == "sqlite:////abs/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(tmp_path) == "http://127.0.0.1:5000"
    # a DVC experiment's temporary copy writes to the owning repository's store, not a throw-away one
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    temp_copy = tmp_path / "repo/.dvc/tmp/exps/tmpab12"
    assert tracking.resolve_tracking_uri(temp_copy) == f"sqlite:///{tmp_path.resolve()}/repo/mlflow.db"


def test_recorded_tracking_uri_is_relative_inside_the_repository(tmp_path):
    """What eval/mlflow_run.json records: a store inside the repository relative to its root (the same in every
    checkout), also from a DVC experiment's temporary copy; a store elsewhere or a server as it is."""
    root = tmp_path.resolve() / "repo"
    assert tracking.recorded_tracking_uri(f"sqlite:///{root}/mlflow.db", root) == "sqlite:///mlflow.db"
    assert tracking.recorded_tracking_uri(f"sqlite:///{root}/stores/x.db", root) == "sqlite:///stores/x.db"
    assert tracking.recorded_tracking_uri(f"file://{root}/mlruns", root) == "file:mlruns"
    temp_copy = root / ".dvc/tmp/exps/tmpab12"
    assert tracking.recorded_tracking_uri(f"sqlite:///{root}/mlflow.db", temp_copy) == "sqlite:///mlflow.db"
    assert tracking.recorded_tracking_uri(f"sqlite:///{tmp_path.resolve()}/other.db", root) == \
        f"sqlite:///{tmp_path.resolve()}/other.db"
    assert tracking.recorded_tracking_uri("http://127.0.0.1:5000", root) == "http://127.0.0.1:5000"


def _inputs(state: str, metrics: dict[str, float], headline: list[str] | None = None) -> tracking.TrackInputs:
    return tracking.TrackInputs(experiment_name="exp", params={"a.b": "1"}, resolved_config={"a": {"b": 1}},
                                metrics=metrics, headline=list(metrics) if headline is None else headline,
                                tags={"ablation": "full"}, state_id=state, run_name="r")


def test_log_pipeline_run_is_idempotent_per_state(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id, exp_id, created = tracking.log_pipeline_run(uri, _inputs("s1", {"m": 1.0}))
    assert created
    again, _, created2 = tracking.log_pipeline_run(uri, _inputs("s1", {"m": 2.0}))
    assert (again, created2) == (run_id, False)
    other, _, created3 = tracking.log_pipeline_run(uri, _inputs("s2", {"m": 3.0}))
    assert created3 and other != run_id
    runs = tracking.load_runs(uri, "exp")
    assert [r.run_id for r in runs] == [run_id, other]
    assert runs[0].metrics["m"] == 1.0 and runs[0].params == {"a.b": "1"}
    assert runs[0].tags[tracking.STATE_TAG] == "s1" and runs[0].ablation == "full"
    # artifacts live next to the sqlite store (absolute), not in the working directory
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    art = client.get_run(run_id).info.artifact_uri
    assert art.startswith((tmp_path / "mlruns").as_uri())


def test_only_the_headline_set_is_mlflow_metrics_and_every_metric_is_one_click_away(tmp_path):
    """The run's MLflow metrics are the headline names and their bounds; every metric (and its interval) is in
    metrics.json (what compare reads back through load_runs) and in the metrics_table.json table."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    metrics = {"eval.v.mc1": 0.3, "eval.v.mc1_ci_low": 0.2, "eval.v.mc1_ci_high": 0.4, "engrave.final_loss": 1.2,
               "probe.v.ethical.margin": 0.1, "probe.v.ethical.margin_ci_low": 0.0,
               "probe.v.ethical.margin_ci_high": 0.2, "self_align.rejects.apology": 3.0}
    run_id = tracking.log_pipeline_run(uri, _inputs("s1", metrics, headline=["eval.v.mc1", "engrave.final_loss"]))[0]
    client = MlflowClient(uri)
    assert set(client.get_run(run_id).data.metrics) == {"eval.v.mc1", "eval.v.mc1_ci_low", "eval.v.mc1_ci_high",
                                                       "engrave.final_loss"}
    assert tracking.load_runs(uri, "exp")[0].metrics == metrics
    table = json.loads(tracking.download_artifact(uri, run_id, tracking.METRICS_TABLE_ARTIFACT, tmp_path).read_text())
    rows = {r[0]: r[1:] for r in table["data"]}
    assert table["columns"] == ["metric", "value", "ci_low", "ci_high", "headline"]
    assert rows["probe.v.ethical.margin"] == [0.1, 0.0, 0.2, False] and rows["eval.v.mc1"] == [0.3, 0.2, 0.4, True]
    assert [r[0] for r in table["data"]][:2] == ["engrave.final_loss", "eval.v.mc1"]  # headline rows first


def test_attach_comparison_writes_to_the_compared_runs_and_creates_no_run(tmp_path):
    """Files under compare/ of each run, compare's section of the description replaced (not stacked) on a
    rerun, the significant columns as a tag; a metric-less compare run of an earlier version is deleted."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    inputs = _inputs("s1", {"m": 1.0})
    inputs.description = "**full**: the full principle set"
    base = tracking.log_pipeline_run(uri, inputs)[0]
    other = tracking.log_pipeline_run(uri, _inputs("s2", {"m": 2.0}))[0]
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("exp").experiment_id
    legacy = client.create_run(exp_id, run_name="compare", tags={tracking.KIND_TAG: tracking.COMPARE_KIND}).info.run_id
    f = tmp_path / "compare.txt"
    f.write_text("table")
    for verdict in ("first", "second"):
        tracking.attach_comparison(uri, "exp", base, [f], {base: "ref", other: f"verdict {verdict}"}, {other: ["TQA"]})
    runs = client.search_runs([exp_id])
    assert sorted(r.info.run_id for r in runs) == sorted([base, other])
    assert client.get_run(legacy).info.lifecycle_stage == "deleted"
    note = client.get_run(base).data.tags[tracking.NOTE_TAG]
    assert note.startswith("**full**: the full principle set") and note.count("ref") == 1
    tags = client.get_run(other).data.tags
    assert "verdict second" in tags[tracking.NOTE_TAG] and "verdict first" not in tags[tracking.NOTE_TAG]
    assert tags[tracking.COMPARE_SIGNIFICANT_TAG] == "TQA" and tags[tracking.COMPARE_BASELINE_TAG] == base
    assert [a.path for a in client.list_artifacts(other, "compare")] == ["compare/compare.txt"]


def test_saved_runs_view_selects_the_columns_and_the_url_opens_it(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp_id, key = tracking.save_runs_view(uri, "exp", ["eval.v.mc1", "harm.v.degeneration"])
    exp = MlflowClient(uri).get_experiment(exp_id)
    view = json.loads(exp.tags[tracking.SHARED_VIEW_TAG_PREFIX + key])
    assert view["selectedColumns"] == ["attributes.`Description`", "metrics.`eval.v.mc1`",
                                       "metrics.`harm.v.degeneration`"]
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracking.runs_view_url("http://h:1/", exp_id, key) == \
        f"http://h:1/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey={key}"


def test_load_runs_missing_experiment(tmp_path):
    assert tracking.load_runs(f"sqlite:///{tmp_path}/mlflow.db", "nope") == []


@pytest.mark.parametrize("stale_status", ["FAILED", "RUNNING"])
def test_unfinished_run_does_not_own_its_state(tmp_path, stale_status):
    """A FAILED run, or one left RUNNING by a killed process, is replaced by the next run of its state."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("exp")
    stale = client.create_run(exp_id, tags={tracking.KIND_TAG: tracking.PIPELINE_KIND, tracking.STATE_TAG: "s1"})
    stale_id = stale.info.run_id
    if stale_status == "FAILED":
        client.set_terminated(stale_id, status="FAILED")  # RUNNING: the process died before set_terminated

    assert tracking.find_run(uri, "exp", tracking.STATE_TAG, "s1") is None
    run_id, _, created = tracking.log_pipeline_run(uri, _inputs("s1", {"m": 1.0}))
    assert created and run_id != stale_id
    assert tracking.find_run(uri, "exp", tracking.STATE_TAG, "s1") == run_id
    assert [r.run_id for r in tracking.load_runs(uri, "exp")] == [run_id]  # what `compare` sees
    old = client.get_run(stale_id)
    assert old.data.tags[tracking.SUPERSEDED_TAG] == run_id
    assert old.info.status == ("FAILED" if stale_status == "FAILED" else "KILLED")
    # and the state is now owned by the finished run: a third track adds nothing
    assert tracking.log_pipeline_run(uri, _inputs("s1", {"m": 2.0}))[:3:2] == (run_id, False)


def test_a_failed_log_leaves_the_state_free(tmp_path):
    """A run that fails while logging is marked FAILED and the next attempt logs the state afresh."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    broken = _inputs("s1", {"m": 1.0})
    broken.artifacts["x"] = [tmp_path / "does-not-exist.txt"]
    with pytest.raises(Exception):
        tracking.log_pipeline_run(uri, broken)
    run_id, _, created = tracking.log_pipeline_run(uri, _inputs("s1", {"m": 1.0}))
    assert created
    assert [r.run_id for r in tracking.load_runs(uri, "exp")] == [run_id]


def test_download_artifact_returns_the_file_or_none(tmp_path):
    """compare pairs runs through their items/<variant>/ files; a run without them gives None, not an error."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    items = tmp_path / "probes.jsonl"
    items.write_text('{"benchmark": "probe_ethical", "id": "p1", "scores": {"margin": 0.5}}\n')
    inputs = _inputs("s1", {"m": 1.0})
    inputs.artifacts["items/verbose"] = [items]
    run_id = tracking.log_pipeline_run(uri, inputs)[0]
    got = tracking.download_artifact(uri, run_id, "items/verbose/probes.jsonl", tmp_path / "dl")
    assert got is not None and got.read_text() == items.read_text()
    assert tracking.download_artifact(uri, run_id, "items/base/probes.jsonl", tmp_path / "dl") is None
    assert tracking.download_artifact(uri, run_id, "items/verbose/hhh.jsonl", tmp_path / "dl") is None


def test_experiment_opens_on_the_training_runs_view(tmp_path):
    """MLflow 3's UI picks an experiment's page from its ``mlflow.experimentKind`` tag; without it a fresh
    experiment opens on the (empty) GenAI traces overview."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.log_pipeline_run(uri, _inputs("s1", {"m": 1.0}))
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("exp").tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # an experiment made before the tag existed gets it on the next write
    client.create_experiment("old")
    tracking.save_runs_view(uri, "old", [])
    assert client.get_experiment_by_name("old").tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # and when `track` finds its state already logged
    older = client.create_experiment("older")
    assert tracking.open_experiment(uri, "older") == older
    assert client.get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_datasets_are_run_inputs_and_bookkeeping_is_an_artifact_not_metrics(tmp_path):
    from mlflow.tracking import MlflowClient

    from selfalign.lineage import DatasetRef

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    inputs = _inputs("s1", {"eval.base.truthfulqa_mc1": 0.3})
    inputs.bookkeeping = {"red_team.counts": {"all": 315}, "eval.base.truthfulqa_mc1_n": 24}
    inputs.datasets = [DatasetRef("data/prompts/all.jsonl", "0123abcd", "red_team"),
                       DatasetRef("data/self_align/train.jsonl", "4567ef01", "self_align")]
    run_id = tracking.log_pipeline_run(uri, inputs)[0]
    run = MlflowClient(uri).get_run(run_id)
    assert set(run.data.metrics) == {"eval.base.truthfulqa_mc1"}
    got = {d.dataset.name: (d.dataset.digest, json.loads(d.dataset.source)["uri"],
                            {t.key: t.value for t in d.tags}["mlflow.data.context"])
           for d in run.inputs.dataset_inputs}
    assert got == {"data/prompts/all.jsonl": ("0123abcd", "data/prompts/all.jsonl", "red_team"),
                   "data/self_align/train.jsonl": ("4567ef01", "data/self_align/train.jsonl", "self_align")}
    path = tracking.download_artifact(uri, run_id, tracking.BOOKKEEPING_ARTIFACT, tmp_path / "dl")
    assert json.loads(path.read_text()) == inputs.bookkeeping
