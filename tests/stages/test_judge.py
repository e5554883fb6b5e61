"""Stage ``judge`` with the tiny model as a local judge over the ``evaluate`` outputs of two variants."""

from __future__ import annotations

import json

import pytest


def test_judge_stage_with_local_tiny_judge(evaluated, small_config, tiny_model_dir, tmp_path, monkeypatch):
    from selfalign.stages.judge import run

    monkeypatch.delenv("SELFALIGN_JUDGE_URL", raising=False)
    out, _ = evaluated  # base and engraved only
    ev = small_config.evaluate
    config = small_config.model_copy(update={"evaluate": ev.model_copy(update={"judge": ev.judge.model_copy(
        update={"pairs": (*ev.judge.pairs, ("engraved", "base"))})})})
    res = run(config, str(out / "samples"), str(tiny_model_dir), str(tmp_path / "vicuna.json"),
              str(tmp_path / "judge"))
    assert res["judge"]["engine"] == "hf" and res["judge"]["weak"] is True
    assert list(res["pairs"]) == ["engraved_vs_base"]   # pairs without answers (vs the control ...) are skipped
    pair = res["pairs"]["engraved_vs_base"]
    assert pair["n_questions"] == 9
    assert pair["win"] + pair["tie"] + pair["loss"] + pair["invalid"] == 9
    assert sum(pair["judgments"].values()) == 18        # both orders judged
    transcripts = (tmp_path / "judge" / "engraved_vs_base.jsonl").read_text().splitlines()
    assert len(transcripts) == 18
    rec = json.loads(transcripts[0])
    assert rec["judge_reply"].startswith(small_config.evaluate.judge.answer_prefix)
    assert "[Question]" in rec["judge_prompt"]


def test_judge_missing_prompt_file_names_the_params_key(tmp_path, params_data):
    """A params file pointing ``evaluate.judge.prompt_file`` at nothing: one line naming key and path, before any
    answers or model are read."""
    from selfalign.config import parse_config
    from selfalign.io import UserError
    from selfalign.stages.judge import run

    missing = tmp_path / "nope.txt"
    params_data["evaluate"]["judge"]["prompt_file"] = str(missing)
    with pytest.raises(UserError, match=rf"^evaluate\.judge\.prompt_file: {missing}: file not found$"):
        run(parse_config(params_data), str(tmp_path / "samples"), str(tmp_path / "model"),
            str(tmp_path / "vicuna.json"), str(tmp_path / "judge"))
