"""HF engine on the tiny model: prefix reuse, token-exact greedy, sampling rules, overflow, scoring."""

from __future__ import annotations

import pytest
import torch

from selfalign.io import UserError
from selfalign.config import project_section
from selfalign.generation import make_engine
from selfalign.generation.base import Request, SamplingParams, by_id
from selfalign.generation.hf import HFEngine, NgramCounter

PREFIX = "User: What is the capital of France?\n\nAssistant: The capital of France is Paris.\n\n"
TEXTS = ["User: Is the sky blue?", "User: Hello!\n\nAssistant:", "1. Instruction: Write a poem",
         "def sort_numbers(xs):", "The quick brown fox", "Numbers 0 1 2 3"]


def _requests(prefix: str = PREFIX) -> list[Request]:
    return [Request(f"r{i}", prefix, t) for i, t in enumerate(TEXTS)]


def _engine(model_dir, **gen) -> HFEngine:
    return make_engine(project_section("generation", **gen), model_dir)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> HFEngine:
    return _engine(tiny_model_dir, batch_size=4)


def _decode_rows(engine: HFEngine, requests, sampling):
    """Run the decode loop directly to inspect generated token ids."""
    rows = []
    for grp in engine._plan(requests, sampling):
        engine._decode_batch(grp.cache_ids, grp.rows, sampling, None)
        rows += grp.rows
    return {r.req.id: r for r in rows}


def test_greedy_cached_equals_uncached_generate_token_for_token(engine, tiny_model_dir):
    """bs=1 engine output (prefix from its KV cache) == model.generate on tok(prefix)+tok(text)."""
    eng1 = _engine(tiny_model_dir, batch_size=1)
    sampling = SamplingParams(max_new_tokens=24)
    rows = _decode_rows(eng1, _requests(), sampling)
    for req in _requests():
        ids = eng1.encode(req.prefix) + eng1.encode(req.text)
        x = torch.tensor([ids])
        ref = eng1.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                                  pad_token_id=eng1.pad_id)[0, len(ids):].tolist()
        if eng1.tok.eos_token_id in ref:
            ref = ref[: ref.index(eng1.tok.eos_token_id)]
        assert rows[req.id].out == ref, req.id
        assert rows[req.id].prompt_tokens == len(ids)


def test_batched_equals_single_and_results_complete(engine, tiny_model_dir):
    sampling = SamplingParams(max_new_tokens=24)
    batched = by_id(engine.generate(_requests(), sampling))
    single = by_id(_engine(tiny_model_dir, batch_size=1).generate(_requests(), sampling))
    assert set(batched) == {r.id for r in _requests()}
    assert {k: v.text for k, v in batched.items()} == {k: v.text for k, v in single.items()}
    assert all(r.finish == "length" and r.completion_tokens == 24 for r in batched.values())


def test_prefix_encoded_once_across_batches_and_calls(tiny_model_dir):
    eng = _engine(tiny_model_dir, batch_size=2)
    plen = len(eng.encode(PREFIX)) - 1
    seen = []
    orig = eng._forward

    def spy(ids, *a, **k):
        seen.append(ids.shape[1])
        return orig(ids, *a, **k)

    eng._forward = spy
    sampling = SamplingParams(max_new_tokens=4)
    list(eng.generate(_requests(), sampling))
    list(eng.generate(_requests()[:3], sampling))
    assert seen.count(plen) == 1  # 6 + 3 requests, 5 batches, one prefix forward
    assert len(eng._prefix_caches) == 1


def test_stop_strings_cut_rows_independently(engine):
    sampling = SamplingParams(max_new_tokens=24)
    free = by_id(engine.generate(_requests(), sampling))
    target = "r1"
    text = free[target].text
    stop = text[6:9]
    assert stop and text.find(stop) > 0
    stopped = by_id(engine.generate(_requests(), SamplingParams(max_new_tokens=24, stop=(stop,))))
    assert stopped[target].text == text[: text.find(stop)]
    assert stopped[target].finish == "stop"
    for rid, res in stopped.items():  # other rows: same text up to their own first stop occurrence
        cut = free[rid].text.find(stop)
        assert res.text == (free[rid].text if cut < 0 else free[rid].text[:cut])
        assert res.finish == ("length" if cut < 0 else "stop")


def test_eos_logit_bias_ends_rows_and_token_bias_forces_token(engine):
    eos = engine.tok.eos_token
    res = by_id(engine.generate(_requests(), SamplingParams(max_new_tokens=8, logit_bias={eos: 100.0})))
    assert all(r.text == "" and r.finish == "stop" and r.completion_tokens == 0 for r in res.values())
    tok_str = "fox" if "fox" in engine.tok.get_vocab() else engine.tok.convert_ids_to_tokens(300)
    tid = engine.tok.get_vocab()[tok_str]
    res = by_id(engine.generate(_requests(), SamplingParams(max_new_tokens=5, logit_bias={tok_str: 100.0})))
    assert all(r.text == engine.tok.decode([tid] * 5) for r in res.values())
    with pytest.raises(UserError, match="not a single token"):
        list(engine.generate(_requests(), SamplingParams(logit_bias={"not one token at all": 1.0})))


def test_ngram_counter_counts_generated_continuations():
    c = NgramCounter((1.0, 0.0, 2.0))
    for t in [5, 6, 7, 5, 6]:
        c.push(t)
    pen = c.penalties()
    # order 1: 5 twice, 6 twice, 7 once; order 3: context (5, 6) was followed by 7 once -> 2.0
    assert pen == {5: 2.0, 6: 2.0, 7: 1.0 + 2.0}


def _ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def test_ngram_penalties_remove_repetition(engine):
    reqs = _requests()
    base = _decode_rows(engine, reqs, SamplingParams(max_new_tokens=30))
    assert any(len(set(r.out)) < len(r.out) for r in base.values())  # the random model repeats itself
    uni = _decode_rows(engine, reqs, SamplingParams(max_new_tokens=30, ngram_penalties=(1e4,)))
    assert all(len(set(r.out)) == len(r.out) for r in uni.values())
    assert any(len(set(_ngrams(r.out, 2))) < len(_ngrams(r.out, 2)) for r in base.values())
    bi = _decode_rows(engine, reqs, SamplingParams(max_new_tokens=30, ngram_penalties=(0.0, 1e4)))
    for r in bi.values():
        assert len(set(_ngrams(r.out, 2))) == len(_ngrams(r.out, 2))


def test_sampling_is_seeded_per_request_not_per_batch(tiny_model_dir, engine):
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=7)
    a = by_id(engine.generate(_requests(), sampling))
    b = by_id(_engine(tiny_model_dir, batch_size=1).generate(list(reversed(_requests())), sampling))
    c = by_id(engine.generate(_requests()[2:], sampling))
    assert {k: v.text for k, v in a.items()} == {k: v.text for k, v in b.items()}
    assert all(c[k].text == a[k].text for k in c)
    d = by_id(engine.generate(_requests(), SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=8)))
    assert any(d[k].text != a[k].text for k in a)


def test_overflow_policies(tiny_model_dir):
    text = "\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(8))
    req = [Request("long", PREFIX, text)]
    full = len(tiny_tokenizer_ids(tiny_model_dir, PREFIX)) + len(tiny_tokenizer_ids(tiny_model_dir, text))
    limit = 100 - 16
    assert full > limit
    sampling = SamplingParams(max_new_tokens=40)
    drop = next(_engine(tiny_model_dir, max_context=100, min_new_tokens_reserved=16).generate(req, sampling))
    assert drop.prompt_tokens <= limit and drop.truncated_tokens == full - drop.prompt_tokens > 0
    assert drop.completion_tokens <= 100 - drop.prompt_tokens
    left = next(_engine(tiny_model_dir, max_context=100, min_new_tokens_reserved=16,
                        overflow="truncate_left").generate(req, sampling))
    assert left.prompt_tokens == limit and left.truncated_tokens == full - limit
    assert left.completion_tokens <= 16 and left.finish == "length"
    with pytest.raises(UserError, match="long"):
        list(_engine(tiny_model_dir, max_context=100, min_new_tokens_reserved=16,
                     overflow="error").generate(req, sampling))


def tiny_tokenizer_ids(model_dir, text: str) -> list[int]:
    from selfalign.models import load_tokenizer

    return load_tokenizer(model_dir)(text, add_special_tokens=False)["input_ids"]


def _direct_loglik(engine: HFEngine, ctx_ids: list[int], cont_ids: list[int]) -> tuple[float, bool]:
    x = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(input_ids=x).logits[0].float(), -1)
    rows = logp[len(ctx_ids) - 1: len(ctx_ids) + len(cont_ids) - 1]
    target = torch.tensor(cont_ids)
    return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_score_equals_direct_forward_loglikelihood(engine):
    context = "Question: Is the sky blue? Answer:"
    conts = [" yes", " no, it is green", " A", " true or false and more words here"]
    got = engine.loglikelihood(context, conts)
    for cont, (lp, greedy) in zip(conts, got):
        ctx_ids, cont_ids = engine._encode_pair(context, cont)
        ref_lp, ref_greedy = _direct_loglik(engine, ctx_ids, cont_ids)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy
    assert engine.score(context, conts) == [lp for lp, _ in got]
    assert len({round(lp, 3) for lp, _ in got}) == len(conts)  # distinct continuations, distinct scores


def test_loglikelihood_matches_lm_eval_hflm(engine):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=engine.model, tokenizer=engine.tok, batch_size=2, device="cpu")
    cases = [("Question: Is the sky blue? Answer: ", [" yes", "no", " A"]), ("", ["The quick brown fox"])]
    for context, conts in cases:
        reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(context, c), idx=i)
                for i, c in enumerate(conts)]
        ref = lm.loglikelihood(reqs, disable_tqdm=True)
        got = engine.loglikelihood(context, conts)
        for (a, ga), (b, gb) in zip(got, ref):
            assert a == pytest.approx(b, abs=1e-4)
            assert ga == gb
