"""Packed prefix-tree scoring: layout units and exact equality with a plain forward pass per pair and with
lm-eval's HFLM; the dispatch over engines."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from selfalign.generation.encoding import hflm_encode_pair
from selfalign.generation.scoring import (PackedScorer, batch_rows, can_score, loglikelihood, loglikelihood_pairs,
                                          pack_rows, plan, split_context)


def test_split_context_shares_only_a_clean_token_prefix():
    assert split_context([1, 2, 3, 4], [1, 2]) == ((1, 2), [3, 4])
    assert split_context([1, 2, 3, 4], [1, 9]) == ((1,), [2, 3, 4])  # the common token prefix only
    assert split_context([1, 2, 3, 4], [5]) == ((), [1, 2, 3, 4])
    assert split_context([1, 2], [1, 2]) == ((1,), [2])  # the last context token stays in the row
    assert split_context([1, 2, 3], None) == ((), [1, 2, 3])


def test_pack_rows_layout_and_row_cap():
    rows = pack_rows((7,), [10, 11], [(0, [20, 21, 22]), (1, [30]), (2, [40, 41])], row_cap=4)
    # continuation inputs are cont[:-1]: [20, 21], [], [40]; the third would make 5 > 4 tokens
    assert [r.ids for r in rows] == [[10, 11, 20, 21], [10, 11, 40]]
    first, second = rows
    assert first.seg == [0, 0, 1, 1] and first.pos == [0, 1, 2, 3]
    assert first.reads == [(0, [1, 2, 3], [20, 21, 22]),  # predicted at the last rest position, then its own inputs
                           (1, [1], [30])]  # a one-token continuation is read at the last rest position only
    assert second.seg == [0, 0, 1] and second.pos == [0, 1, 2] and second.reads == [(2, [1, 2], [40, 41])]
    assert all(r.cache == (7,) for r in rows)


def test_pack_rows_starts_a_new_row_at_the_cap_and_keeps_long_continuations():
    rows = pack_rows((), [1], [(0, [2] * 10), (1, [3] * 3)], row_cap=4)
    assert [len(r) for r in rows] == [10, 3]  # the long one alone (over the cap), then a fresh row
    assert rows[1].ids == [1, 3, 3] and rows[1].pos == [0, 1, 2]


def test_batch_rows_respects_the_token_budget():
    rows = [pack_rows((), [1] * n, [(0, [2])], row_cap=100)[0] for n in (5, 9, 3, 8, 2, 5)]
    batches = list(batch_rows(rows, token_budget=18, min_fill=0.0))
    assert [[len(r) for r in b] for b in batches] == [[9, 8], [5, 5, 3], [2]]
    assert all(len(b) * len(b[0]) <= 18 for b in batches)
    # rows much shorter than the batch's width start a new batch (padding is wasted work)
    assert [[len(r) for r in b] for b in batch_rows(rows, token_budget=100, min_fill=0.75)] == [[9, 8], [5, 5], [3], [2]]


def test_plan_scores_duplicates_once():
    def enc(c, x):
        return [len(c)], [7] * len(x)  # the empty continuation has no tokens

    rows, index, n = plan([("a", "x"), ("b", "x"), ("a", "x"), ("a", "")], {}, enc, lambda h: [], 100, 64)
    assert n == 3 and index == [0, 1, 0, 2]
    assert sum(len(r.reads) for rs in rows.values() for r in rs) == 2  # the empty continuation is not run


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from selfalign.config import project_section
    from selfalign.generation import make_engine

    # a tiny budget forces several rows per context and several batches
    return make_engine(project_section("generation", batch_size=4, score_token_budget=96), tiny_model_dir)


def _direct(engine, context: str, cont: str) -> tuple[float, bool]:
    ctx_ids, cont_ids = hflm_encode_pair(engine.tok, context, cont)
    if not cont_ids:
        return 0.0, True
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(input_ids=torch.tensor([ctx_ids + cont_ids])).logits[0].float(), -1)
    rows = logp[len(ctx_ids) - 1: len(ctx_ids) + len(cont_ids) - 1]
    target = torch.tensor(cont_ids)
    return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_loglikelihood_pairs_equal_one_forward_per_pair(engine):
    primer = "Q: What is two plus two?\nA: Four.\n\nQ: Is ice cold?\nA: Yes.\n\n"
    questions = [f"Q: Question number {i} about the sky?\nA:" for i in range(5)]
    conts = [" Blue.", " It is green, of course, and very nice to look at all day long.", " No", "", " Blue."]
    pairs = [(primer + q, c) for q in questions for c in conts]
    pairs += [("", "The quick brown fox"), ("Human: hi\n\nAssistant:", " Hello there!")]
    heads = {primer + q: primer for q in questions}
    heads["Human: hi\n\nAssistant:"] = "Human: hi there friend"  # shares only the common token prefix
    got = loglikelihood_pairs(engine, pairs, heads=heads)
    assert len(got) == len(pairs)
    for (context, cont), (lp, greedy) in zip(pairs, got):
        ref_lp, ref_greedy = _direct(engine, context, cont)
        assert lp == pytest.approx(ref_lp, abs=1e-4), (context, cont)
        assert greedy == ref_greedy


def test_shared_head_is_cached_once_and_not_in_the_rows(engine):
    primer = "Some shared primer text.\n\n" * 4
    pairs = [(primer + f"Q{i}:", c) for i in range(3) for c in (" a", " bb")]
    encode_pair = partial(hflm_encode_pair, engine.tok)
    rows, _, _ = plan(pairs, {c: primer for c, _ in pairs}, encode_pair,
                      lambda h: encode_pair(h.rstrip(), "")[0], engine.max_context, 64)
    (cache, cache_rows), = rows.items()
    assert len(cache) > 10  # the primer's tokens, once
    assert all(len(r) < len(cache) for r in cache_rows)  # rows hold only the question and choices


@pytest.fixture(scope="module")
def default_engine(tiny_model_dir):
    from selfalign.config import project_section
    from selfalign.generation import make_engine

    return make_engine(project_section("generation", batch_size=4), tiny_model_dir)


def test_score_equals_direct_forward_loglikelihood(default_engine):
    context = "Question: Is the sky blue? Answer:"
    conts = [" yes", " no, it is green", " A", " true or false and more words here"]
    got = loglikelihood(default_engine, context, conts)
    for cont, (lp, greedy) in zip(conts, got):
        ref_lp, ref_greedy = _direct(default_engine, context, cont)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy
    assert PackedScorer(default_engine).loglikelihood(context, conts) == got
    assert len({round(lp, 3) for lp, _ in got}) == len(conts)  # distinct continuations, distinct scores


def test_loglikelihood_matches_lm_eval_hflm(default_engine):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    engine = default_engine
    lm = HFLM(pretrained=engine.model, tokenizer=engine.tok, batch_size=2, device="cpu")
    cases = [("Question: Is the sky blue? Answer: ", [" yes", "no", " A"]), ("", ["The quick brown fox"])]
    for context, conts in cases:
        reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(context, c), idx=i)
                for i, c in enumerate(conts)]
        ref = lm.loglikelihood(reqs, disable_tqdm=True)
        got = loglikelihood(engine, context, conts)
        for (a, ga), (b, gb) in zip(got, ref):
            assert a == pytest.approx(b, abs=1e-4)
            assert ga == gb


class _PerContextEngine:
    """An engine that scores one context at a time (the vLLM engine's shape), on the HF engine's numbers."""

    name = "per-context"

    def __init__(self, engine):
        self.inner = engine
        self.calls: list[tuple[str, list[str]]] = []

    def loglikelihood(self, context, continuations):
        self.calls.append((context, list(continuations)))
        return loglikelihood(self.inner, context, continuations)


def test_engines_with_only_loglikelihood_get_one_call_per_distinct_context(default_engine):
    pairs = [("Q: a?", " yes"), ("Q: b?", " no"), ("Q: a?", " no"), ("Q: a?", " yes")]
    per_context = _PerContextEngine(default_engine)
    assert can_score(per_context) and can_score(default_engine)
    got = loglikelihood_pairs(per_context, pairs)
    assert [c for c, _ in per_context.calls] == ["Q: a?", "Q: b?"]
    assert per_context.calls[0][1] == [" yes", " no", " yes"]
    for (lp, greedy), (ref_lp, ref_greedy) in zip(got, loglikelihood_pairs(default_engine, pairs)):
        assert lp == pytest.approx(ref_lp, abs=1e-5) and greedy == ref_greedy


def test_an_engine_that_cannot_score_is_refused():
    class GenerateOnly:
        name = "openai"

    assert not can_score(GenerateOnly())
    with pytest.raises(TypeError, match="'openai' cannot score"):
        loglikelihood_pairs(GenerateOnly(), [("a", "b")])


# ------------------------------------------------------------------ other families: sliding windows, fallback
def test_split_by_reads_bounds_the_logit_rows_per_forward():
    from selfalign.generation.scoring import head_positions, split_by_reads

    rows = [pack_rows((), [1, 2], [(0, [5, 6, 7]), (1, [8])], row_cap=100)[0],
            pack_rows((), [3], [(2, [9] * 6)], row_cap=100)[0], pack_rows((), [4], [(3, [9])], row_cap=100)[0]]
    assert [r.n_reads for r in rows] == [3, 6, 1]  # the last rest position is read once for both continuations
    assert [[r.n_reads for r in g] for g in split_by_reads(rows, 4)] == [[3], [6], [1]]
    assert [[r.n_reads for r in g] for g in split_by_reads(rows, 10)] == [[3, 6, 1]]
    assert head_positions(49152) == 1365 and head_positions(262144) == 256


@pytest.mark.parametrize("fixture", ["tiny_gemma3_dir", "tiny_gemma2_dir"])
def test_scores_equal_the_plain_forward_on_gemma(fixture, request, monkeypatch):
    """Gemma 3 (sliding window 6, primer > window, final soft-cap) through the kernel and Gemma 2 (the
    fallback: its own attention, no shared head) score each pair as the model's own forward does."""
    from selfalign.config import project_section
    from selfalign.generation import make_engine
    from selfalign.generation import scoring
    from selfalign.models import load_model

    model_dir = request.getfixturevalue(fixture)
    monkeypatch.setattr(scoring, "_LOGIT_ELEMENTS", 20 * 400)  # ~20 read positions per forward: several groups
    engine = make_engine(project_section("generation", batch_size=4, score_token_budget=96), model_dir)
    assert engine.shares_prefix == (fixture == "tiny_gemma3_dir")
    plain = load_model(model_dir)
    primer = "Q: What is two plus two?\nA: Four.\n\nQ: Is ice cold?\nA: Yes.\n\n"
    questions = [f"Q: Question number {i} about the sky?\nA:" for i in range(3)]
    conts = [" Blue.", " It is green, of course, and very nice to look at all day long.", " No", ""]
    pairs = [(primer + q, c) for q in questions for c in conts] + [("", "The quick brown fox")]
    got = loglikelihood_pairs(engine, pairs, heads={primer + q: primer for q in questions})
    assert len(engine._prefix_caches) == (1 if engine.shares_prefix else 0)
    for (context, cont), (lp, greedy) in zip(pairs, got):
        ctx_ids, cont_ids = hflm_encode_pair(engine.tok, context, cont)
        if not cont_ids:
            assert (lp, greedy) == (0.0, True)
            continue
        with torch.no_grad():
            logp = torch.log_softmax(plain(input_ids=torch.tensor([ctx_ids + cont_ids])).logits[0].float(), -1)
        rows = logp[len(ctx_ids) - 1: len(ctx_ids) + len(cont_ids) - 1]
        target = torch.tensor(cont_ids)
        assert lp == pytest.approx(float(rows.gather(-1, target[:, None]).sum()), abs=1e-4), (context, cont)
        assert greedy == bool((rows.argmax(-1) == target).all())
