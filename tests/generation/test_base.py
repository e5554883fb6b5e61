"""The generation interface's shared helpers: logit-bias resolution (one rule for the hf, vllm and openai
engines): params name *words*, each tokenizer turns them into its own token ids."""

from __future__ import annotations

import pytest

from selfalign.config import ConfigError, project_config, project_section
from selfalign.generation.base import resolve_logit_bias


def _id(tok, piece: str) -> int:
    assert piece in tok.get_vocab(), piece
    return tok.convert_tokens_to_ids(piece)


def test_words_resolve_to_their_single_token_forms_and_never_to_a_short_piece(tiny_tokenizer):
    tok = tiny_tokenizer
    # the tiny BPE: " capital" is one token, "capital" splits into c+ap+ital; "User" is one token, " User" is Ġ+User
    got = resolve_logit_bias(tok, {"capital": 2, "User": -1.5, tok.eos_token: 100.0})
    assert got == {_id(tok, "Ġcapital"): 2.0, _id(tok, "User"): -1.5, tok.eos_token_id: 100.0}
    assert _id(tok, "c") not in got and _id(tok, "Ġ") not in got  # first pieces too short to stand for the word
    assert all(isinstance(v, float) for v in got.values())
    assert resolve_logit_bias(tok, {}) == {}


def test_smollm2_resolves_the_word_to_the_same_ids_as_the_old_bpe_pieces(embedded_model_dir):
    """params.yaml used to spell the bias as SmolLM2 pieces {"Sorry", "ĠSor"} (" Sorry" is ĠSor + ry); the
    word "Sorry" now resolves to exactly those ids, so the default run biases the same tokens."""
    from selfalign.models import load_tokenizer

    tok = load_tokenizer(embedded_model_dir)
    old = {_id(tok, "Sorry"): -100.0, _id(tok, "ĠSor"): -100.0}
    assert resolve_logit_bias(tok, {"Sorry": -100.0}) == old
    params = project_config().self_align.logit_bias
    assert params == {"Sorry": -100.0} and resolve_logit_bias(tok, params, "self_align.logit_bias") == old


@pytest.mark.parametrize("word", ["fox", ""])
def test_a_word_with_no_single_token_form_is_a_config_error_naming_the_param(tiny_tokenizer, word):
    with pytest.raises(ConfigError, match=rf"^self_align.logit_bias: {word!r} has no single-token form") as err:
        resolve_logit_bias(tiny_tokenizer, {word: 1.0}, "self_align.logit_bias")
    if word:  # says how the word splits, with and without its leading space
        assert "'fox': ['f', 'o', 'x']" in str(err.value) and "' fox': ['Ġfo', 'x']" in str(err.value)


def test_a_raw_vocabulary_piece_is_refused_with_a_hint(tiny_tokenizer):
    with pytest.raises(ConfigError, match="raw vocabulary piece: write the word"):
        resolve_logit_bias(tiny_tokenizer, {"Ġcapital": 1.0})


def test_openai_engine_sends_the_same_ids_as_token_id_strings(tiny_model_dir, tiny_tokenizer):
    from selfalign.generation.openai import OpenAIEngine

    bias = {"capital": 2.0, "User": -1.0}
    engine = OpenAIEngine(project_section("generation.openai"), tokenizer_dir=tiny_model_dir)
    try:
        assert engine._logit_bias(bias) == {str(i): b for i, b in resolve_logit_bias(tiny_tokenizer, bias).items()}
        with pytest.raises(ConfigError, match="no single-token form"):
            engine._logit_bias({"not one token at all": 1.0})
    finally:
        engine.close()
