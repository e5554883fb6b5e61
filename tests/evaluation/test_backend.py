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


class _Req:
    """What lm-eval hands an LM: an object whose ``args`` are the request's arguments."""

    def __init__(self, *args):
        self.args = args


def test_generate_until_one_engine_call_per_sampling_answers_in_request_order(engine, monkeypatch):
    from selfalign.evaluation.backend import make_lm
    from selfalign.generation.base import Request, SamplingParams

    calls = []  # (requests, sampling, results) of each engine.generate call; the real engine generates
    real_generate = engine.generate

    def recording_generate(requests, sampling):
        out = list(real_generate(requests, sampling))
        calls.append((list(requests), sampling, out))
        return out

    monkeypatch.setattr(engine, "generate", recording_generate)
    requests = [_Req("Q: one?", {"until": ["\n"], "max_gen_toks": 3}),
                _Req("Q: two?", {"until": "\n", "max_gen_toks": 2}),   # a bare string stop, another length
                _Req("Q: three?", {"until": ["\n"], "max_gen_toks": 3})]
    got = make_lm(engine, wrap=("Rules.\n", " A:")).generate_until(requests, disable_tqdm=True)
    assert [[r.id for r in reqs] for reqs, _, _ in calls] == [["0", "2"], ["1"]]
    assert [(s.max_new_tokens, s.stop, s.temperature) for _, s, _ in calls] == [(3, ("\n",), 0.0), (2, ("\n",), 0.0)]
    assert all(r.prefix == "Rules.\n" and r.text.endswith("? A:") for reqs, _, _ in calls for r in reqs)
    texts = {res.id: res.text for _, _, out in calls for res in out}
    assert got == [texts["0"], texts["1"], texts["2"]]
    alone = real_generate([Request("x", "Rules.\n", "Q: two? A:")], SamplingParams(max_new_tokens=2, stop=("\n",)))
    assert got[1] == next(iter(alone)).text


def test_lm_refuses_an_engine_that_cannot_score_and_a_missing_model():
    from selfalign.config import project_section
    from selfalign.evaluation.backend import make_lm
    from selfalign.generation.openai import OpenAIEngine

    with pytest.raises(TypeError, match="has no loglikelihood"):
        make_lm(OpenAIEngine(project_section("generation").openai))
    with pytest.raises(ValueError, match="pass engine= or pretrained="):
        make_lm(None)


def test_model_args_route_builds_the_engine_from_project_params(engine, tiny_model_dir):
    """``--model selfalign --model_args pretrained=<dir>``: lm-eval's registry gives our class, and the engine
    it builds from the repository's params scores as the one built directly."""
    from lm_eval.api.registry import get_model

    from selfalign.evaluation.backend import SelfAlignLM, make_lm

    assert get_model("selfalign") is SelfAlignLM
    req = [_Req("Question: Is the sky blue?", " yes")]
    via_args = SelfAlignLM(pretrained=str(tiny_model_dir)).loglikelihood(req, disable_tqdm=True)
    assert via_args[0][0] == pytest.approx(make_lm(engine).loglikelihood(req, disable_tqdm=True)[0][0], abs=1e-5)
