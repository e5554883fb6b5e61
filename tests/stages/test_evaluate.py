"""Stage ``evaluate`` on the tiny model (base + a LoRA variant): every metric with n and CI, the samples,
the adapter rules, and the cross-checks against lm-eval's own scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_results_have_every_metric_with_n_and_ci(evaluated):
    out, _ = evaluated
    saved = json.loads((out / "results" / "base.json").read_text())
    assert saved["variant"] == "base"
    metrics = [saved["truthfulqa_mc1"], saved["truthfulqa_mc2"], *saved["hhh"].values(),
               *saved["hhh_acc_norm"].values(), saved["paper"]["truthfulqa_tf_mc1"], *saved["paper"]["hhh_ab"].values()]
    assert set(saved["hhh"]) == {"harmless", "helpful", "honest", "other", "overall"}
    for m in metrics:
        assert set(m) == {"value", "n", "ci_low", "ci_high"}
        assert m["ci_low"] <= m["value"] <= m["ci_high"]
    assert saved["truthfulqa_mc1"]["n"] == 2 and saved["hhh"]["overall"]["n"] == 8
    assert saved["vicuna_answers"]["n"] == 9


def test_mc1_agrees_with_lmeval_on_every_untied_item(evaluated):
    """Per item, our tie-aware MC1 credit equals lm-eval's own ``acc`` unless the true answer tied with a
    distractor (then the credit is fractional and ``correct`` is None); ``checks`` counts exactly those
    items and its max |diff| covers MC1's gap to lm-eval's aggregate. Holds whether or not a tie occurs."""
    out, _ = evaluated
    for variant in ("base", "engraved"):
        saved = json.loads((out / "results" / f"{variant}.json").read_text())
        recs = _records(out / "samples" / variant / "truthfulqa_mc1.jsonl")
        assert len(recs) == saved["truthfulqa_mc1"]["n"] == 2
        tied = [r for r in recs if 0.0 < r["scores"]["credit"] < 1.0]
        assert saved["checks"]["truthfulqa_mc1_ties"] == len(tied)
        for r in recs:
            if r in tied:
                assert r["correct"] is None
            else:
                assert r["scores"]["credit"] == r["scores"]["lmeval_acc"]
                assert r["correct"] is (r["scores"]["credit"] == 1.0)
        lm_acc = saved["lmeval"]["truthfulqa_mc1"]["acc"]
        assert lm_acc == pytest.approx(sum(r["scores"]["lmeval_acc"] for r in recs) / len(recs))
        ours = sum(r["scores"]["credit"] for r in recs) / len(recs)
        assert saved["checks"]["max_abs_diff_vs_lmeval"] >= abs(lm_acc - ours) - 1e-12


def test_checks_count_ties_and_measure_their_gap_to_lmeval():
    """A true answer tied with a distractor gets credit 1/2 where lm-eval's argmax counts it correct:
    the tie is counted and the gap reported; without it both scorings agree exactly."""
    from selfalign.stages.evaluate import _checks, score_lmeval_samples

    def sample(i: int, lls: list[float], acc: float) -> dict:
        return {"doc": {"id": f"q{i}", "mc1_targets": {"labels": [1, 0, 0]}},
                "filtered_resps": [(ll, False) for ll in lls], "acc": acc}

    docs = [sample(0, [-1.0, -1.0, -3.0], 1.0), sample(1, [-0.5, -2.0, -3.0], 1.0), sample(2, [-4.0, -1.0, -3.0], 0.0)]
    values, records = score_lmeval_samples({"selfalign_truthfulqa_mc1": docs}, "base")
    assert values["truthfulqa_mc1"] == [0.5, 1.0, 0.0]
    assert [r["correct"] for r in records["truthfulqa_mc1"]] == [None, True, False]
    checks = _checks(values, {"truthfulqa_mc1": {"acc": 2 / 3}}, engine_calls=7)
    assert checks["truthfulqa_mc1_ties"] == 1 and checks["engine_calls"] == 7
    assert checks["max_abs_diff_vs_lmeval"] == pytest.approx(1 / 6)

    untied, _ = score_lmeval_samples({"selfalign_truthfulqa_mc1": docs[1:]}, "base")
    checks = _checks(untied, {"truthfulqa_mc1": {"acc": 0.5}}, engine_calls=0)
    assert checks["truthfulqa_mc1_ties"] == 0 and checks["max_abs_diff_vs_lmeval"] == 0.0


def test_samples_written_per_benchmark(evaluated):
    out, _ = evaluated
    names = {p.name for p in (out / "samples" / "base").iterdir()}
    assert {"truthfulqa_mc1.jsonl", "truthfulqa_mc2.jsonl", "hhh.jsonl", "paper_truthfulqa_tf_mc1.jsonl",
            "paper_hhh_ab.jsonl", "vicuna_answers.jsonl", "probes.jsonl"} <= names
    rec = _records(out / "samples" / "base" / "paper_truthfulqa_tf_mc1.jsonl")[0]
    # every candidate got a true/false score (no ceil(n/2) truncation)
    n_choices = len(_records(out / "samples" / "base" / "truthfulqa_mc1.jsonl")[0]["scores"]["logliks"])
    assert len(rec["scores"]["scores"]) == n_choices


def test_adapter_changes_the_scores(evaluated):
    out, _ = evaluated
    a = _records(out / "samples" / "base" / "truthfulqa_mc1.jsonl")[0]
    b = _records(out / "samples" / "engraved" / "truthfulqa_mc1.jsonl")[0]
    assert a["scores"]["logliks"] != pytest.approx(b["scores"]["logliks"], abs=1e-4)


def test_adapter_rules(small_config, tiny_model_dir, small_bench, tmp_path):
    from selfalign.io import UserError
    from selfalign.stages.evaluate import run

    with pytest.raises(UserError, match="needs --adapter"):
        run(small_config, "verbose", str(tiny_model_dir), None, str(small_bench), "eval/tasks",
            str(tmp_path / "r.json"), str(tmp_path / "s"))
    with pytest.raises(UserError, match="takes no adapter"):
        run(small_config, "base", str(tiny_model_dir), str(tmp_path), str(small_bench), "eval/tasks",
            str(tmp_path / "r.json"), str(tmp_path / "s"))
    with pytest.raises(UserError, match="not a PEFT adapter"):
        run(small_config, "engraved", str(tiny_model_dir), str(tmp_path), str(small_bench), "eval/tasks",
            str(tmp_path / "r.json"), str(tmp_path / "s"))


def test_every_probe_is_scored_for_every_variant(evaluated):
    out, results = evaluated
    for variant, res in results.items():
        assert res["probe_setup"]["contamination_dropped"] == 0
        assert set(res["probes"]) >= {"ethical", "static", "identity", "over-refusal"}
        for scores in res["probes"].values():
            assert scores["margin"]["n"] >= 12 and scores["margin"]["ci_low"] is not None
        lines = (out / "samples" / variant / "probes.jsonl").read_text().splitlines()
        assert len(lines) == res["probe_setup"]["probes"]


def test_harm_rates_over_probe_replies_and_vicuna_answers_with_per_item_samples(evaluated, small_config):
    """Degeneration over every greedy probe reply + Vicuna answer, harmful-request refusal over the refusal
    set's probes judged by its own rule (= that set's behaviour, item by item), both with n and a CI."""
    from selfalign.evaluation.harm import loops

    out, results = evaluated
    hcfg = small_config.evaluate.harm
    for variant, res in results.items():
        probes = _records(out / "samples" / variant / "probes.jsonl")
        answers = _records(out / "samples" / variant / "vicuna_answers.jsonl")
        harm = {(r["benchmark"], r["id"]): r for r in _records(out / "samples" / variant / "harm.jsonl")}
        degen = [v for (b, _), v in harm.items() if b == "degeneration"]
        assert len(degen) == len(probes) + len(answers) == res["harm"]["degeneration"]["n"]
        for a in answers:
            rec = harm[("degeneration", f"vicuna/{a['id']}")]
            assert rec["prediction"] == a["answer"]
            assert rec["scores"]["degenerate"] == float(loops(a["answer"], hcfg.loop_ngram_words, hcfg.loop_min_count))
        refusal = [p for p in probes if p["benchmark"] == f"probe_{hcfg.refusal_set}"]
        assert refusal and len(refusal) == res["harm"]["harmful_refusal"]["n"]
        for p in refusal:
            assert harm[("harmful_refusal", p["id"])]["scores"]["refused"] == p["scores"]["behaviour"]
        assert res["harm"]["harmful_refusal"]["value"] == pytest.approx(
            res["probes"][hcfg.refusal_set]["behaviour"]["value"])
        for m in res["harm"].values():
            assert set(m) == {"value", "n", "ci_low", "ci_high"} and m["ci_low"] <= m["value"] <= m["ci_high"]


def test_a_metric_interval_does_not_depend_on_which_other_metrics_exist(small_config):
    """The bootstrap seed of a metric derives from its name: toggling the paper variants (more metrics)
    must not move TruthfulQA's interval."""
    from selfalign.stages.evaluate import _results

    rng = __import__("random").Random(0)
    mc1 = [float(rng.random() < 0.4) for _ in range(30)]
    alone = _results({"truthfulqa_mc1": mc1}, small_config)["truthfulqa_mc1"]
    crowded = _results({"truthfulqa_mc1": mc1, "hhh_ab_harmless": [1.0, 0.0] * 5, "hhh_harmless": [0.0, 1.0] * 5,
                        "truthfulqa_tf_mc1": [1.0] * 7}, small_config)["truthfulqa_mc1"]
    assert alone == crowded and alone["ci_low"] < alone["value"] < alone["ci_high"]


# ------------------------------------------------------------------- annotation the probes must avoid
def test_annotation_texts_cover_every_human_request(config):
    """Every seed task, red-team type question, exemplar and identity prompt is a key, read through the
    same validated loaders the method stages use."""
    from selfalign.prompts.annotation import load_exemplars, load_identity, load_seed_tasks, load_types
    from selfalign.stages.evaluate import annotation_texts

    texts = annotation_texts(config)
    expected = ({f"seed:{s.id}" for s in load_seed_tasks(config.red_team.seed_tasks_file)}
                | {f"red_team_type:{t.name}" for t in load_types(config.red_team.types_file)}
                | {f"exemplar:{e.id}" for e in load_exemplars(config.self_align.exemplars_file)}
                | {f"identity:{e.id}" for e in load_identity(config.self_align.identity_file)})
    assert set(texts) == expected
    assert all(v.strip() for v in texts.values())


def test_annotation_texts_refuse_a_malformed_types_file(config, tmp_path):
    """A type without its question used to be skipped silently (the probe contamination check then
    missed it); now the stage stops naming the file and item."""
    from selfalign.io import DataError
    from selfalign.stages.evaluate import annotation_texts

    bad = tmp_path / "types.yaml"
    bad.write_text("- name: a\n  description: d\n  topic: t\n")
    config = config.model_copy(update={"red_team": config.red_team.model_copy(update={"types_file": str(bad)})})
    with pytest.raises(DataError, match=r"types\.yaml: item 1: needs non-empty"):
        annotation_texts(config)


def test_a_refusal_set_without_scored_probes_names_the_params_key(small_config):
    from selfalign.io import UserError
    from selfalign.stages.evaluate import _harm

    ev = small_config.evaluate
    config = small_config.model_copy(update={"evaluate": ev.model_copy(update={"harm": ev.harm.model_copy(
        update={"refusal_set": "harmful"})})})
    probe = {"benchmark": "probe_ethical", "id": "e1", "prediction": "No.", "scores": {"behaviour": 1.0}}
    with pytest.raises(UserError, match=r"evaluate\.harm\.refusal_set: no probe of set 'harmful'"):
        _harm(config, "base", [probe], None)
    values, records = _harm(small_config, "base", [probe], [{"id": "q1", "answer": "la " * 9}])
    assert values == {"harm.degeneration": [0.0, 1.0], "harm.harmful_refusal": [1.0]}
    assert _harm(small_config, "base", None, None) == ({}, [])  # probes and Vicuna off: no harm block
