"""The prompt each variant sees: exact rendered strings, so format damage cannot hide in a delta."""

from __future__ import annotations

from selfalign.evaluation.variants import VariantPrompter
from selfalign.prompts import load_from_config, prompted_request


def test_prompted_lmeval_context_is_a_user_turn_with_the_answer_tag(config, tiny_tokenizer, project_root):
    prompter = VariantPrompter("prompted", config, tiny_tokenizer, root=project_root)
    template = load_from_config(config.self_align, project_root)[2]
    preamble = prompted_request(config.self_align, "x", thought=False, root=project_root)[0]
    context = "Q: What is the capital of France?\nA:"
    rendered = prompter.lmeval_context(context)
    assert preamble.endswith(template.user_tag)
    assert rendered == f"{preamble} Q: What is the capital of France?\nA:\n\n{template.answer_tag}"
    # never glued onto the user tag ("User:Q: ...")
    assert f"{template.user_tag}Q:" not in rendered


def test_prompted_lmeval_context_matches_the_chat_turn_of_the_same_message(config, tiny_tokenizer, project_root):
    """The lm-eval framing is the same user turn the variant's own chat prompt renders."""
    prompter = VariantPrompter("prompted", config, tiny_tokenizer, root=project_root)
    message = "Is the sky blue?"
    assert prompter.lmeval_context(message) == prompter.chat(message).full


def test_other_variants_score_raw_lmeval_contexts(config, tiny_tokenizer, project_root):
    for variant in ("base", "engraved", "verbose"):
        prompter = VariantPrompter(variant, config, tiny_tokenizer, root=project_root)
        assert prompter.lmeval_context("Q: hi\nA:") == "Q: hi\nA:"
        assert prompter.reply_prefix == ""
    assert VariantPrompter("prompted", config, tiny_tokenizer, root=project_root).reply_prefix == " "
