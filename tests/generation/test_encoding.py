"""The one BOS convention (selfalign.generation.encoding): read off what the tokenizer does, applied once
by generation (HF engine), training (SFT encoding) and scoring alike -- shown on a tokenizer that HAS a
BOS (tests/bos_assets.py, Gemma-like) and on the ChatML one that adds none (SmolLM2-like)."""

from __future__ import annotations

import pytest
import torch
from bos_assets import build_bos_model, build_bos_tokenizer

from selfalign.config import project_section
from selfalign.generation.base import Request, SamplingParams
from selfalign.generation.encoding import bos_ids, encode_text, hflm_encode, hflm_encode_pair, prompt_ids, with_bos
from selfalign.generation.hf import HFEngine
from selfalign.prompts.training import end_of_answer, split_shared_prefix, training_prompt
from selfalign.training.data import encode_example

SYSTEM = "You are Bactrian, a helpful assistant."


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory):
    """Saved and reloaded, as every stage loads it (the post-processor must survive the round trip)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("bos-tok")
    build_bos_tokenizer().save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def bos_engine(bos_tok):
    return HFEngine(build_bos_model(bos_tok), bos_tok, project_section("generation", batch_size=4))


def test_bos_is_what_the_tokenizer_does_not_what_add_bos_token_says(bos_tok, tiny_tokenizer):
    # Gemma 3's case: the attribute reads False while tok("") is [bos]
    assert getattr(bos_tok, "add_bos_token", False) is False and bos_tok("")["input_ids"] == [bos_tok.bos_token_id]
    assert bos_ids(bos_tok) == [bos_tok.bos_token_id]
    # SmolLM2's case: a bos_token is declared (<|im_start|>) but never added
    assert tiny_tokenizer.bos_token is not None and tiny_tokenizer("")["input_ids"] == []
    assert bos_ids(tiny_tokenizer) == []


def test_with_bos_adds_it_once_and_never_twice(bos_tok, tiny_tokenizer):
    b = bos_tok.bos_token_id
    assert with_bos([7, 8], bos_tok) == [b, 7, 8]
    assert with_bos([b, 7, 8], bos_tok) == [b, 7, 8]
    assert with_bos([], bos_tok) == [b]
    assert with_bos([7, 8], tiny_tokenizer) == [7, 8]
    # a text that writes the BOS itself (a chat template's {{ bos_token }}) keeps exactly that one
    assert encode_text(bos_tok, "<s>Hello!") == encode_text(bos_tok, "Hello!") == bos_tok("Hello!")["input_ids"]
    assert encode_text(bos_tok, "<s>Hello!").count(b) == 1


def test_prompt_ids_put_the_bos_in_the_prefix_or_else_the_text(bos_tok):
    b = bos_tok.bos_token_id
    plain = bos_tok("Hello!", add_special_tokens=False)["input_ids"]
    pre, text = prompt_ids(bos_tok, "### User\n", "Hello!")
    assert pre[0] == b and text == plain
    assert prompt_ids(bos_tok, "", "Hello!") == ([], [b] + plain)
    assert prompt_ids(bos_tok, "<s>### User\n", "Hello!")[0] == pre  # the template's own BOS, not a second


def test_scoring_with_a_bos_equals_lm_eval_hflm(bos_tok, bos_engine):
    """HFLM puts the tokenizer's BOS in front of every context (none twice); the packed scorer's numbers
    on a BOS model equal HFLM's, so scoring and generation share one BOS and stay comparable with lm-eval."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from selfalign.generation.scoring import loglikelihood

    lm = HFLM(pretrained=bos_engine.model, tokenizer=bos_tok, batch_size=2, device="cpu")
    for text in ("Question: Is the sky blue? Answer:", "<s><start_of_turn>user\nHi<end_of_turn>\n", "x"):
        assert hflm_encode(bos_tok, text) == lm.tok_encode(text)
    assert hflm_encode_pair(bos_tok, "Is it blue?", " yes")[0][0] == bos_tok.bos_token_id
    context, conts = "Question: Is the sky blue? Answer:", [" yes", " no, it is green", " A"]
    ref = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=(context, c), idx=i)
                            for i, c in enumerate(conts)], disable_tqdm=True)
    for (a, ga), (b, gb) in zip(loglikelihood(bos_engine, context, conts), ref):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_generation_training_and_scoring_see_the_same_single_bos(bos_tok, bos_engine, template):
    """The prompt a model is trained on, generates from and is scored after is one token sequence with one
    BOS in front -- for a chat template that writes ``{{ bos_token }}`` and for the plain layout that does not."""
    b = bos_tok.bos_token_id
    query = "What is the capital of France?"
    prompt = training_prompt(bos_tok, query, system=SYSTEM, template=template)
    assert prompt.startswith("<s>") == (template == "chat")
    prefix, text = split_shared_prefix(prompt, query)
    [grp] = bos_engine._plan([Request("q", prefix, text)], SamplingParams())
    generated_from = list(grp.cache_ids) + grp.rows[0].suffix
    trained = encode_example(bos_tok, "q", prompt, "Paris.", end_of_answer(bos_tok, template), max_length=256)
    n_prompt = sum(1 for t in trained.labels if t == -100)
    scored = hflm_encode(bos_tok, prompt)
    assert generated_from == trained.input_ids[:n_prompt] == scored
    assert generated_from[0] == b and generated_from.count(b) == 1


def test_greedy_tokens_equal_model_generate_on_the_bos_prompt(bos_tok, bos_engine):
    prefix, text = "### User\n", "Is the sky blue?\n\n### Assistant\n"
    ids = sum(prompt_ids(bos_tok, prefix, text), [])
    assert ids[0] == bos_tok.bos_token_id
    [(_, got)] = bos_engine.generate_token_ids([Request("r", prefix, text)], SamplingParams(max_new_tokens=8))
    ref = bos_engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    eos = bos_tok.eos_token_id
    assert got == (ref[: ref.index(eos)] if eos in ref else ref)


@pytest.mark.parametrize("overflow", ["truncate_left", "drop_paragraphs"])
def test_truncation_keeps_the_bos_first(bos_tok, overflow):
    gen = project_section("generation", max_context=40, min_new_tokens_reserved=8, overflow=overflow)
    engine = HFEngine(build_bos_model(bos_tok), bos_tok, gen)
    long = "The quick brown fox jumps over the lazy dog. " * 12
    for prefix in ("", "### User\n"):
        [grp] = engine._plan([Request("r", prefix, long)], SamplingParams())
        ids = list(grp.cache_ids) + grp.rows[0].suffix
        assert grp.rows[0].truncated > 0 and len(ids) <= 32
        assert ids[0] == bos_tok.bos_token_id and ids.count(bos_tok.bos_token_id) == 1
