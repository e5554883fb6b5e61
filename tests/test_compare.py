"""selfalign compare: rows per ablation, deltas vs. the matching full run with CIs, heatmap, MLflow log."""

from __future__ import annotations

import math

import pytest

from selfalign import compare, tracking


def _log(uri: str, state: str, excluded: list[str], mc1: float, seed: str = "1", extra: dict | None = None):
    metrics = {"eval.verbose.truthfulqa_mc1": mc1, "eval.verbose.truthfulqa_mc1_ci_low": mc1 - 0.03,
               "eval.verbose.truthfulqa_mc1_ci_high": mc1 + 0.04, "self_align.rejects.apology": 5.0,
               **(extra or {})}
    inputs = tracking.TrackInputs(
        experiment_name="exp", params={"self_align.exclude": str(excluded), "self_align.seed": seed},
        resolved_config={}, metrics=metrics, histories={},
        tags={"ablation": tracking.ablation_label(excluded)}, state_id=state, run_name=state)
    return tracking.log_pipeline_run(uri, inputs)[0]


@pytest.fixture()
def cfg(params_data):
    from selfalign.config import parse_config

    params_data["tracking"]["experiment_name"] = "exp"
    params_data["tracking"]["compare"] = {"variant": "verbose", "columns": {
        "MC1": "eval.{variant}.truthfulqa_mc1", "apology": "self_align.rejects.apology",
        "missing": "eval.{variant}.nothing"}}
    return parse_config(params_data)


def test_delta_cell_combines_halfwidths():
    base = compare.Cell(0.5, (0.4, 0.6))
    cell = compare.delta_cell(0.6, (0.55, 0.65), base)
    assert cell.delta == pytest.approx(0.1)
    half = math.hypot(0.05, 0.1)
    assert cell.delta_ci == pytest.approx((0.1 - half, 0.1 + half))
    assert compare.delta_cell(None, None, base).delta is None
    assert compare.delta_cell(0.6, None, base).delta_ci is None


def test_compare_rows_deltas_and_outputs(tmp_path, monkeypatch, cfg):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    other_full = _log(uri, "s0", [], 0.9, seed="7")          # another setting: must not be the baseline
    full = _log(uri, "s1", [], 0.30)
    helpful = _log(uri, "s2", ["helpful"], 0.25)
    candor = _log(uri, "s3", ["candor"], 0.34, extra={"self_align.rejects.apology": 9.0})
    result = compare.run(cfg, root=tmp_path, experiment=None, out_dir="cmp")
    rows = {r.label: r for r in result["rows"]}
    assert [r.label for r in result["rows"]] == ["full", "exclude:candor", "exclude:helpful"]
    assert rows["full"].run_id == full != other_full
    assert rows["exclude:helpful"].run_id == helpful and rows["exclude:candor"].run_id == candor
    mc1 = rows["exclude:helpful"].cells[0]
    assert mc1.delta == pytest.approx(-0.05)
    half = math.hypot(0.035, 0.035)
    assert mc1.delta_ci == pytest.approx((-0.05 - half, -0.05 + half))
    assert rows["exclude:candor"].cells[1].delta == pytest.approx(4.0)
    assert rows["exclude:candor"].cells[2].value is None
    table = result["table"]
    assert "-0.050" in table and "+0.040" in table and "exclude:helpful" in table
    for name in ("compare.txt", "compare.csv", "compare.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    # logged to a compare run, which is not a pipeline run; re-running reuses it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    arts = {a.path for a in client.list_artifacts(result["compare_run"], "comparison")}
    assert arts == {"comparison/compare.txt", "comparison/compare.csv", "comparison/compare.png"}
    assert compare.run(cfg, root=tmp_path, experiment=None, out_dir="cmp")["compare_run"] == result["compare_run"]
    assert len(tracking.load_runs(uri, "exp")) == 4


def test_compare_explicit_baseline_and_errors(tmp_path, monkeypatch, cfg):
    from selfalign.cli import UserError

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(UserError, match="no finished pipeline runs"):
        compare.run(cfg, root=tmp_path, experiment=None, out_dir="cmp")
    first = _log(uri, "s1", [], 0.30)
    _log(uri, "s2", [], 0.40)
    abl = _log(uri, "s3", ["helpful"], 0.35)
    rows = compare.run(cfg, root=tmp_path, experiment=None, out_dir="cmp", baseline_run=first)["rows"]
    assert rows[0].run_id == first and rows[1].run_id == abl
    assert rows[1].cells[0].delta == pytest.approx(0.05)
    with pytest.raises(UserError, match="no pipeline run with id"):
        compare.run(cfg, root=tmp_path, experiment=None, out_dir="cmp", baseline_run="nope")


def test_compare_cli_prints_table(tmp_path, monkeypatch, cfg, capsys):
    import yaml

    from selfalign.cli import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _log(uri, "s1", [], 0.30)
    _log(uri, "s2", ["helpful"], 0.25)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["compare", "--params", str(params), "--root", str(tmp_path), "--out-dir", "cmp"]) == 0
    out = capsys.readouterr().out
    assert "exclude:helpful" in out and "(-0.050" in out


def test_absent_reject_reason_in_a_logged_rejects_group_reads_zero():
    """Stage metrics list only the reasons that occurred: no ``apology`` key means no apology rejects,
    whereas a run that logged no rejects group at all stays unknown."""
    logged = {"self_align.rejects.too_short": 3.0}
    assert compare._estimate(logged, "self_align.rejects.apology") == (0.0, None)
    assert compare._estimate({}, "self_align.rejects.apology") == (None, None)
    assert compare._estimate(logged, "eval.verbose.nothing") == (None, None)
