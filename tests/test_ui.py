"""selfalign ui: the saved runs view (headline columns the runs logged) and the URL that opens it, real store."""

from __future__ import annotations

import json

from selfalign import tracking, ui


def test_select_columns_in_pattern_order_without_bounds():
    names = ["eval.v.mc1", "eval.v.mc1_ci_low", "eval.v.mc1_ci_high", "harm.v.b", "harm.v.a", "eval.base.mc1"]
    assert ui.select_columns(["harm.v.*", "eval.v.*", "harm.v.a"], names) == ["harm.v.a", "harm.v.b", "eval.v.mc1"]
    assert ui.select_columns(["nothing.*"], names) == []


def test_ui_url_only_saves_the_view_of_the_logged_headline_columns(tmp_path, monkeypatch, params_data, capsys):
    import yaml
    from mlflow.tracking import MlflowClient

    from selfalign.cli import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params_data["tracking"]["experiment_name"] = "exp"
    params_data["tracking"]["ui"].update(port=5123, columns=["eval.verbose.*", "harm.verbose.*"])
    metrics = {"eval.verbose.truthfulqa_mc1": 0.3, "eval.verbose.truthfulqa_mc1_ci_low": 0.2,
               "eval.verbose.truthfulqa_mc1_ci_high": 0.4, "harm.verbose.degeneration": 0.1, "probe.x": 1.0}
    inputs = tracking.TrackInputs(experiment_name="exp", params={}, resolved_config={}, metrics=metrics,
                                  headline=["eval.verbose.truthfulqa_mc1", "harm.verbose.degeneration"],
                                  tags={"ablation": "full"}, state_id="s1", run_name="full")
    _, exp_id, _ = tracking.log_pipeline_run(uri, inputs)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(params_data))
    assert main(["ui", "--params", str(params), "--root", str(tmp_path), "--url-only"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == (f"runs table (2 headline columns): http://127.0.0.1:5123/#/experiments/{exp_id}/runs"
                           f"?workflowType=machine_learning&viewStateShareKey={tracking.RUNS_VIEW_KEY}")
    tags = MlflowClient(uri).get_experiment(exp_id).tags
    view = json.loads(tags[tracking.SHARED_VIEW_TAG_PREFIX + tracking.RUNS_VIEW_KEY])
    assert view["selectedColumns"][1:] == ["metrics.`eval.verbose.truthfulqa_mc1`", "metrics.`harm.verbose.degeneration`"]


def test_mlflow_ui_command_serves_the_project_store():
    cmd = ui.mlflow_ui_command("sqlite:////x/mlflow.db", "127.0.0.1", 5000)
    assert cmd[1:] == ["-m", "mlflow", "ui", "--backend-store-uri", "sqlite:////x/mlflow.db", "--host", "127.0.0.1",
                       "--port", "5000", "--workers", "1"]
