"""Stage ``judge`` with the tiny model as a local judge over the ``evaluate`` outputs of two variants."""

from __future__ import annotations

import json


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
