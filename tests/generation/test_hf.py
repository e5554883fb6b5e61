"""HF engine on the tiny model: prefix reuse, token-exact greedy, sampling rules, overflow."""

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


def _token_ids(engine: HFEngine, requests, sampling) -> dict[str, list[int]]:
    return dict(engine.generate_token_ids(requests, sampling))


def test_greedy_cached_equals_uncached_generate_token_for_token(engine, tiny_model_dir):
    """bs=1 engine output (prefix from its KV cache) == model.generate on tok(prefix)+tok(text)."""
    eng1 = _engine(tiny_model_dir, batch_size=1)
    sampling = SamplingParams(max_new_tokens=24)
    out = _token_ids(eng1, _requests(), sampling)
    results = by_id(eng1.generate(_requests(), sampling))
    for req in _requests():
        ids = eng1.encode(req.prefix) + eng1.encode(req.text)
        x = torch.tensor([ids])
        ref = eng1.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                                  pad_token_id=eng1.pad_id)[0, len(ids):].tolist()
        if eng1.tok.eos_token_id in ref:
            ref = ref[: ref.index(eng1.tok.eos_token_id)]
        assert out[req.id] == ref, req.id
        assert results[req.id].prompt_tokens == len(ids)


def test_generate_token_ids_are_the_tokens_generate_decodes(engine):
    """The public token-id view runs the same decode as generate(): same ids behind every text."""
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=3, ngram_penalties=(0.5,))
    ids = _token_ids(engine, _requests(), sampling)
    results = by_id(engine.generate(_requests(), sampling))
    assert set(ids) == set(results)
    for rid, res in results.items():
        assert res.completion_tokens == len(ids[rid])
        assert engine.tok.decode(ids[rid]) == res.text


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
    base = _token_ids(engine, reqs, SamplingParams(max_new_tokens=30))
    assert any(len(set(out)) < len(out) for out in base.values())  # the random model repeats itself
    uni = _token_ids(engine, reqs, SamplingParams(max_new_tokens=30, ngram_penalties=(1e4,)))
    assert all(len(set(out)) == len(out) for out in uni.values())
    assert any(len(set(_ngrams(out, 2))) < len(_ngrams(out, 2)) for out in base.values())
    bi = _token_ids(engine, reqs, SamplingParams(max_new_tokens=30, ngram_penalties=(0.0, 1e4)))
    for out in bi.values():
        assert len(set(_ngrams(out, 2))) == len(_ngrams(out, 2))


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


# ------------------------------------------------------------------ sliding windows and the fallback
def _generate_ref(model, ids: list[int], max_new: int, eos: int, pad: int) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                         pad_token_id=pad)[0, len(ids):].tolist()
    return out[: out.index(eos)] if eos in out else out


@pytest.mark.parametrize("prefix", ["User: hi\n", PREFIX])  # shorter and longer than the window (6 tokens)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_gemma3_engine_greedy_equals_plain_generate(tiny_gemma3_dir, prefix, batch_size):
    """Sliding-window model: cached prefix tails + left-padded batches decode the tokens the model's own
    attention generates (model.generate on a separately loaded plain model)."""
    from selfalign.models import load_model

    eng = _engine(tiny_gemma3_dir, batch_size=batch_size)
    assert eng.shares_prefix
    plain = load_model(tiny_gemma3_dir)
    assert plain.config._attn_implementation != eng.model.config._attn_implementation
    out = _token_ids(eng, _requests(prefix), SamplingParams(max_new_tokens=20))
    for req in _requests(prefix):
        ids = eng.encode(req.prefix) + eng.encode(req.text)
        assert out[req.id] == _generate_ref(plain, ids, 20, eng.tok.eos_token_id, eng.pad_id), req.id
    if prefix == PREFIX:
        assert len(eng.encode(PREFIX)) > 2 * plain.config.sliding_window


def test_gemma3_sampling_equals_with_and_without_prefix_sharing(tiny_gemma3_dir):
    """Seeded sampling: the kernel engine and the fallback layout (every row its whole prompt) agree."""
    eng = _engine(tiny_gemma3_dir, batch_size=4)
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=5)
    shared = _token_ids(eng, _requests(), sampling)
    eng.shares_prefix = False  # the fallback's layout on the same model
    eng._prefix_caches.clear()
    assert _token_ids(eng, _requests(), sampling) == shared


def test_unsupported_model_falls_back_to_its_own_attention(tiny_gemma2_dir, caplog):
    """Gemma 2 (attention soft-capping): one log line, no prefix cache, tokens equal model.generate."""
    import logging

    from selfalign.models import load_model

    with caplog.at_level(logging.WARNING):
        eng = _engine(tiny_gemma2_dir, batch_size=4)
    assert not eng.shares_prefix
    assert sum("shared-prefix attention off" in r.getMessage() for r in caplog.records) == 1
    plain = load_model(tiny_gemma2_dir)
    out = _token_ids(eng, _requests(), SamplingParams(max_new_tokens=12))
    assert not eng._prefix_caches
    for req in _requests():
        ids = eng.encode(req.prefix) + eng.encode(req.text)
        assert out[req.id] == _generate_ref(plain, ids, 12, eng.tok.eos_token_id, eng.pad_id), req.id


def test_engine_start_refuses_a_model_that_ignores_the_kernel(tiny_gemma3_dir, monkeypatch):
    """The start-up check runs on the engine's model: an attention dropping ``shared_prefix`` is refused."""
    from transformers.models.gemma3 import modeling_gemma3

    orig = modeling_gemma3.Gemma3Attention.forward
    monkeypatch.setattr(modeling_gemma3.Gemma3Attention, "forward",
                        lambda self, *a, **k: orig(self, *a, **{x: y for x, y in k.items() if x != "shared_prefix"}))
    with pytest.raises(UserError, match="shared-prefix attention does not reproduce"):
        _engine(tiny_gemma3_dir, batch_size=2)
