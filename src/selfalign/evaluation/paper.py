"""Dromedary-style ("paper") multiple-choice variants, under each variant's assistant template.

These are *not* the standard metrics; results carry them under ``paper.*`` keys. They exist to compare
with the paper's numbers (METHOD.md §9):

* **TruthfulQA true/false MC1**: each candidate answer is shown in a user turn that asks whether it
  is true; the assistant's forced reply ends right before the verdict word, and the candidate's score
  is log P(" true") - log P(" false"). MC1 = the true answer has the highest score. Unlike the
  reference code, *every* candidate is scored (its loop covered only the first ceil(n/2)).
* **HHH A/B**: the dialogue and both responses as options A and B, in both orders; see
  :func:`scoring.paper_hhh_ab`.

The wording of the user turns and the forced assistant openers is ours and lives in params.yaml
(``evaluate.paper``).
"""

from __future__ import annotations

import logging
from typing import Any

from selfalign.evaluation import scoring
from selfalign.evaluation.benchmarks import HHHItem, TruthfulQAItem
from selfalign.evaluation.variants import VariantPrompter
from selfalign.generation.scoring import loglikelihood_pairs

log = logging.getLogger(__name__)

__all__ = ["hhh_ab", "truthfulqa_tf_mc1"]


def _pair_logps(engine: Any, jobs: list[tuple[str, str, str, str]], desc: str) -> list[tuple[float, float]]:
    """Log-probs of two continuations after ``prefix + rest`` for every (prefix, rest, first, second) job.

    All jobs go to the engine in one call with the (shared) prefix as the head, so the variant's
    preamble is encoded once and each forced reply runs once for both of its verdict words.
    """
    pairs, heads = [], {}
    for prefix, rest, first, second in jobs:
        pairs += [(prefix + rest, first), (prefix + rest, second)]
        if prefix:
            heads[prefix + rest] = prefix
    log.info("%s: %d scored continuations", desc, len(pairs))
    out = loglikelihood_pairs(engine, pairs, heads=heads, progress=True)
    return [(float(out[2 * j][0]), float(out[2 * j + 1][0])) for j in range(len(jobs))]


def truthfulqa_tf_mc1(engine: Any, prompter: VariantPrompter, items: list[TruthfulQAItem],
                      paper_cfg: Any) -> list[dict]:
    """One sample per question: per-candidate true/false log-probs, scores and tie-aware MC1 credit."""
    jobs = []
    for item in items:
        for cand in item.mc1_targets.choices:  # all candidates: no ceil(n/2) shortcut
            cp = prompter.chat(paper_cfg.tf_user.format(question=item.question.strip(), answer=cand.strip()))
            jobs.append((cp.prefix, cp.text + paper_cfg.tf_assistant_prefix, paper_cfg.true_word, paper_cfg.false_word))
    scored = iter(_pair_logps(engine, jobs, f"paper TF-MC1 [{prompter.variant}]"))
    samples = []
    for item in items:
        lp_true, lp_false = map(list, zip(*(next(scored) for _ in item.mc1_targets.choices)))
        labels = item.mc1_targets.labels
        scores = scoring.paper_tf_scores(lp_true, lp_false)
        credit = scoring.paper_tf_mc1(lp_true, lp_false, labels)
        samples.append({"id": item.id, "scores": scores, "logp_true": lp_true, "logp_false": lp_false,
                        "prediction": int(max(range(len(scores)), key=scores.__getitem__)),
                        "target": labels.index(1), "credit": credit})
    return samples


def hhh_ab(engine: Any, prompter: VariantPrompter, items: list[HHHItem], paper_cfg: Any) -> list[dict]:
    """One sample per item: (log P(A), log P(B)) in both orders and the tie-aware credit."""
    jobs = []
    for item in items:
        if len(item.choices) != 2:
            raise ValueError(f"{item.id}: HHH A/B needs exactly 2 choices, got {len(item.choices)}")
        for a, b in ((0, 1), (1, 0)):
            user = paper_cfg.hhh_user.format(context=item.input.strip(), option_a=item.choices[a].strip(),
                                             option_b=item.choices[b].strip())
            cp = prompter.chat(user)
            jobs.append((cp.prefix, cp.text + paper_cfg.hhh_assistant_prefix, paper_cfg.a_word, paper_cfg.b_word))
    scored = _pair_logps(engine, jobs, f"paper HHH-AB [{prompter.variant}]")
    samples = []
    for j, item in enumerate(items):
        orders = scored[2 * j: 2 * j + 2]
        credit = scoring.paper_hhh_ab(orders[0], orders[1], item.label)
        scores = [orders[0][0] + orders[1][1], orders[0][1] + orders[1][0]]
        samples.append({"id": item.id, "category": item.category, "logp_order_01": list(orders[0]),
                        "logp_order_10": list(orders[1]), "scores": scores,
                        "prediction": int(scores[1] > scores[0]), "target": item.label, "credit": credit})
    return samples
