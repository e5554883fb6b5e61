"""Stage evaluate on the tiny model (base + a LoRA variant), then evaluate_report over its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    from selfalign.models import load_model

    out = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def small_config():
    import yaml

    from selfalign.config import parse_config

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    ev = data["evaluate"]
    ev.update(limit=2, bootstrap_iters=200)
    ev["paper"].update(enabled=True, limit=2)  # off in the CPU default; covered here
    ev["vicuna"].update(per_category=1, max_new_tokens=6)
    ev["probes"].update(max_new_tokens=4)
    return parse_config(data)


@pytest.fixture(scope="module")
def evaluated(small_config, tiny_model_dir, tiny_adapter, small_bench, tmp_path_factory):
    from selfalign.stages.evaluate import run

    out = tmp_path_factory.mktemp("eval")
    results = {}
    for variant, adapter in (("base", None), ("engraved", str(tiny_adapter))):
        results[variant] = run(small_config, variant, str(tiny_model_dir), adapter, str(small_bench),
                               str(ROOT / "eval" / "tasks"), str(out / "results" / f"{variant}.json"),
                               str(out / "samples" / variant))
    return out, results


def test_results_have_every_metric_with_n_and_ci(evaluated):
    out, results = evaluated
    saved = json.loads((out / "results" / "base.json").read_text())
    assert saved["variant"] == "base"
    metrics = [saved["truthfulqa_mc1"], saved["truthfulqa_mc2"], *saved["hhh"].values(),
               *saved["hhh_acc_norm"].values(), saved["paper"]["truthfulqa_tf_mc1"], *saved["paper"]["hhh_ab"].values()]
    assert set(saved["hhh"]) == {"harmless", "helpful", "honest", "other", "overall"}
    for m in metrics:
        assert set(m) == {"value", "n", "ci_low", "ci_high"}
        assert m["ci_low"] <= m["value"] <= m["ci_high"]
    assert saved["truthfulqa_mc1"]["n"] == 2 and saved["hhh"]["overall"]["n"] == 8
    # our tie-aware MC1 agrees with lm-eval's acc when there are no ties
    assert saved["checks"]["truthfulqa_mc1_ties"] > 0 or saved["checks"]["max_abs_diff_vs_lmeval"] < 1e-9
    assert saved["vicuna_answers"]["n"] == 9


def test_samples_written_per_benchmark(evaluated):
    out, _ = evaluated
    names = {p.name for p in (out / "samples" / "base").iterdir()}
    assert {"truthfulqa_mc1.jsonl", "truthfulqa_mc2.jsonl", "hhh.jsonl", "paper_truthfulqa_tf_mc1.jsonl",
            "paper_hhh_ab.jsonl", "vicuna_answers.jsonl", "probes.jsonl"} <= names
    rec = json.loads((out / "samples" / "base" / "paper_truthfulqa_tf_mc1.jsonl").read_text().splitlines()[0])
    # every candidate got a true/false score (no ceil(n/2) truncation)
    n_choices = len(json.loads((out / "samples" / "base" / "truthfulqa_mc1.jsonl").read_text().splitlines()[0])
                    ["scores"]["logliks"])
    assert len(rec["scores"]["scores"]) == n_choices


def test_adapter_changes_the_scores(evaluated):
    out, _ = evaluated
    a = json.loads((out / "samples" / "base" / "truthfulqa_mc1.jsonl").read_text().splitlines()[0])
    b = json.loads((out / "samples" / "engraved" / "truthfulqa_mc1.jsonl").read_text().splitlines()[0])
    assert a["scores"]["logliks"] != pytest.approx(b["scores"]["logliks"], abs=1e-4)


def test_adapter_rules(small_config, tiny_model_dir, small_bench, tmp_path):
    from selfalign.io import UserError
    from selfalign.stages.evaluate import run

    with pytest.raises(UserError, match="needs --adapter"):
        run(small_config, "verbose", str(tiny_model_dir), None, str(small_bench), "eval/tasks",
            str(tmp_path / "r.json"), str(tmp_path / "s"))
    with pytest.raises(UserError, match="not a PEFT adapter"):
        run(small_config, "engraved", str(tiny_model_dir), str(tmp_path), str(small_bench), "eval/tasks",
            str(tmp_path / "r.json"), str(tmp_path / "s"))


def test_report_tables_all_variants_with_paired_deltas(evaluated, small_config, tmp_path):
    from selfalign.stages.evaluate_report import run

    out, _ = evaluated
    res = run(small_config, str(out / "results"), str(out / "samples"), str(tmp_path / "t.csv"),
              str(tmp_path / "t.png"), str(tmp_path / "cmp.json"))
    assert res["variants"] == ["base", "engraved"]
    delta = res["paired_vs_base"]["engraved"]["truthfulqa_mc2"]
    assert delta["n"] == 2 and delta["ci_low"] <= delta["diff"] <= delta["ci_high"]
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert rows[0].startswith("metric,variant,value,ci_low,ci_high,n")
    assert any(r.startswith("hhh.overall,engraved,") for r in rows)
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_judge_stage_with_local_tiny_judge(evaluated, small_config, tiny_model_dir, tmp_path, monkeypatch):
    from selfalign.stages.judge import run

    monkeypatch.delenv(small_config.evaluate.judge.url_env, raising=False)
    out, _ = evaluated
    res = run(small_config, str(out / "samples"), str(tiny_model_dir), str(tmp_path / "vicuna.json"),
              str(tmp_path / "judge"))
    assert res["judge"]["engine"] == "hf" and res["judge"]["weak"] is True
    assert list(res["pairs"]) == ["engraved_vs_base"]   # pairs without answers are skipped
    pair = res["pairs"]["engraved_vs_base"]
    assert pair["n_questions"] == 9
    assert pair["win"] + pair["tie"] + pair["loss"] + pair["invalid"] == 9
    assert sum(pair["judgments"].values()) == 18        # both orders judged
    transcripts = (tmp_path / "judge" / "engraved_vs_base.jsonl").read_text().splitlines()
    assert len(transcripts) == 18
    rec = json.loads(transcripts[0])
    assert rec["judge_reply"].startswith(small_config.evaluate.judge.answer_prefix)
    assert "[Question]" in rec["judge_prompt"]


def test_every_probe_is_scored_for_every_variant(evaluated):
    out, results = evaluated
    for variant, res in results.items():
        assert res["probe_setup"]["contamination_dropped"] == 0
        assert set(res["probes"]) >= {"ethical", "static", "identity", "over-refusal"}
        for scores in res["probes"].values():
            assert scores["margin"]["n"] >= 12 and scores["margin"]["ci_low"] is not None
        lines = (out / "samples" / variant / "probes.jsonl").read_text().splitlines()
        assert len(lines) == res["probe_setup"]["probes"]


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
