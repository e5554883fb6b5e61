"""selfalign.metrics_schema: every key of the committed metrics files is declared; headline vs bookkeeping."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from selfalign import metrics_schema as ms

ROOT = Path(__file__).resolve().parents[1]
# the metrics files the pipeline commits (cache: false): stage metrics and evaluation results
COMMITTED = [("stage", p) for p in sorted((ROOT / "metrics").glob("*.json"))] + \
            [("results", p) for p in sorted((ROOT / "eval/results").glob("*.json"))]


def _classify(kind: str, path: Path) -> ms.Classified:
    return ms.classify(kind, path.stem, json.loads(path.read_text(encoding="utf-8")), str(path.relative_to(ROOT)))


def test_the_repository_commits_metrics_files_of_every_kind():
    stems = {p.stem for _, p in COMMITTED}
    assert set(ms.STAGE_FILES) <= stems and {"base", "verbose", "vicuna"} <= stems


@pytest.mark.parametrize("kind,path", COMMITTED, ids=[str(p.relative_to(ROOT)) for _, p in COMMITTED])
def test_every_committed_key_is_declared_and_bookkeeping_is_not_a_metric(kind, path):
    """An undeclared key raises SchemaError naming the file and the key; bookkeeping never becomes a metric."""
    got = _classify(kind, path)
    assert not set(got.metrics) & set(got.bookkeeping)
    # the families the issue names as bookkeeping: sizes, reject/topic counts, judge tallies, timings, CI n's
    inside = (".counts.", ".per_type.", ".topics_per_type.", ".per_category.", ".judgments.", ".lmeval.",
              ".timing_s.", ".setup.", ".checks.", ".citations")
    assert not [k for k in got.metrics if any(m in k for m in inside) or k.endswith(("_n", "wall_time_s", "p_value"))]
    assert not [k for k in got.metrics if k.startswith(("prepare_model.", "fetch_benchmarks.", "red_team."))]
    assert all(isinstance(v, float) for v in got.metrics.values())


def test_committed_files_give_the_headline_metrics_compare_reads():
    merged = ms.Classified()
    for kind, path in COMMITTED:
        merged.update(_classify(kind, path))
    m = merged.metrics
    for name in ("eval.verbose.truthfulqa_mc1", "eval.verbose.truthfulqa_mc1_ci_low", "eval.verbose.hhh.overall",
                 "probe.engraved.ethical.margin", "probe_delta.verbose.ethical.margin", "distill.engrave.delta",
                 "distill.verbose_clone.delta_ci_high", "engrave.final_loss", "retention.mean_significant.margin",
                 "over_refusal.verbose.refusal_rate"):
        assert name in m, name
    # the judged pairs follow evaluate.judge.pairs (verbose vs the control since the control exists)
    assert [k for k in m if k.startswith("eval.vicuna.pairs.verbose_vs_") and k.endswith(".win_rate")]
    base = json.loads((ROOT / "eval/results/base.json").read_text())
    assert m["eval.base.truthfulqa_mc1"] == base["truthfulqa_mc1"]["value"]
    assert merged.bookkeeping["eval.base.truthfulqa_mc1_n"] == base["truthfulqa_mc1"]["n"]
    counts = json.loads((ROOT / "metrics/fetch_benchmarks.json").read_text())["counts"]
    assert merged.bookkeeping["fetch_benchmarks.counts"] == counts
    # the report repeats every variant's probe scores: logged once, from the results
    assert not [k for k in m if k.startswith("evaluate_report.probes.")]
    # the headline set (DVC's view, the run's MLflow metrics): values only, no CIs, a few dozen (issue 23): 13
    # engraved - control probe margins, 2 retention means, 2 NLL deltas, 10 harm rates and 8 marks, 10 benchmark
    # scores, 3 win rates
    head = ms.headline(m)
    assert len(head) == 48 and all(m[k] == v for k, v in head.items())
    assert not [k for k in head if k.endswith(("_ci_low", "_ci_high"))]
    sets = {k.split(".")[2] for k in m if k.startswith("probe_delta_vs_control.engraved.") and k.endswith(".margin")}
    assert len(sets) == 13 and {f"probe_delta_vs_control.engraved.{s}.margin" for s in sets} <= set(head)
    # dropped from the headline, still a metric (the run's metrics.json): the other variants' per-set deltas
    dropped = ("probe_delta_vs_control.verbose.ethical.margin", "probe_delta_vs_control.prompted.ethical.margin",
               "eval.verbose.truthfulqa_mc2", "engrave.final_loss", "over_refusal.verbose.refusal_rate")
    assert all(k in m and k not in head for k in dropped)


def test_every_ui_column_pattern_selects_a_committed_headline_metric(params_data):
    """`selfalign ui` shows headline columns only (the MLflow metrics): a pattern over a dropped name shows nothing."""
    from selfalign.ui import select_columns

    merged = ms.Classified()
    for kind, path in COMMITTED:
        merged.update(_classify(kind, path))
    head = ms.headline(merged.metrics)
    patterns = params_data["tracking"]["ui"]["columns"]
    assert [p for p in patterns if not select_columns([p], head)] == []


def test_an_undeclared_key_fails_naming_file_and_key(tmp_path):
    data = json.loads((ROOT / "metrics/engrave.json").read_text())
    with pytest.raises(ms.SchemaError, match=r"metrics/engrave\.json: key 'new_score' is not declared"):
        ms.classify("stage", "engrave", {**data, "new_score": 0.5}, "metrics/engrave.json")
    results = {"truthfulqa_mc1": {"value": 0.3, "n": 10, "ci_low": 0.1, "ci_high": 0.5}, "mystery": {"x": 1}}
    with pytest.raises(ms.SchemaError, match=r"eval/results/base\.json: key 'mystery\.x'"):
        ms.classify("results", "base", results, "eval/results/base.json")
    with pytest.raises(ms.SchemaError, match="no schema declared for stage metrics 'new_stage'"):
        ms.classify("stage", "new_stage", {}, "metrics/new_stage.json")


def test_epoch_selection_keys_the_saved_epoch_is_a_headline_the_curve_bookkeeping():
    """training/checkpoint.py: best_epoch is a metric; the per-epoch held-out curve and the rule are bookkeeping."""
    sel = {"select": "heldout_nll", "best_epoch": 2, "select_reason": "lowest held-out NLL",
           "heldout_nll_by_epoch": [3.0, 2.0, 1.5], "heldout_scoring_s": 0.1}
    got = ms.classify("stage", "engrave", sel, "metrics/engrave.json")
    assert got.metrics == {"engrave.best_epoch": 2.0}
    assert got.bookkeeping["engrave.heldout_nll_by_epoch"] == [3.0, 2.0, 1.5]
    assert set(got.bookkeeping) == {f"engrave.{k}" for k in sel if k != "best_epoch"}
    vc = {"select": "last", "best_epoch": 1, "heldout_nll_by_epoch": [3.0, 2.0], "train": sel}
    got = ms.classify("stage", "verbose_clone", vc, "metrics/verbose_clone.json")
    assert got.metrics == {"verbose_clone.best_epoch": 1.0}
    assert got.bookkeeping["verbose_clone.train"] == sel


def test_a_declared_shape_is_enforced():
    with pytest.raises(ms.SchemaError, match="'final_loss' is declared a number"):
        ms.classify("stage", "engrave", {"final_loss": "low"}, "metrics/engrave.json")
    with pytest.raises(ms.SchemaError, match="'truthfulqa_mc1' is declared as estimate"):
        ms.classify("results", "base", {"truthfulqa_mc1": 0.3}, "eval/results/base.json")


def test_estimates_deltas_and_bookkeeping_are_split_by_the_declaration():
    results = {"truthfulqa_mc1": {"value": 0.25, "n": 100, "ci_low": 0.17, "ci_high": 0.34},
               "hhh": {"harmless": {"value": 0.5, "n": 58, "ci_low": None, "ci_high": None}},
               "probes": {"ethical": {"margin": {"value": -0.2, "n": 14, "ci_low": -0.4, "ci_high": 0.1}}},
               "checks": {"engine_calls": 3}, "variant": "verbose"}
    got = ms.classify("results", "verbose", results, "verbose.json")
    assert got.metrics == {"eval.verbose.truthfulqa_mc1": 0.25, "eval.verbose.truthfulqa_mc1_ci_low": 0.17,
                           "eval.verbose.truthfulqa_mc1_ci_high": 0.34, "eval.verbose.hhh.harmless": 0.5,
                           "probe.verbose.ethical.margin": -0.2, "probe.verbose.ethical.margin_ci_low": -0.4,
                           "probe.verbose.ethical.margin_ci_high": 0.1}
    assert got.bookkeeping == {"eval.verbose.truthfulqa_mc1_n": 100, "eval.verbose.hhh.harmless_n": 58,
                               "probe.verbose.ethical.margin_n": 14, "eval.verbose.checks": {"engine_calls": 3},
                               "eval.verbose.variant": "verbose"}
    delta = {"diff": -0.26, "n": 14, "ci_low": -0.4, "ci_high": -0.1, "p_value": 0.002}
    report = {"retention": {"sets": {"ethical": {"margin": {"value": 0.55, "n": 9, "ci_low": 0.1, "ci_high": 0.9,
                                                            "significant_prompted": True, "undefined_share": 0.0}}}},
              "over_refusal": {"delta_vs_base_points": {"verbose": {**delta, "diff": 12.0}}}}
    got = ms.classify("stage", "evaluate_report", report, "evaluate_report.json")
    assert got.metrics == {"retention.ethical.margin": 0.55, "retention.ethical.margin_ci_low": 0.1,
                           "retention.ethical.margin_ci_high": 0.9, "retention.ethical.margin.significant_prompted": 1.0,
                           "over_refusal.verbose.delta_points": 12.0, "over_refusal.verbose.delta_points_ci_low": -0.4,
                           "over_refusal.verbose.delta_points_ci_high": -0.1}
    assert got.bookkeeping == {"retention.ethical.margin_n": 9, "retention.ethical.margin.undefined_share": 0.0,
                               "over_refusal.verbose.delta_points_n": 14, "over_refusal.verbose.delta_points_p_value": 0.002}


def test_read_loss_series(tmp_path):
    path = tmp_path / "engrave_loss.csv"
    path.write_text("step,loss,lr\n1,2.5,0.1\n2,2.0,0.2\n4,1.5,\n")
    assert ms.read_loss_series(path) == {"loss": [(1, 2.5), (2, 2.0), (4, 1.5)], "lr": [(1, 0.1), (2, 0.2)]}
    # the trainer's real CSV has exactly the declared columns
    shutil.copy(ROOT / "plots/engrave_loss.csv", tmp_path / "real.csv")
    assert set(ms.read_loss_series(tmp_path / "real.csv")) == set(ms.LOSS_SERIES)
    path.write_text("step,loss,grad_norm\n1,2.5,0.3\n")
    with pytest.raises(ms.SchemaError, match="grad_norm"):
        ms.read_loss_series(path)


def test_control_deltas_harm_rates_and_marks_are_headline_metrics():
    """What a run with the control logs: the do-no-harm rates per variant (results), the paired deltas vs the
    control and the worse-than-control marks (report); the rates, marks and the engraved model's probe margin
    deltas vs the control reach eval/headline.json, their CIs and bookkeeping do not."""
    est = {"value": 0.1, "n": 20, "ci_low": 0.0, "ci_high": 0.25}
    delta = {"diff": 0.3, "n": 14, "ci_low": 0.1, "ci_high": 0.5, "p_value": 0.01}
    merged = ms.Classified()
    for variant in ("base", "instructed", "prompted", "engraved", "verbose"):
        merged.update(ms.classify("results", variant, {"harm": {"degeneration": est, "harmful_refusal": est}},
                                  f"eval/results/{variant}.json"))
    margin = {"margin": delta, "behaviour": delta}
    report = {
        "variants": ["base", "instructed", "prompted", "engraved", "verbose"], "control": "instructed",
        "paired_vs_control": {"engraved": {"truthfulqa_mc1": delta}},
        "probes": {"ethical": {"variants": {}, "vs_control": {v: margin for v in ("base", "prompted", "engraved", "verbose")},
                               "vs_base": {"engraved": margin}}},
        "retention": {"teacher": "prompted", "student": "engraved", "control": "instructed", "sets": {},
                      "mean_over_significant": {}},
        "harm": {"control": "instructed",
                 "delta_vs_control": {"engraved": {"degeneration": delta, "harmful_refusal": {**delta, "diff": -0.2}}},
                 "worse_than_control": {"engraved": {"degeneration": True, "harmful_refusal": False}}},
        "over_refusal": {"set": "over-refusal", "refusal_rate": {}, "delta_vs_control_points": {"engraved": delta},
                         "delta_vs_base_points": {}},
    }
    merged.update(ms.classify("stage", "evaluate_report", report, "metrics/evaluate_report.json"))
    m, book = merged.metrics, merged.bookkeeping
    assert m["harm.engraved.degeneration"] == 0.1 and m["harm.verbose.harmful_refusal_ci_high"] == 0.25
    assert m["harm_delta_vs_control.engraved.harmful_refusal"] == -0.2
    assert m["worse_than_control.engraved.degeneration"] == 1.0
    assert m["worse_than_control.engraved.harmful_refusal"] == 0.0
    assert m["probe_delta_vs_control.engraved.ethical.margin"] == 0.3
    assert m["probe_delta.engraved.ethical.margin"] == 0.3  # vs base: the name logged before the control
    assert m["evaluate_report.paired_vs_control.engraved.truthfulqa_mc1"] == 0.3
    assert m["over_refusal.engraved.delta_points_vs_control"] == 0.3
    assert book["evaluate_report.control"] == "instructed" and book["harm_delta_vs_control.engraved.degeneration_n"] == 14
    head = ms.headline(m)
    assert {f"harm.{v}.{k}" for v in report["variants"] for k in ("degeneration", "harmful_refusal")} <= set(head)
    assert {"worse_than_control.engraved.degeneration", "worse_than_control.engraved.harmful_refusal"} <= set(head)
    # per-set probe deltas of the engraved model only; the prompted and verbose ones are metrics, not headline
    assert "probe_delta_vs_control.engraved.ethical.margin" in head
    assert {f"probe_delta_vs_control.{v}.ethical.margin" for v in ("prompted", "verbose")} <= set(m) - set(head)
    # the control's own effect on base, behaviour deltas, CIs and the vs-base names stay out of the DVC view
    assert not [k for k in head if k.endswith(("_ci_low", "_ci_high", ".behaviour")) or "probe_delta." in k
                or k.startswith("probe_delta_vs_control.base.")]
