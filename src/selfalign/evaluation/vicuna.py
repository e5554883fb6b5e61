"""Vicuna-80: every variant answers; a judge compares pairs of variants in both orders.

Judge protocol (pairwise, as in Vicuna/MT-bench): the judge sees the question and two answers as
"Assistant A" and "Assistant B" and must end with ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie). Each pair
is judged twice with the answers swapped, because judges, small ones especially, prefer a position.
A verdict that names no label, or several different ones, is ``invalid`` and counted as such, never
guessed. Per question the two orders are combined from X's side (win 1, tie 0.5, loss 0, averaged):
above 0.5 is a win, 0.5 a tie, below a loss; a question with an invalid order is ``invalid``.

The default judge is a local HF model (the base model unless told otherwise) and is **weak**: a
135M-parameter judge is close to a coin flip and strongly position-biased. Results record the judge
and say so; point ``evaluate.judge`` at a strong OpenAI-compatible model
for numbers worth reading.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from selfalign.evaluation.benchmarks import VicunaQuestion
from selfalign.evaluation.stats import bootstrap_ci
from selfalign.evaluation.variants import VariantPrompter
from selfalign.generation.base import Request, SamplingParams

log = logging.getLogger(__name__)

__all__ = [
    "OUTCOME_SCORE",
    "answer_questions",
    "combine_orders",
    "judge_pair",
    "parse_verdict",
    "summarize_pair",
]

_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
# X's outcome per verdict, by which position X held
_FROM_X = {("A", 0): "win", ("B", 0): "loss", ("A", 1): "loss", ("B", 1): "win"}
OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def parse_verdict(text: str) -> str:
    """``"A"``, ``"B"``, ``"tie"`` or ``"invalid"`` (no label, or contradicting labels)."""
    labels = set(_VERDICT.findall(text))
    if len(labels) != 1:
        return "invalid"
    label = labels.pop()
    return "tie" if label == "C" else label


def outcome_for_x(verdict: str, x_position: int) -> str:
    """Map a verdict to X's outcome when X was shown as A (``x_position`` 0) or B (1)."""
    if verdict in ("tie", "invalid"):
        return verdict
    return _FROM_X[(verdict, x_position)]


def combine_orders(first: str, second: str) -> str:
    """Question-level outcome for X from its two judgments (X as A, X as B)."""
    if "invalid" in (first, second):
        return "invalid"
    mean = (OUTCOME_SCORE[first] + OUTCOME_SCORE[second]) / 2
    return "win" if mean > 0.5 else "loss" if mean < 0.5 else "tie"


# --------------------------------------------------------------------------------------- answering
def answer_questions(engine: Any, prompter: VariantPrompter, questions: Sequence[VicunaQuestion],
                     sampling: SamplingParams, out_path: str | Path, *,
                     fingerprint: Mapping[str, Any]) -> list[dict]:
    """Generate (resumably) one answer per question with the variant's prompt; records in question order.

    ``fingerprint``: the engine's model, adapter and code
    (:func:`selfalign.generation.runner.generation_fingerprint`); a partial file written under another
    one is discarded, not resumed."""
    requests = []
    for q in questions:
        cp = prompter.generation_prompt(q.text)
        requests.append(Request(id=q.id, prefix=cp.prefix, text=cp.text))
    meta = {q.id: q for q in questions}

    def make_record(req: Request, res: Any) -> dict:
        q = meta[req.id]
        return {"id": q.id, "category": q.category, "question": q.text, "variant": prompter.variant,
                "answer": prompter.cut_reply(res.text), "finish": res.finish,
                "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                "sampling": sampling.to_dict()}

    from selfalign.generation.runner import run_resumable

    return run_resumable(prompter.generator(engine), requests, sampling, str(out_path), fingerprint=fingerprint, make_record=make_record,
                         desc=f"vicuna answers [{prompter.variant}]")


# ------------------------------------------------------------------------------------------ judging
def judge_pair(engine: Any, render: Any, template: str, answer_prefix: str, sampling: SamplingParams,
               x_name: str, y_name: str, x_answers: dict[str, dict], y_answers: dict[str, dict]) -> list[dict]:
    """Judge X vs Y on their common questions, both orders; one transcript record per (question, order).

    ``render(prompt_text) -> str`` wraps the judge prompt for the judge model (its chat template for a
    local model); ``answer_prefix`` is forced at the start of the judge's reply.
    """
    ids = [i for i in x_answers if i in y_answers]
    requests, info = [], {}
    for qid in ids:
        q = x_answers[qid]
        for x_pos in (0, 1):
            a, b = (x_answers[qid], y_answers[qid]) if x_pos == 0 else (y_answers[qid], x_answers[qid])
            prompt = template.format(question=q["question"], answer_a=a["answer"], answer_b=b["answer"])
            rid = f"{qid}|x_as_{'AB'[x_pos]}"
            requests.append(Request(id=rid, prefix="", text=render(prompt) + answer_prefix))
            info[rid] = (qid, x_pos, q["category"])
    texts = {r.id: r.text for r in requests}
    records = []
    for res in engine.generate(requests, sampling):
        qid, x_pos, category = info[res.id]
        reply = answer_prefix + res.text
        verdict = parse_verdict(reply)
        records.append({"id": res.id, "question_id": qid, "category": category, "x": x_name, "y": y_name,
                        "x_position": "AB"[x_pos], "judge_reply": reply, "verdict": verdict,
                        "x_outcome": outcome_for_x(verdict, x_pos),
                        "judge_prompt": texts[res.id]})
    order = {r.id: k for k, r in enumerate(requests)}
    return sorted(records, key=lambda r: order[r["id"]])


def summarize_pair(records: list[dict], iters: int, seed: int) -> dict:
    """Win/tie/loss (+ invalid) overall and per category, the win rate with a bootstrap CI, position bias."""
    by_q: dict[str, dict[str, str]] = {}
    cats: dict[str, str] = {}
    for r in records:
        by_q.setdefault(r["question_id"], {})[r["x_position"]] = r["x_outcome"]
        cats[r["question_id"]] = r["category"]
    outcomes = {qid: combine_orders(o.get("A", "invalid"), o.get("B", "invalid")) for qid, o in by_q.items()}

    def counts(qids: Iterable[str]) -> dict:
        c = Counter(outcomes[q] for q in qids)
        return {k: c.get(k, 0) for k in ("win", "tie", "loss", "invalid")}

    valid = [OUTCOME_SCORE[o] for o in outcomes.values() if o != "invalid"]
    verdicts = Counter(r["verdict"] for r in records)
    decided = verdicts["A"] + verdicts["B"]
    return {
        **counts(outcomes),
        "n_questions": len(outcomes),
        "win_rate": bootstrap_ci(valid, iters, seed),  # (wins + ties/2) / valid questions
        "per_category": {cat: counts([q for q in outcomes if cats[q] == cat]) for cat in sorted(set(cats.values()))},
        "judgments": {k: verdicts.get(k, 0) for k in ("A", "B", "tie", "invalid")},
        # share of decided verdicts that picked position A: 0.5 = no position bias
        "position_a_rate": (verdicts["A"] / decided) if decided else None,
    }
