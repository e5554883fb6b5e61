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


def test_prompted_generation_writes_thoughts_first_and_the_reply_is_the_answer(config, tiny_tokenizer, project_root):
    """Opened at the answer tag, the 135M model writes a thought there; so the prompted variant generates
    as step 2 does (thought tag) and its reply is what follows the answer tag."""
    prompter = VariantPrompter("prompted", config, tiny_tokenizer, root=project_root)
    template = load_from_config(config.self_align, project_root)[2]
    gp = prompter.generation_prompt("Is the sky blue?")
    assert gp.full == prompted_request(config.self_align, "Is the sky blue?", thought=True, root=project_root)[0] + \
        prompted_request(config.self_align, "Is the sky blue?", thought=True, root=project_root)[1]
    assert gp.full.endswith(template.thought_tag)
    assert prompter.extra_new_tokens == config.evaluate.prompted_thought_tokens
    completion = (f" {template.self_id} The user asks about the sky. I should follow rules 2 (informative).\n\n"
                  f"{template.answer_tag} Yes, on a clear day.\n{template.user_tag} thanks")
    assert prompter.cut_reply(completion) == "Yes, on a clear day."
    # a completion that never reaches the answer tag has no reply
    assert prompter.cut_reply(f" {template.self_id} The user asks. I should follow rules") == ""


def test_chat_variants_generate_from_their_chat_prompt(config, tiny_tokenizer, project_root):
    for variant in ("base", "engraved"):
        prompter = VariantPrompter(variant, config, tiny_tokenizer, root=project_root)
        assert prompter.generation_prompt("Hi") == prompter.chat("Hi")
        assert prompter.extra_new_tokens == 0
        assert prompter.cut_reply("  Hello there.  ") == "Hello there."
