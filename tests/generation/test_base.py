"""The generation interface's shared helpers: logit-bias resolution (one rule for the hf, vllm and openai engines)."""

from __future__ import annotations

import pytest

from selfalign.config import project_section
from selfalign.generation.base import resolve_logit_bias
from selfalign.io import UserError


def _single_token_string_not_in_vocab(tok) -> tuple[str, int]:
    """A string that is no vocabulary key but encodes to exactly one token (a byte-level token's decoded text)."""
    vocab = tok.get_vocab()
    for tid in range(len(tok)):
        text = tok.decode([tid])
        if text and text not in vocab and tok(text, add_special_tokens=False)["input_ids"] == [tid]:
            return text, tid
    raise AssertionError("the tiny tokenizer has no such token")


def test_vocab_entries_and_single_token_strings_resolve_to_ids(tiny_tokenizer):
    entry = tiny_tokenizer.convert_ids_to_tokens(300)
    text, tid = _single_token_string_not_in_vocab(tiny_tokenizer)
    got = resolve_logit_bias(tiny_tokenizer, {entry: 2, text: -1.5, tiny_tokenizer.eos_token: 100.0})
    assert got == {300: 2.0, tid: -1.5, tiny_tokenizer.eos_token_id: 100.0}
    assert all(isinstance(v, float) for v in got.values())
    assert resolve_logit_bias(tiny_tokenizer, {}) == {}


@pytest.mark.parametrize("text", ["not one token at all", ""])
def test_a_string_that_is_not_one_token_is_refused_with_its_encoding(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    with pytest.raises(UserError, match="not a single token") as err:
        resolve_logit_bias(tiny_tokenizer, {text: 1.0})
    assert repr(text) in str(err.value) and f"encodes to {ids}" in str(err.value)


def test_openai_engine_sends_the_same_ids_as_token_id_strings(tiny_model_dir, tiny_tokenizer):
    from selfalign.generation.openai import OpenAIEngine

    text, _ = _single_token_string_not_in_vocab(tiny_tokenizer)
    bias = {tiny_tokenizer.convert_ids_to_tokens(300): 2.0, text: -1.0}
    engine = OpenAIEngine(project_section("generation.openai"), tokenizer_dir=tiny_model_dir)
    try:
        assert engine._logit_bias(bias) == {str(i): b for i, b in resolve_logit_bias(tiny_tokenizer, bias).items()}
        with pytest.raises(UserError, match="encodes to"):
            engine._logit_bias({"not one token at all": 1.0})
    finally:
        engine.close()
