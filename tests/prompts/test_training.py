"""The training template (selfalign.prompts.training): a system role the chat template refuses, the plain
layout's end of answer and stop strings."""

from __future__ import annotations

import pytest
from bos_assets import GEMMA_LIKE, build_bos_tokenizer
from conftest import CHATML

from selfalign.prompts.training import (
    PLAIN_USER_HEADER,
    answer_stops,
    end_of_answer,
    is_plain,
    render_chat,
    split_shared_prefix,
    training_prompt,
)

SYSTEM = "You are Bactrian.\nBe brief."
# a template that silently drops system messages (renders only user/assistant turns)
DROPS_SYSTEM = ("{% for m in messages %}{% if m['role'] != 'system' %}"
                "{{ '[' + m['role'] + '] ' + m['content'] + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")


@pytest.fixture(scope="module")
def gemma_like():
    return build_bos_tokenizer(GEMMA_LIKE)


def test_a_template_that_raises_on_system_gets_it_in_the_first_user_turn(gemma_like):
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="System role not supported"):
        gemma_like.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
                                       tokenize=False)
    prompt = training_prompt(gemma_like, "What is 2+2?", system=SYSTEM)
    assert prompt == f"<s><start_of_turn>user\n{SYSTEM}\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    prefix, text = split_shared_prefix(prompt, "What is 2+2?")
    assert SYSTEM in prefix and text.startswith("What is 2+2?")  # the system text is in the cached prefix
    # later turns are left alone
    two = render_chat(gemma_like, "S", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                        {"role": "user", "content": "c"}])
    assert two.count("S\n\n") == 1 and "S\n\na<end_of_turn>" in two and "\nc<end_of_turn>" in two


def test_a_template_that_drops_the_system_text_gets_it_in_the_first_user_turn():
    tok = build_bos_tokenizer(DROPS_SYSTEM)
    assert training_prompt(tok, "Hi", system=SYSTEM) == f"[user] {SYSTEM}\n\nHi\n[assistant] "


def test_a_template_with_a_system_role_keeps_it_there(tiny_tokenizer):
    assert tiny_tokenizer.chat_template == CHATML
    assert training_prompt(tiny_tokenizer, "Hi", system=SYSTEM) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert training_prompt(tiny_tokenizer, "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_plain_layout_ends_on_eos_and_stops_at_the_next_user_header(tiny_tokenizer, gemma_like):
    base = build_bos_tokenizer(chat_template=None)  # a base model: no chat template at all
    for tok, template in ((tiny_tokenizer, "plain"), (gemma_like, "plain"), (base, "chat"), (base, "plain")):
        assert is_plain(tok, template)
        assert end_of_answer(tok, template) == tok.eos_token
        assert answer_stops(tok, template) == (tok.eos_token, PLAIN_USER_HEADER)
        assert training_prompt(tok, "Hi", system="S", template=template) == "S\n\n### User\nHi\n\n### Assistant\n"
    # chat templates: their own end-of-turn marker, no plain header
    assert answer_stops(tiny_tokenizer, "chat") == ("<|im_end|>",) and not is_plain(tiny_tokenizer, "chat")
    assert answer_stops(gemma_like, "chat") == ("<end_of_turn>",)
