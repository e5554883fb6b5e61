"""The grouped, cache-sharing lm-eval backend gives HFLM's log-likelihoods (tiny model, real lm-eval)."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfalign.generation.scoring import loglikelihood

TASKS_DIR = Path(__file__).resolve().parents[2] / "eval" / "tasks"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from selfalign.config import project_section
    from selfalign.generation import make_engine

    return make_engine(project_section("generation", batch_size=4), tiny_model_dir)


@pytest.fixture(scope="module")
def hflm(tiny_model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=4, dtype="float32")


def test_backend_loglikelihoods_equal_hflm(engine, hflm, small_bench):
    from selfalign.evaluation.backend import make_lm
    from selfalign.evaluation.lmeval import load_task_configs, logliks, run_tasks

    names = ("selfalign_truthfulqa_mc1", "selfalign_truthfulqa_mc2", "selfalign_hhh_harmless")
    tasks = load_task_configs(TASKS_DIR, small_bench, names)
    lm = make_lm(engine)
    # 5 questions: more than shared_heads' min_share, so the 6-shot primer is a shared (cached) head
    ours = run_tasks(lm, tasks, limit=5)
    ref = run_tasks(hflm, tasks, limit=5)
    n_pairs = 0
    for name in names:
        assert len(ours["samples"][name]) == len(ref["samples"][name]) > 0
        for a, b in zip(ours["samples"][name], ref["samples"][name]):
            assert a["arguments"] == b["arguments"]
            for x, y in zip(logliks(a), logliks(b)):
                assert x == pytest.approx(y, abs=1e-4)
                n_pairs += 1
        assert ours["results"][name]["acc"] == pytest.approx(ref["results"][name]["acc"], abs=1e-6)
    # lm-eval hands each request type over once: one engine call for all pairs of all tasks
    assert lm.calls == 1 and n_pairs > 40


def test_context_wrap_frames_every_context(engine):
    from selfalign.evaluation.backend import make_lm

    class Req:
        def __init__(self, *args):
            self.args = args

    plain = make_lm(engine).loglikelihood([Req("Question: Is the sky blue?", " yes")], disable_tqdm=True)
    wrapped = make_lm(engine, wrap=("Hello!\nUser: ", "\n\nAssistant:")).loglikelihood(
        [Req("Question: Is the sky blue?", " yes")], disable_tqdm=True)
    direct = loglikelihood(engine, "Hello!\nUser: Question: Is the sky blue?\n\nAssistant:", [" yes"])
    assert wrapped[0][0] == pytest.approx(direct[0][0], abs=1e-5)
    assert wrapped[0][0] != pytest.approx(plain[0][0], abs=1e-3)


def test_shared_heads_finds_the_common_primer():
    from selfalign.evaluation.backend import shared_heads

    primer = "Q: a?\nA: b.\n\nQ: c?\nA: d.\n\n"
    ctxs = [primer + "Q: x?\nA:", primer + "Q: y?\nA:", "Human: hi\n\nAssistant:", primer + "Q: x?\nA:"]
    heads = shared_heads(ctxs, min_share=2)
    assert heads[primer + "Q: x?\nA:"] == primer and heads[primer + "Q: y?\nA:"] == primer
    assert heads["Human: hi\n\nAssistant:"] == ""   # shared with no other context
    assert shared_heads(ctxs, min_share=3)[primer + "Q: x?\nA:"] == ""  # only 2 distinct contexts share it


def test_bench_eval_reports_speed_and_equal_accuracy(config, tiny_model_dir, small_bench):
    """``selfalign bench eval`` on the tiny model: the JSON contract, and the backend's accuracy equals HFLM's."""
    from selfalign.bench import eval as bench_eval

    result = bench_eval.run(config, str(tiny_model_dir), str(small_bench), str(TASKS_DIR), limit=5, hflm_batch_size=4)
    for key in ("backend_s", "hflm_s", "speedup_vs_hflm", "max_abs_acc_diff", "tasks", "n_docs"):
        assert key in result, key
    assert result["max_abs_acc_diff"] <= 0.005 and result["max_abs_loglik_diff"] < 1e-3
    assert result["n_docs"] > 0
    assert len(result["tasks"]) == 6
    # the backend runs fewer tokens than HFLM on TruthfulQA (primer shared, each question once)
    assert result["groups"]["truthfulqa"]["model_tokens"]["ratio"] > 2
    # our TruthfulQA YAMLs score exactly as lm-eval's built-in definitions on the same docs
    assert result["builtin_truthfulqa"]["max_abs_diff"] == 0.0
    assert result["builtin_truthfulqa"]["mc1"]["n_docs"] == 5


def test_wrapped_contexts_without_a_primer_still_share_the_preamble(engine):
    """The prompted variant's preamble ends "User: "; its trailing space belongs to the next word's token,
    so the shared head must stop before it, or each dialogue-style context re-encodes the whole preamble."""
    from selfalign.evaluation.backend import make_lm

    class Req:
        def __init__(self, *args):
            self.args = args

    before, after = "Rules: be kind.\n\nUser: ", "\n\nAssistant:"
    contexts = ["Human: hi there", "Human: what is two plus two", "Human: name a colour"]
    engine._prefix_caches.clear()
    got = make_lm(engine, wrap=(before, after)).loglikelihood([Req(c, " yes") for c in contexts], disable_tqdm=True)
    heads = [engine.tok.decode(list(k)) for k in engine._prefix_caches]
    assert heads == [before.rstrip()]  # one shared head: the preamble, cut before its trailing space
    for c, (lp, _) in zip(contexts, got):
        assert lp == pytest.approx(loglikelihood(engine, before + c + after, [" yes"])[0][0], abs=1e-4)
