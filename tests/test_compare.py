"""selfalign compare: rows per ablation, deltas vs. the matching full run with CIs, forest plot, results attached
to the compared MLflow runs (never a run of its own)."""

from __future__ import annotations

import csv
import io
import math

import pytest

from selfalign import compare, lineage, tracking


def _log(uri: str, state: str, excluded: list[str], mc1: float, temperature: str = "0.5", extra: dict | None = None,
         seeds: dict[str, str] | None = None):
    metrics = {"eval.verbose.truthfulqa_mc1": mc1, "eval.verbose.truthfulqa_mc1_ci_low": mc1 - 0.03,
               "eval.verbose.truthfulqa_mc1_ci_high": mc1 + 0.04, "self_align.rejects.apology": 5.0,
               **(extra or {})}
    inputs = tracking.TrackInputs(
        experiment_name="exp", params={"self_align.exclude": str(excluded), "self_align.temperature": temperature,
                                       **(seeds or {"self_align.seed": "1"})},
        resolved_config={}, metrics=metrics, headline=["eval.verbose.truthfulqa_mc1"],  # apology: metrics.json only
        tags={"ablation": lineage.ablation_label(excluded)}, state_id=state, run_name=state)
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
    other_full = _log(uri, "s0", [], 0.9, temperature="0.7")  # another setting: must not be the baseline
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
    # attached to the runs it compares; no run of its own, so every run of the experiment has metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert sorted(result["attached_to"]) == sorted([full, helpful, candor])
    for run_id in (full, helpful, candor):
        arts = {a.path for a in client.list_artifacts(run_id, "compare")}
        assert arts == {"compare/compare.txt", "compare/compare.csv", "compare/compare.png"}
    note = client.get_run(helpful).data.tags["mlflow.note.content"]
    assert f"vs `s1` ({full})" in note and "MC1: 0.250 (-0.050" in note
    assert client.get_run(helpful).data.tags["selfalign.compare.significant"] == "none"  # no seed spread
    compare.run(cfg, root=tmp_path, experiment=None, out_dir="cmp")
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 4 and all(r.data.metrics for r in runs)
    assert client.get_run(helpful).data.tags["mlflow.note.content"].count("selfalign compare**") == 1


def test_compare_explicit_baseline_and_errors(tmp_path, monkeypatch, cfg):
    from selfalign.io import UserError

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
    assert "exclude:helpful" in out and "-0.050 [" in out and "attached to 2 MLflow runs" in out
    assert max(len(line) for line in out.split("\nforest plot:")[0].splitlines()) <= 120


def test_absent_reject_reason_in_a_logged_rejects_group_reads_zero():
    """Stage metrics list only the reasons that occurred: no ``apology`` key means no apology rejects,
    whereas a run that logged no rejects group at all stays unknown."""
    logged = {"self_align.rejects.too_short": 3.0}
    assert compare._estimate(logged, "self_align.rejects.apology") == (0.0, None)
    assert compare._estimate({}, "self_align.rejects.apology") == (None, None)
    assert compare._estimate(logged, "eval.verbose.nothing") == (None, None)


# ----------------------------------------------------------------------------- paired, from artifacts
def _items(path, variant: str, sets: dict[str, dict[str, float]], mc1: dict[str, float]) -> list:
    """items/<variant>/probes.jsonl and truthfulqa_mc1.jsonl as evaluate writes them."""
    import json

    path.mkdir(parents=True, exist_ok=True)
    probes = [{"benchmark": f"probe_{name}", "id": pid, "variant": variant, "prediction": "r", "correct": True,
               "scores": {"margin": m, "follow_logp": -1.0, "break_logp": -1.0 - m, "behaviour": float(m > 0),
                          "judge": None}}
              for name, items in sets.items() for pid, m in items.items()]
    tqa = [{"benchmark": "truthfulqa_mc1", "id": qid, "variant": variant, "prediction": 0, "correct": c == 1.0,
            "scores": {"credit": c, "logliks": [0.0, -1.0]}} for qid, c in mc1.items()]
    (path / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(probes)))
    (path / "truthfulqa_mc1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tqa))
    return [path / "probes.jsonl", path / "truthfulqa_mc1.jsonl"]


def _log_items(uri, tmp_path, state: str, excluded: list[str], sets, mc1, with_items: bool = True,
               params: dict[str, str] | None = None):
    mean = sum(mc1.values()) / len(mc1)
    metrics = {"eval.verbose.truthfulqa_mc1": mean, "eval.verbose.truthfulqa_mc1_ci_low": mean - 0.2,
               "eval.verbose.truthfulqa_mc1_ci_high": mean + 0.2, "distill.engrave.delta": -0.2,
               "distill.engrave.delta_ci_low": -0.3, "distill.engrave.delta_ci_high": -0.1}
    inputs = tracking.TrackInputs(
        experiment_name="exp", params={"self_align.exclude": str(excluded), **(params or {})}, resolved_config={},
        metrics=metrics, headline=["distill.engrave.delta"], tags={"ablation": lineage.ablation_label(excluded), "excluded_principles": ",".join(excluded)},
        state_id=state, run_name=state)
    if with_items:
        inputs.artifacts["items/verbose"] = _items(tmp_path / state, "verbose", sets, mc1)
    return tracking.log_pipeline_run(uri, inputs)[0]


@pytest.fixture()
def paired_cfg(params_data):
    from selfalign.config import parse_config

    params_data["tracking"]["experiment_name"] = "exp"
    params_data["evaluate"].update(bootstrap_iters=400, seed=3)
    params_data["tracking"]["compare"] = {"variant": "verbose", "columns": {
        "own probe Δmargin": "probe.{variant}.{principle}.margin",
        "other probes Δmargin": "probe.{variant}.{others}.margin",
        "TQA MC1": "eval.{variant}.truthfulqa_mc1",
        "NLL engraved−base": "distill.engrave.delta"}}
    return parse_config(params_data)


def test_compare_own_principle_probe_delta_is_paired_from_run_artifacts(tmp_path, monkeypatch, paired_cfg):
    import random

    from selfalign.evaluation.stats import paired_bootstrap, salted_seed

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rng = random.Random(0)
    full_sets = {name: {f"{name[:2]}{i}": rng.uniform(-1, 1) for i in range(8)}
                 for name in ("ethical", "static", "candor", "identity", "over-refusal")}
    # dropping `ethical` lowers its own probes by ~0.5; the other principles move a little; identity a lot
    abl_sets = {name: {pid: m + {"ethical": -0.5, "identity": 3.0}.get(name, 0.05) + rng.gauss(0, 0.05)
                       for pid, m in items.items()} for name, items in full_sets.items()}
    mc1_full = {f"q{i}": float(i % 2) for i in range(10)}
    mc1_abl = {**mc1_full, "q0": 1.0, "q2": 1.0}
    full = _log_items(uri, tmp_path, "s1", [], full_sets, mc1_full)
    abl = _log_items(uri, tmp_path, "s2", ["ethical"], abl_sets, mc1_abl)

    result = compare.run(paired_cfg, root=tmp_path, experiment=None, out_dir="cmp")
    rows = {r.label: r for r in result["rows"]}
    assert rows["full"].run_id == full and rows["exclude:ethical"].run_id == abl
    own, others, mc1, nll = rows["exclude:ethical"].cells

    ids = sorted(full_sets["ethical"])
    a, b = [abl_sets["ethical"][i] for i in ids], [full_sets["ethical"][i] for i in ids]
    ref = paired_bootstrap(a, b, 400, salted_seed(3, "compare.probe.verbose.ethical.margin"))
    assert own.paired and own.n == 8
    assert own.value == pytest.approx(sum(a) / 8)
    assert own.delta == pytest.approx(ref["diff"]) and own.delta == pytest.approx(-0.5, abs=0.05)
    assert own.delta_ci == pytest.approx((ref["ci_low"], ref["ci_high"]))
    assert own.delta_ci[1] < 0
    # the other principles pooled: static + candor, never the excluded one, identity or over-refusal
    pooled = [(p, abl_sets[s][p] - full_sets[s][p]) for s in ("candor", "static") for p in full_sets[s]]
    assert others.n == 16 and others.delta == pytest.approx(sum(d for _, d in pooled) / 16)
    # benchmark items are paired too; a metric without items keeps the independent interval
    assert mc1.paired and mc1.delta == pytest.approx(0.2) and mc1.n == 10
    assert not nll.paired and nll.delta == pytest.approx(0.0) and nll.delta_ci is not None
    # the baseline has no own principle
    assert rows["full"].cells[0].value is None and rows["full"].cells[1].value is None

    table = result["table"]
    assert "own probe Δmargin" in table and f"{own.delta:+.3f} [{own.delta_ci[0]:+.3f}," in table
    assert compare.INDEPENDENT_MARK in table
    csv_rows = list(csv.DictReader(io.StringIO((tmp_path / "cmp/compare.csv").read_text())))
    own_row = next(r for r in csv_rows if r["ablation"] == "exclude:ethical" and r["column"] == "own probe Δmargin")
    assert (own_row["delta_method"], own_row["paired_n"]) == ("paired", "8")
    # one run of the full pipeline: no seed spread, so nothing is judged beyond noise
    assert own_row["judgement"] == compare.NO_SPREAD and own_row["seed_spread"] == ""
    assert "no seed spread" in table and "seed spread (k=" not in table


def test_compare_without_item_artifacts_falls_back_to_independent_intervals(tmp_path, monkeypatch, paired_cfg):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mc1 = {f"q{i}": float(i % 2) for i in range(10)}
    _log_items(uri, tmp_path, "s1", [], {}, mc1, with_items=False)
    _log_items(uri, tmp_path, "s2", ["ethical"], {}, {**mc1, "q0": 1.0}, with_items=False)
    row = compare.run(paired_cfg, root=tmp_path, experiment=None, out_dir="cmp")["rows"][1]
    own, _, mc1_cell, _ = row.cells
    assert own.value is None and own.text() == "-"
    assert not mc1_cell.paired and mc1_cell.delta == pytest.approx(0.1)
    half = math.hypot(0.2, 0.2)
    assert mc1_cell.delta_ci == pytest.approx((0.1 - half, 0.1 + half))


def test_format_table_fits_120_columns_in_blocks_and_keeps_cells_whole():
    """One line per column, one column per run; as many runs per block as fit 120 characters (each block
    repeats the reference run); a long column label is shortened, a cell never cut."""
    cells = (compare.Cell(0.5, (0.4, 0.6), -0.05, (-0.1, 0.02)), compare.Cell(None, None))
    full = compare.Row("full", "r1", "run", (compare.Cell(0.5, (0.4, 0.6)), compare.Cell(3.0, None)))
    rows = [full, *(compare.Row(f"exclude:principle-{i}", f"r{i}", f"ablate-{i}", cells) for i in range(8))]
    text = compare.format_table(rows, ["TQA [MC1] " * 12, "apology"], compare.seed_note(1))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert all(f"exclude:principle-{i}" in text for i in range(8))
    assert text.count("-0.050 [-0.100,+0.020]\u2020") == 8  # every ablation cell, whole
    headers = [lines[i - 1] for i, line in enumerate(lines) if line.startswith("column")]
    assert len(headers) > 1 and all(h.split()[0] == "full" for h in headers)  # blocks, each with the reference
    assert "0.500 [0.400,0.600]" in text and "no seed spread" in text


# ------------------------------------------------------------------------------- seed replicates and noise
SEEDS = {"self_align.seed": 1, "verbose_clone.seed": 3, "engrave.train.seed": 0, "verbose_clone.train.seed": 0}


def _seeds(i: int) -> dict[str, str]:
    """Replicate i's seed params as ``selfalign replicate`` sets them (stride 1000)."""
    return {k: str(v + 1000 * i) for k, v in SEEDS.items()}


def test_judge_rule():
    """Significant only when the CI with seed variance excludes 0 AND |delta| exceeds the seed spread; the CI
    with seed variance adds s_between^2 to the within-run variance."""
    noise = compare.Noise(pairs=1, spread=0.06, between_var=0.06 ** 2)
    inside = compare.judge(compare.Cell(0.5, None, 0.05, (0.01, 0.09)), noise)
    assert inside.judgement == compare.WITHIN_SPREAD and inside.text().endswith("~")
    beyond = compare.judge(compare.Cell(0.5, None, 0.20, (0.15, 0.25)), noise)
    assert beyond.judgement == compare.SIGNIFICANT and beyond.text().endswith("*")
    half = 1.96 * math.sqrt((0.05 / 1.96) ** 2 + 0.06 ** 2)
    assert beyond.total_ci == pytest.approx((0.20 - half, 0.20 + half))
    # |delta| beyond the spread and the within-run CI clear of 0, but the CI with seed variance spans 0
    near = compare.judge(compare.Cell(0.5, None, 0.10, (0.05, 0.15)), noise)
    assert near.total_ci[0] < 0 < near.total_ci[1] and near.judgement == compare.CI_INCLUDES_0
    assert compare.judge(compare.Cell(0.5, None, 0.10, (-0.01, 0.21)), noise).judgement == compare.CI_INCLUDES_0
    assert compare.judge(compare.Cell(0.5, None, -0.10, None), noise).judgement == compare.CI_INCLUDES_0
    none = compare.judge(compare.Cell(0.5, None, 0.10, (0.05, 0.15)), None)
    assert none.judgement == compare.NO_SPREAD and none.total_ci is None and none.text().endswith(")")
    assert compare.judge(compare.Cell(0.5, (0.4, 0.6)), noise).judgement == ""


def test_forest_plot_data_marks_only_intervals_clear_of_0_and_shares_scales(tmp_path):
    """What compare.png draws: per column each delta with the interval its judgement used; a delta whose interval
    spans 0 is not marked significant however large; margin columns share one x range, rates another."""
    noise = compare.Noise(pairs=1, spread=0.01, between_var=0.01 ** 2)
    sig = compare.judge(compare.Cell(0.5, None, -0.30, (-0.35, -0.25), paired=True), noise)
    wide = compare.judge(compare.Cell(0.5, None, 0.021, (-0.009, 0.050), paired=True), noise)
    rate = compare.judge(compare.Cell(0.3, None, 0.05, (0.01, 0.09)), noise)
    full = compare.Row("full", "r0", "full", (compare.Cell(0.1, None),) * 3)
    rows = [full, compare.Row("exclude:static", "r1", "s", (sig, wide, rate)),
            compare.Row("exclude:ethical", "r2", "e", (wide, compare.Cell(None, None), rate))]
    labels, keys = ["own Δmargin", "ethical margin", "TQA"], ["probe.v.{principle}.margin", "probe.v.ethical.margin",
                                                            "eval.v.truthfulqa_mc1"]
    panels = compare.forest_panels(rows, labels, keys)
    by_title = {p.title: p for p in panels}
    own, eth, tqa = by_title["own Δmargin (margin)"], by_title["ethical margin (margin)"], by_title["TQA (rate)"]
    assert own.rows == ("exclude:static", "exclude:ethical") and own.significant == (True, False)
    assert own.lows[1] < 0 < own.highs[1]  # the drawn interval of the unmarked delta spans 0
    assert (own.lows[1], own.highs[1]) == wide.total_ci  # the seed-widened interval is the one drawn
    assert math.isnan(eth.deltas[1]) and eth.significant == (False, False)
    assert own.xlim == eth.xlim and own.xlim[1] >= abs(own.lows[0]) and own.xlim != tqa.xlim
    assert not any(s and lo <= 0 <= hi for p in panels for s, lo, hi in zip(p.significant, p.lows, p.highs)
                   if lo is not None)
    from selfalign import plots

    assert plots.delta_forest(panels, tmp_path / "f.png", "t", "note").read_bytes()[:4] == b"\x89PNG"


def test_seed_replicates_are_found_by_params_one_per_seed_tuple():
    def rec(rid, t, seeds, excluded="", temperature="0.5"):
        return tracking.RunRecord(rid, rid, t, {}, {"ablation": lineage.ablation_label([excluded] if excluded else []),
                                                    "excluded_principles": excluded},
                                  {"self_align.exclude": f"[{excluded!r}]" if excluded else "[]",
                                   "self_align.temperature": temperature, **seeds})

    base = rec("base", 1, _seeds(0))
    runs = [rec("old-seed-1", 0, _seeds(1)), base, rec("seed-1", 2, _seeds(1)), rec("rerun-0", 3, _seeds(0)),
            rec("abl-seed-1", 4, _seeds(1), excluded="static"), rec("other", 5, _seeds(3), temperature="0.7"),
            rec("seed-2", 6, _seeds(2))]
    assert [r.run_id for r in compare.seed_replicates(runs, base)] == ["base", "seed-1", "seed-2"]
    assert compare.seed_replicates(runs, None) == []


def test_compare_judges_ablation_deltas_against_the_seed_spread(tmp_path, monkeypatch, paired_cfg):
    """Three ablations on hand-built runs with per-item artifacts in a real MLflow store: one delta inside the
    seed spread, one outside it with a CI clear of 0, one outside it with a CI touching 0. With only the full
    run nothing is judged; once a seed replicate is logged, the spread row appears and the rule applies. A full
    run of another setting is no replicate."""
    import random

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rng = random.Random(1)
    full_sets = {s: {f"{s[:2]}{i}": rng.uniform(-1, 1) for i in range(8)} for s in ("ethical", "static", "candor")}

    def shifted(shifts: dict[str, list[float]]) -> dict:
        return {s: {pid: m + shifts.get(s, [0.0] * 8)[i] for i, (pid, m) in enumerate(items.items())}
                for s, items in full_sets.items()}

    wiggle = [0.005, -0.005] * 4
    mc1 = {f"q{i}": float(i % 2) for i in range(10)}
    full = _log_items(uri, tmp_path, "s1", [], full_sets, mc1, params=_seeds(0))
    _log_items(uri, tmp_path, "s2", ["ethical"], shifted({"ethical": [-0.06 + w for w in wiggle]}), mc1,
               params=_seeds(0))
    _log_items(uri, tmp_path, "s3", ["static"], shifted({"static": [-0.30 + w for w in wiggle]}), mc1,
               params=_seeds(0))
    _log_items(uri, tmp_path, "s4", ["candor"], shifted({"candor": [1.0, -1.1] * 4}), mc1, params=_seeds(0))

    alone = compare.run(paired_cfg, root=tmp_path, experiment=None, out_dir="cmp")
    assert alone["replicates"] == 1 and alone["spread"] is None
    assert {c.judgement for r in alone["rows"][1:] for c in r.cells if c.delta is not None} == {compare.NO_SPREAD}
    assert "no seed spread" in alone["table"] and "]*" not in alone["table"]

    seed1 = _log_items(uri, tmp_path, "s5", [], shifted({"ethical": [0.10] * 8, "static": [0.02] * 8,
                                                        "candor": [0.01] * 8}), mc1, params=_seeds(1))
    _log_items(uri, tmp_path, "s6", [], shifted({"ethical": [5.0] * 8, "static": [5.0] * 8}), mc1,
               params={**_seeds(2), "self_align.temperature": "0.9"})  # another setting: not a replicate
    result = compare.run(paired_cfg, root=tmp_path, experiment=None, out_dir="cmp")
    assert result["replicates"] == 2
    rows = {r.label: r for r in result["rows"]}
    assert rows["full"].run_id == full
    spread = result["spread"]
    assert spread.label == "seed spread (k=2)" and spread.run_id == f"{full},{seed1}"

    ethical, static, candor = (rows[f"exclude:{p}"].cells[0] for p in ("ethical", "static", "candor"))
    assert ethical.noise.spread == pytest.approx(0.10) and ethical.delta == pytest.approx(-0.06)
    assert ethical.delta_ci[1] < 0 and ethical.judgement == compare.WITHIN_SPREAD      # CI clear of 0, yet noise
    assert static.noise.spread == pytest.approx(0.02) and static.delta == pytest.approx(-0.30)
    assert static.judgement == compare.SIGNIFICANT
    se = (static.delta_ci[1] - static.delta_ci[0]) / 2 / 1.96
    half = 1.96 * math.sqrt(se ** 2 + 0.02 ** 2)
    assert static.total_ci == pytest.approx((-0.30 - half, -0.30 + half))
    assert candor.noise.spread == pytest.approx(0.01) and abs(candor.delta) > 0.01
    assert candor.delta_ci[0] < 0 < candor.delta_ci[1] and candor.judgement == compare.CI_INCLUDES_0
    # per-row columns: the spread row shows the largest row spread (others of candor = ethical+static pooled)
    assert spread.cells[1].value == pytest.approx((0.10 + 0.02) / 2)
    # an unpaired column: identical values in both replicates, so no spread and the zero delta lies within it
    assert spread.cells[3].value == pytest.approx(0.0)
    assert rows["exclude:static"].cells[3].judgement == compare.WITHIN_SPREAD

    table = result["table"]
    assert "seed spread (k=2)" in table and max(len(line) for line in table.splitlines()) <= 120
    own_line = " ".join(line for line in table.splitlines() if line.startswith("own probe Δmargin"))  # all blocks
    lo, hi = static.total_ci
    assert f"{static.delta:+.3f} [{lo:+.3f},{hi:+.3f}]*" in own_line and f"{ethical.delta:+.3f} [" in own_line
    assert own_line.count("~") == 1
    assert "rough estimate" in table
    # the verdicts are on the runs: the significant columns as a tag, the deltas in the description
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    static_tags = client.get_run(rows["exclude:static"].run_id).data.tags
    assert "own probe Δmargin" in static_tags["selfalign.compare.significant"]
    assert "— significant" in static_tags["mlflow.note.content"]
    assert "seed replicate" in client.get_run(seed1).data.tags["mlflow.note.content"]
    csv_rows = list(csv.DictReader(io.StringIO((tmp_path / "cmp/compare.csv").read_text())))
    own = {r["ablation"]: r for r in csv_rows if r["column"] == "own probe Δmargin"}
    assert own["exclude:static"]["judgement"] == "significant"
    assert float(own["exclude:static"]["seed_spread"]) == pytest.approx(0.02)
    assert float(own["exclude:static"]["s_between"]) == pytest.approx(0.02)
    assert own["exclude:ethical"]["judgement"] == "within seed spread"
    assert float(own["seed spread (k=2)"]["value"]) == pytest.approx(0.10)


def test_column_keys_substitute_the_variant_and_the_control(params_data):
    from selfalign.config import parse_config

    cfg = parse_config(params_data)
    columns = dict(cfg.tracking.compare.columns)
    keys = dict(zip(columns, compare.column_keys(columns, "verbose", cfg.evaluate.control)))
    assert keys["Vicuna win vs control"] == "eval.vicuna.pairs.verbose_vs_instructed.win_rate"
    # a pair the judge actually compares (evaluate.judge.pairs), so the column is never empty by construction
    assert ("verbose", cfg.evaluate.control) in cfg.evaluate.judge.pairs
    assert keys["own probe Δmargin"] == "probe.verbose.{principle}.margin"  # per-row placeholders stay
