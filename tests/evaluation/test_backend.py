"""The grouped, cache-sharing lm-eval backend gives HFLM's log-likelihoods (tiny model, real lm-eval)."""

from __future__ import annotations

from pathlib import Path

import pytest

TASKS_DIR = Path(__file__).resolve().parents[2] / "eval" / "tasks"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from selfalign.config import GenerationConfig
    from selfalign.generation import make_engine

    return make_engine(GenerationConfig(batch_size=4), tiny_model_dir)


@pytest.fixture(scope="module")
def hflm(tiny_model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=4, dtype="float32")


def test_group_by_context_keeps_first_seen_order():
    from selfalign.evaluation.backend import group_by_context

    pairs = [("q1", " a"), ("q2", " x"), ("q1", " b"), ("q2", " y"), ("q3", " z")]
    assert group_by_context(pairs) == {"q1": [0, 2], "q2": [1, 3], "q3": [4]}


def test_backend_loglikelihoods_equal_hflm(engine, hflm, small_bench):
    from selfalign.evaluation.backend import make_lm
    from selfalign.evaluation.lmeval import load_task_configs, logliks, run_tasks

    names = ("selfalign_truthfulqa_mc1", "selfalign_truthfulqa_mc2", "selfalign_hhh_harmless")
    tasks = load_task_configs(TASKS_DIR, small_bench, names)
    lm = make_lm(engine)
    ours = run_tasks(lm, tasks, limit=3)
    ref = run_tasks(hflm, tasks, limit=3)
    n_pairs = 0
    for name in names:
        assert len(ours["samples"][name]) == len(ref["samples"][name]) == 3
        for a, b in zip(ours["samples"][name], ref["samples"][name]):
            assert a["arguments"] == b["arguments"]
            for x, y in zip(logliks(a), logliks(b)):
                assert x == pytest.approx(y, abs=1e-4)
                n_pairs += 1
        assert ours["results"][name]["acc"] == pytest.approx(ref["results"][name]["acc"], abs=1e-6)
    # one engine call per distinct context (MC1 and MC2 share the question; some HHH dialogues share
    # their input), not per (context, choice) pair
    contexts = {arg[0] for name in names for s in ours["samples"][name] for arg in s["arguments"]}
    assert lm.calls == len(contexts) < n_pairs


def test_context_prefix_is_prepended(engine):
    from selfalign.evaluation.backend import make_lm

    class Req:
        def __init__(self, *args):
            self.args = args

    plain = make_lm(engine).loglikelihood([Req("Question: Is the sky blue?", " yes")], disable_tqdm=True)
    prefixed = make_lm(engine, context_prefix="Hello!\n").loglikelihood(
        [Req("Question: Is the sky blue?", " yes")], disable_tqdm=True)
    direct = engine.loglikelihood("Hello!\nQuestion: Is the sky blue?", [" yes"])
    assert prefixed[0][0] == pytest.approx(direct[0][0], abs=1e-5)
    assert prefixed[0][0] != pytest.approx(plain[0][0], abs=1e-3)


def test_score_after_prefix_equals_direct_scoring(engine):
    from selfalign.evaluation.backend import score_after_prefix

    prefix = ("I should follow principles: helpful, candor, dated-knowledge. " * 12).strip() + "\n\n### User\n"
    rest = "Question: Is the sky blue?\n\n### Assistant\nThe answer is"
    conts = [" yes", " no", " true, the sky is blue.", " false"]
    direct = engine.loglikelihood(prefix + rest, conts)
    calls = []
    real = engine.loglikelihood

    def spy(context, continuations):
        calls.append(context)
        return real(context, continuations)

    engine.loglikelihood = spy
    try:
        shared = score_after_prefix(engine, prefix, rest, conts)
    finally:
        engine.loglikelihood = real
    assert calls == [prefix]  # the long prefix is the (cached) context; rest moved into the continuations
    for (a, _), (b, _) in zip(shared, direct):
        assert a == pytest.approx(b, abs=1e-4)


def test_score_after_prefix_falls_back_when_not_worth_it(engine):
    from selfalign.evaluation.backend import score_after_prefix

    calls = []
    real = engine.loglikelihood
    engine.loglikelihood = lambda c, conts: calls.append(c) or real(c, conts)
    try:
        score_after_prefix(engine, "Hi. ", "Question: Is the sky blue? Please answer in one word. A:", [" yes", " no"])
    finally:
        engine.loglikelihood = real
    assert calls == ["Hi. Question: Is the sky blue? Please answer in one word. A:"]


def test_shared_heads_finds_the_common_primer():
    from selfalign.evaluation.backend import shared_heads

    primer = "Q: a?\nA: b.\n\nQ: c?\nA: d.\n\n"
    ctxs = [primer + "Q: x?\nA:", primer + "Q: y?\nA:", "Human: hi\n\nAssistant:", primer + "Q: x?\nA:"]
    heads = shared_heads(ctxs, min_share=2)
    assert heads[primer + "Q: x?\nA:"] == primer and heads[primer + "Q: y?\nA:"] == primer
    assert heads["Human: hi\n\nAssistant:"] == ""   # shared with no other context
    assert shared_heads(ctxs, min_share=3)[primer + "Q: x?\nA:"] == ""  # only 2 distinct contexts share it
