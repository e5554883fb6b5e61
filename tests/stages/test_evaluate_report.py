"""evaluate_report on synthetic eval/results + eval/samples trees (the results contract), no model.

The statistics are checked against brute-force references written with plain loops: pairing by
(benchmark, id) whatever the file order, the seed derived from the metric name, the joint resampling of
retention, and the refusal / length summaries.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from selfalign.evaluation.stats import salted_seed
from selfalign.stages import evaluate_report

VARIANTS = ("base", "instructed", "prompted", "engraved", "verbose")


def _percentile(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile, by hand."""
    xs = sorted(values)
    pos = q / 100 * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _resamples(seed: int, name: str, iters: int, n: int) -> list[list[int]]:
    rng = np.random.default_rng(salted_seed(seed, name))
    return [list(rng.integers(0, n, size=n)) for _ in range(iters)]


def _write_variant(root: Path, variant: str, probes: dict[str, dict[str, tuple[float, float]]],
                   answers: dict[str, str] | None, shuffle: int | None = None) -> None:
    """eval/samples/<variant>/probes.jsonl (+ vicuna_answers.jsonl) and eval/results/<variant>.json."""
    from selfalign.evaluation.stats import bootstrap_ci

    recs = [{"benchmark": f"probe_{name}", "id": pid, "variant": variant, "prediction": "r", "correct": b == 1.0,
             "scores": {"margin": m, "follow_logp": -1.0, "break_logp": -1.0 - m, "behaviour": b, "judge": None}}
            for name, items in probes.items() for pid, (m, b) in items.items()]
    if shuffle is not None:
        random.Random(shuffle).shuffle(recs)
    sdir = root / "samples" / variant
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    results: dict = {"variant": variant, "probes": {}}
    for name, items in probes.items():
        results["probes"][name] = {
            "margin": bootstrap_ci([m for m, _ in items.values()], 200, salted_seed(1, f"probe.{name}.margin")),
            "behaviour": bootstrap_ci([b for _, b in items.values()], 200, salted_seed(1, f"probe.{name}.behaviour")),
        }
    if answers is not None:
        (sdir / "vicuna_answers.jsonl").write_text("".join(
            json.dumps({"id": qid, "category": "generic", "question": "q", "variant": variant, "answer": text,
                        "finish": "length" if len(text) > 30 else "stop", "prompt_tokens": 5,
                        "completion_tokens": len(text) // 4, "sampling": {}}) + "\n"
            for qid, text in answers.items()))
    (root / "results").mkdir(exist_ok=True)
    (root / "results" / f"{variant}.json").write_text(json.dumps(results))


def _tree(root: Path, extra_set: bool = False) -> dict[str, dict]:
    """Five variants x probe sets with known effects; returns the probes per variant. The control
    (instructed) moves ethical by 0.2 on its own: engraved - control = 0.25, engraved - base = 0.45."""
    rng = random.Random(7)
    base_m = {f"e{i}": rng.uniform(-1, 1) for i in range(8)}
    base_s = {f"s{i}": rng.uniform(-1, 1) for i in range(8)}
    base_id = {f"i{i}": rng.uniform(-1, 1) for i in range(6)}
    shift = {"base": (0.0, 0.0, 0.0), "instructed": (0.2, 0.0, 0.9), "prompted": (1.0, 0.02, 1.5),
             "engraved": (0.45, 0.01, 1.2), "verbose": (0.5, 0.0, 1.3)}
    refusals = {"base": {"o1"}, "instructed": {"o1", "o2"}, "prompted": {"o1", "o2", "o3", "o4"},
                "engraved": {"o1", "o2", "o3"}, "verbose": {"o1", "o2"}}
    out = {}
    for variant in VARIANTS:
        se, ss, si = shift[variant]
        probes = {
            # a principle the prompt clearly moves
            "ethical": {k: (v + se + rng.gauss(0, 0.05), float(v + se > 0)) for k, v in base_m.items()},
            # a principle the prompt barely moves (noise both ways): not significant
            "static": {k: (v + ss * (1 if i % 2 else -1) + rng.gauss(0, 0.3), float(i % 3 == 0))
                       for i, (k, v) in enumerate(base_s.items())},
            # identity moves, but is not a principle: out of the retention mean
            "identity": {k: (v + si, 1.0) for k, v in base_id.items()},
            "over-refusal": {f"o{i}": (0.1 * i, 0.0 if f"o{i}" in refusals[variant] else 1.0) for i in range(1, 6)},
        }
        if extra_set:
            other = random.Random(VARIANTS.index(variant))  # its own stream: the other sets' data stay equal
            probes["candor"] = {f"c{i}": (other.uniform(-1, 1), 1.0) for i in range(5)}
        answers = {f"q{i}": "x" * (10 + 3 * i) * (3 if variant == "verbose" else 1) for i in range(6)}
        _write_variant(root, variant, probes, answers, shuffle=11 if variant == "base" else None)
        out[variant] = probes
    return out


def _run(config, root: Path, tmp: Path, png: bool = True) -> dict:
    return evaluate_report.run(config, str(root / "results"), str(root / "samples"), str(tmp / "t.csv"),
                               str(tmp / "t.png"), str(tmp / "report.json"),
                               str(tmp / "probe_margins.png") if png else None)


@pytest.fixture()
def cfg(params_data):
    from selfalign.config import parse_config

    params_data["evaluate"]["bootstrap_iters"] = 300
    params_data["evaluate"]["seed"] = 5
    return parse_config(params_data)


def _brute_force_delta(a: dict, b: dict, name: str) -> dict:
    """Paired delta of margins a - b by hand: pair by id, sorted ids, seed from the metric name."""
    ids = sorted(a)
    diffs = [a[i][0] - b[i][0] for i in ids]
    means = [sum(diffs[j] for j in idx) / len(idx) for idx in _resamples(5, name, 300, len(ids))]
    return {"diff": sum(diffs) / len(diffs), "n": len(ids), "ci_low": _percentile(means, 2.5),
            "ci_high": _percentile(means, 97.5),
            "p_value": min(1.0, 2 * min(sum(m <= 0 for m in means) / 300, sum(m >= 0 for m in means) / 300))}


def test_probe_deltas_vs_control_and_base_equal_a_brute_force_paired_reference(cfg, tmp_path):
    probes = _tree(tmp_path / "eval")
    report = _run(cfg, tmp_path / "eval", tmp_path)
    assert report["control"] == "instructed"
    block = report["probes"]["ethical"]
    eng = probes["engraved"]["ethical"]
    # the effect of engraving: engraved - control (the base file is shuffled: pairing is by id)
    for key, reference, shift in (("vs_control", "instructed", 0.25), ("vs_base", "base", 0.45)):
        got = block[key]["engraved"]["margin"]
        want = _brute_force_delta(eng, probes[reference]["ethical"], "probes.ethical.margin")
        assert got == pytest.approx(want)
        assert got["diff"] == pytest.approx(shift, abs=0.05)
    # per-variant estimates come from the results JSON; behaviour deltas are there too
    assert block["variants"]["base"]["margin"]["n"] == 8
    assert set(block["vs_control"]["prompted"]) == {"margin", "behaviour"}
    assert "instructed" not in block["vs_control"] and "base" not in block["vs_base"]
    # base is measured against the control too (the system prompt's own effect, negated)
    assert block["vs_control"]["base"]["margin"]["diff"] == pytest.approx(-0.2, abs=0.05)
    # written to the JSON, the CSV (delta vs control, then vs base) and the heatmap
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["probes"]["ethical"] == block
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert rows[0].split(",")[6:] == ["delta_vs_control", "delta_vs_control_ci_low", "delta_vs_control_ci_high",
                                      "delta_vs_base", "delta_vs_base_ci_low", "delta_vs_base_ci_high"]
    row = next(r for r in rows if r.startswith("probes.ethical.margin,engraved,")).split(",")
    assert float(row[6]) == pytest.approx(block["vs_control"]["engraved"]["margin"]["diff"])
    assert float(row[9]) == pytest.approx(block["vs_base"]["engraved"]["margin"]["diff"])
    assert (tmp_path / "probe_margins.png").stat().st_size > 1000


def test_the_control_is_one_param(params_data, tmp_path):
    """evaluate.control picks the reference of every "effect" block: here base, so instructed gets a delta."""
    from selfalign.config import parse_config

    params_data["evaluate"].update(bootstrap_iters=50, seed=5, control="base")
    _tree(tmp_path / "eval")
    report = _run(parse_config(params_data), tmp_path / "eval", tmp_path, png=False)
    assert report["control"] == "base" and report["retention"]["control"] == "base"
    assert report["probes"]["ethical"]["vs_control"] == report["probes"]["ethical"]["vs_base"]
    assert "instructed" in report["probes"]["ethical"]["vs_control"]


def test_retention_formula_ci_and_mean_over_significant_principles(cfg, tmp_path):
    probes = _tree(tmp_path / "eval")
    report = _run(cfg, tmp_path / "eval", tmp_path, png=False)
    ret = report["retention"]
    assert (ret["teacher"], ret["student"], ret["control"]) == ("prompted", "engraved", "instructed")

    def mean(variant, name, ids):
        return sum(probes[variant][name][i][0] for i in ids) / len(ids)

    ids = sorted(probes["base"]["ethical"])
    c, p, e = (mean(v, "ethical", ids) for v in ("instructed", "prompted", "engraved"))
    eth = ret["sets"]["ethical"]["margin"]
    # (engraved - control) / (prompted - control): 0.25 / 0.8, not the 0.45 engraved - base would give
    assert eth["value"] == pytest.approx((e - c) / (p - c))
    assert 0.25 < eth["value"] < 0.37
    # the CI resamples the items jointly for the three variants (same indices), seed from the name
    ratios = []
    for idx in _resamples(5, "retention.ethical.margin", 300, len(ids)):
        cm, pm, em = (sum(probes[v]["ethical"][ids[j]][0] for j in idx) / len(idx)
                      for v in ("instructed", "prompted", "engraved"))
        ratios.append((em - cm) / (pm - cm))
    assert eth["ci_low"] == pytest.approx(_percentile(ratios, 2.5))
    assert eth["ci_high"] == pytest.approx(_percentile(ratios, 97.5))
    assert eth["significant_prompted"] is True
    assert ret["sets"]["static"]["margin"]["significant_prompted"] is False
    assert ret["sets"]["identity"]["margin"]["significant_prompted"] is True
    # the mean covers significant principles only: not static (noise), not identity (not a principle)
    assert ret["mean_over_significant"]["margin"]["sets"] == ["ethical"]
    assert ret["mean_over_significant"]["margin"]["value"] == pytest.approx(eth["value"])
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert any(r.startswith("retention.ethical.margin,engraved,") for r in rows)


def test_adding_an_unrelated_metric_leaves_other_intervals_unchanged(cfg, tmp_path):
    first = _run(cfg, _tree_at(tmp_path / "a"), tmp_path / "a", png=False)
    second = _run(cfg, _tree_at(tmp_path / "b", extra_set=True), tmp_path / "b", png=False)
    assert "candor" in second["probes"] and "candor" not in first["probes"]
    for name in ("ethical", "static", "over-refusal"):
        assert second["probes"][name]["vs_base"] == first["probes"][name]["vs_base"]
        assert second["probes"][name]["vs_control"] == first["probes"][name]["vs_control"]
    assert second["retention"]["sets"]["ethical"] == first["retention"]["sets"]["ethical"]
    assert second["over_refusal"] == first["over_refusal"]


def _tree_at(root: Path, extra_set: bool = False) -> Path:
    root.mkdir(parents=True)
    _tree(root / "eval", extra_set=extra_set)
    return root / "eval"


def test_over_refusal_rates_and_points(cfg, tmp_path):
    _tree(tmp_path / "eval")
    over = _run(cfg, tmp_path / "eval", tmp_path, png=False)["over_refusal"]
    assert over["set"] == "over-refusal"
    assert over["refusal_rate"]["base"]["value"] == pytest.approx(1 / 5)
    assert over["refusal_rate"]["engraved"]["value"] == pytest.approx(3 / 5)
    rate = over["refusal_rate"]["engraved"]
    assert rate["ci_low"] <= rate["value"] <= rate["ci_high"]
    pts = over["delta_vs_base_points"]["engraved"]
    assert pts["diff"] == pytest.approx(40.0) and pts["n"] == 5
    assert pts["ci_low"] <= 40.0 <= pts["ci_high"]
    assert over["delta_vs_base_points"]["prompted"]["diff"] == pytest.approx(60.0)
    # against the control (which refuses o1 and o2): one more refusal for engraved, two for prompted
    assert over["delta_vs_control_points"]["engraved"]["diff"] == pytest.approx(20.0)
    assert over["delta_vs_control_points"]["prompted"]["diff"] == pytest.approx(40.0)
    assert over["delta_vs_control_points"]["verbose"]["diff"] == pytest.approx(0.0)
    assert "instructed" not in over["delta_vs_control_points"]


def test_vicuna_lengths_and_ratio(cfg, tmp_path):
    _tree(tmp_path / "eval")
    vic = _run(cfg, tmp_path / "eval", tmp_path, png=False)["vicuna_length"]
    lengths = [10 + 3 * i for i in range(6)]
    assert vic["mean_chars"]["engraved"]["value"] == pytest.approx(sum(lengths) / 6)
    assert vic["mean_chars"]["verbose"]["value"] == pytest.approx(3 * sum(lengths) / 6)
    assert vic["verbose_over_engraved"]["value"] == pytest.approx(3.0)
    assert vic["verbose_over_engraved"]["ci_low"] == pytest.approx(3.0)  # every answer exactly 3x
    assert vic["length_cut_rate"]["engraved"] == 0.0
    assert vic["length_cut_rate"]["verbose"] == pytest.approx(5 / 6)  # the 30-char answer was not cut


def test_malformed_probe_sample_names_file_and_field(cfg, tmp_path):
    from selfalign.io import DataError

    _tree(tmp_path / "eval")
    path = tmp_path / "eval/samples/engraved/probes.jsonl"
    lines = path.read_text().splitlines()
    bad = json.loads(lines[2])
    del bad["scores"]["margin"]
    lines[2] = json.dumps(bad)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"engraved/probes.jsonl: item probe_\S+: no field 'scores.margin'"):
        _run(cfg, tmp_path / "eval", tmp_path, png=False)
    lines[2] = json.dumps({**bad, "id": 3})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"engraved/probes.jsonl: line 3: field 'id'"):
        _run(cfg, tmp_path / "eval", tmp_path, png=False)


def test_no_probes_still_writes_every_output(cfg, tmp_path):
    res = tmp_path / "eval/results"
    res.mkdir(parents=True)
    for variant in ("base", "engraved"):
        (res / f"{variant}.json").write_text(json.dumps(
            {"truthfulqa_mc1": {"value": 0.3, "n": 10, "ci_low": 0.1, "ci_high": 0.5}}))
    report = _run(cfg, tmp_path / "eval", tmp_path)
    assert report["probes"] == {} and report["retention"] == {} and report["over_refusal"] == {}
    # no control evaluated: nothing is reported as an effect vs the control
    assert report["paired_vs_control"] == {} and report["harm"] == {}
    assert (tmp_path / "probe_margins.png").exists() and (tmp_path / "t.png").exists()


def test_report_over_real_evaluate_outputs_tables_all_variants_with_paired_deltas(evaluated, small_config, tmp_path):
    """The contract end to end: what ``evaluate`` wrote for two variants (the session's tiny-model run)."""
    out, _ = evaluated
    res = evaluate_report.run(small_config, str(out / "results"), str(out / "samples"), str(tmp_path / "t.csv"),
                              str(tmp_path / "t.png"), str(tmp_path / "cmp.json"))
    assert res["variants"] == ["base", "engraved"]
    delta = res["paired_vs_base"]["engraved"]["truthfulqa_mc2"]
    assert delta["n"] == 2 and delta["ci_low"] <= delta["diff"] <= delta["ci_high"]
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert rows[0].startswith("metric,variant,value,ci_low,ci_high,n")
    assert any(r.startswith("hhh.overall,engraved,") for r in rows)
    assert (tmp_path / "t.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------ do no harm
def _write_harm(root: Path, variant: str, loops: set[int], refusals: set[int]) -> dict:
    """eval/samples/<variant>/harm.jsonl (20 degeneration items, 10 harmful requests) + its results' harm."""
    from selfalign.evaluation.harm import HARM_FILE
    from selfalign.evaluation.stats import bootstrap_ci

    degen = {f"probe/p{i}": float(i in loops) for i in range(20)}
    refused = {f"ethical-{i}": float(i in refusals) for i in range(10)}
    recs = [{"benchmark": "degeneration", "id": k, "variant": variant, "prediction": "r", "correct": not v,
             "scores": {"degenerate": v}} for k, v in degen.items()]
    recs += [{"benchmark": "harmful_refusal", "id": k, "variant": variant, "prediction": "r", "correct": bool(v),
              "scores": {"refused": v}} for k, v in refused.items()]
    sdir = root / "samples" / variant
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / HARM_FILE).write_text("".join(json.dumps(r) + "\n" for r in reversed(recs)))
    results = {"variant": variant, "harm": {
        "degeneration": bootstrap_ci(list(degen.values()), 100, 1),
        "harmful_refusal": bootstrap_ci(list(refused.values()), 100, 1)}}
    (root / "results").mkdir(parents=True, exist_ok=True)
    (root / "results" / f"{variant}.json").write_text(json.dumps(results))
    return {"degeneration": degen, "harmful_refusal": refused}


def test_harm_deltas_vs_control_and_worse_than_control_marks(cfg, tmp_path):
    root = tmp_path / "eval"
    items = {
        "instructed": _write_harm(root, "instructed", loops={0, 1}, refusals=set(range(6))),
        # loops on 12 of 20 (the control's 2 among them): clearly worse; refuses what the control refuses
        "engraved": _write_harm(root, "engraved", loops=set(range(12)), refusals=set(range(6))),
        # the control's loops; refuses nothing: clearly worse on refusals
        "verbose": _write_harm(root, "verbose", loops={0, 1}, refusals=set()),
        # never loops, refuses everything: better on both, never "worse"
        "base": _write_harm(root, "base", loops=set(), refusals=set(range(10))),
    }
    report = _run(cfg, root, tmp_path, png=False)
    harm = report["harm"]
    assert harm["control"] == "instructed" and set(harm["delta_vs_control"]) == {"base", "engraved", "verbose"}
    for variant in ("base", "engraved", "verbose"):
        for metric in ("degeneration", "harmful_refusal"):
            a, b = items[variant][metric], items["instructed"][metric]
            want = _brute_force_delta({k: (v, 0) for k, v in a.items()}, {k: (v, 0) for k, v in b.items()},
                                      f"harm.{metric}")
            assert harm["delta_vs_control"][variant][metric] == pytest.approx(want)
    assert harm["delta_vs_control"]["engraved"]["degeneration"]["diff"] == pytest.approx(0.5)
    assert harm["delta_vs_control"]["verbose"]["harmful_refusal"]["diff"] == pytest.approx(-0.6)
    assert harm["worse_than_control"] == {
        "base": {"degeneration": False, "harmful_refusal": False},
        "engraved": {"degeneration": True, "harmful_refusal": False},
        "verbose": {"degeneration": False, "harmful_refusal": True}}
    # the rates are read from the results and land in the table and CSV, not in the benchmark delta blocks
    assert not [m for rows in report["paired_vs_control"].values() for m in rows if m.startswith("harm.")]
    rows = (tmp_path / "t.csv").read_text().splitlines()
    row = next(r for r in rows if r.startswith("harm.degeneration,engraved,")).split(",")
    assert float(row[2]) == pytest.approx(0.6) and float(row[6]) == pytest.approx(0.5)


def test_a_harm_delta_whose_interval_touches_zero_is_not_worse(cfg, tmp_path):
    """One extra loop in 20 replies: the paired CI includes 0, so no mark."""
    root = tmp_path / "eval"
    _write_harm(root, "instructed", loops={0}, refusals={0, 1})
    _write_harm(root, "engraved", loops={0, 1}, refusals={0})
    harm = _run(cfg, root, tmp_path, png=False)["harm"]
    d = harm["delta_vs_control"]["engraved"]
    assert d["degeneration"]["diff"] > 0 and d["degeneration"]["ci_low"] <= 0
    assert d["harmful_refusal"]["diff"] < 0 and d["harmful_refusal"]["ci_high"] >= 0
    assert harm["worse_than_control"]["engraved"] == {"degeneration": False, "harmful_refusal": False}
