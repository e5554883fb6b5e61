"""Judge verdict parsing (malformed -> invalid), order-swap combination, summaries, answering resumably."""

from __future__ import annotations

import pytest
from fakes import FakeEngine

from selfalign.evaluation.vicuna import (combine_orders, judge_pair, outcome_for_x, parse_verdict,
                                         summarize_pair)
from selfalign.generation.base import SamplingParams


@pytest.mark.parametrize(("reply", "expected"), [
    ("A is more detailed. [[A]]", "A"),
    ("My verdict: [[B]]", "B"),
    ("Both are equally good [[C]]", "tie"),
    ("[[ A ]]", "A"),
    ("[[A]] ... on reflection still [[A]]", "A"),
    ("I prefer A.", "invalid"),                 # no bracketed label
    ("[[A]] or maybe [[B]]", "invalid"),        # contradicting labels
    ("[[D]]", "invalid"),
    ("", "invalid"),
    ("[A]", "invalid"),
])
def test_parse_verdict(reply, expected):
    assert parse_verdict(reply) == expected


def test_outcome_depends_on_position():
    assert outcome_for_x("A", 0) == "win" and outcome_for_x("A", 1) == "loss"
    assert outcome_for_x("B", 0) == "loss" and outcome_for_x("B", 1) == "win"
    assert outcome_for_x("tie", 1) == "tie" and outcome_for_x("invalid", 0) == "invalid"


def test_combine_orders():
    assert combine_orders("win", "win") == "win"
    assert combine_orders("win", "loss") == "tie"   # position-driven: cancels out
    assert combine_orders("win", "tie") == "win"
    assert combine_orders("loss", "tie") == "loss"
    assert combine_orders("tie", "tie") == "tie"
    assert combine_orders("win", "invalid") == "invalid"


def _answers(name, texts):
    return {f"q{i}": {"id": f"q{i}", "category": "math" if i % 2 else "generic", "question": f"Question {i}?",
                      "answer": t} for i, t in enumerate(texts)}


TEMPLATE = "Q: {question}\nA: {answer_a}\nB: {answer_b}\nVerdict:"


def test_judge_both_orders_position_biased_judge_gives_ties():
    judge = FakeEngine(lambda req: "A]] because it is first")   # always picks position A
    x, y = _answers("x", ["good", "good2", "good3"]), _answers("y", ["bad", "bad2", "bad3"])
    recs = judge_pair(judge, lambda p: p, TEMPLATE, "[[", SamplingParams(), "x", "y", x, y)
    assert len(recs) == 6 and {r["x_position"] for r in recs} == {"A", "B"}
    # the swap really swaps: X's answer is shown first in one order and second in the other
    first = [r for r in recs if r["question_id"] == "q0"]
    assert "A: good\nB: bad" in first[0]["judge_prompt"] and "A: bad\nB: good" in first[1]["judge_prompt"]
    s = summarize_pair(recs, iters=100, seed=0)
    assert (s["win"], s["tie"], s["loss"], s["invalid"]) == (0, 3, 0, 0)
    assert s["position_a_rate"] == 1.0
    assert s["win_rate"]["value"] == 0.5 and s["win_rate"]["n"] == 3


def test_judge_content_preferring_judge_and_invalid_replies():
    def respond(req):
        a_line = req.text.split("\nA: ")[1].split("\n")[0]
        if "garbled" in req.text:
            return "no idea"  # malformed: no label
        return "A]]" if a_line.startswith("good") else "B]]"

    x = _answers("x", ["good", "good", "garbled"])
    y = _answers("y", ["bad", "bad", "bad"])
    recs = judge_pair(FakeEngine(respond), lambda p: p, TEMPLATE, "[[", SamplingParams(), "x", "y", x, y)
    s = summarize_pair(recs, iters=100, seed=0)
    assert (s["win"], s["tie"], s["loss"], s["invalid"]) == (2, 0, 0, 1)
    assert s["judgments"]["invalid"] == 2
    assert s["win_rate"]["value"] == 1.0 and s["win_rate"]["n"] == 2
    assert s["per_category"]["generic"] == {"win": 1, "tie": 0, "loss": 0, "invalid": 1}
    assert s["per_category"]["math"] == {"win": 1, "tie": 0, "loss": 0, "invalid": 0}


def test_answer_questions_uses_variant_prompt_and_resumes(tiny_tokenizer, config, tmp_path):
    from selfalign.evaluation.benchmarks import VicunaQuestion
    from selfalign.evaluation.variants import VariantPrompter
    from selfalign.evaluation.vicuna import answer_questions

    qs = [VicunaQuestion(id=f"v{i}", text=f"Tell me about topic {i}.", category="generic") for i in range(3)]
    engine = FakeEngine(lambda req: "An answer.<|im_end|>ignored")
    prompter = VariantPrompter("base", config, tiny_tokenizer)
    out = tmp_path / "answers.jsonl"
    fp = {"model": "tiny", "adapter_sha256": None}
    recs = answer_questions(engine, prompter, qs, SamplingParams(max_new_tokens=8), out, fingerprint=fp)
    assert [r["id"] for r in recs] == ["v0", "v1", "v2"]
    assert all(r["answer"] == "An answer." for r in recs)   # cut at the chat template's end-of-turn
    assert "<|im_start|>user" in engine.seen[0].prompt and engine.seen[0].prompt.endswith("assistant\n")
    again = FakeEngine(lambda req: "other")
    answer_questions(again, prompter, qs, SamplingParams(max_new_tokens=8), out, fingerprint=fp)
    assert out.exists()
