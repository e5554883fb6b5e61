"""The prompt each variant sees: exact rendered strings, so format damage cannot hide in a delta."""

from __future__ import annotations

import pytest

from selfalign.evaluation.variants import VARIANTS, ThoughtsFirst, VariantPrompter, needs_adapter
from selfalign.generation.base import Request, Result, SamplingParams
from selfalign.prompts.annotation import load_from_config
from selfalign.prompts.self_align import prompted_request


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


def test_variants_in_order_and_only_the_trained_ones_take_an_adapter(config):
    assert VARIANTS == ("base", "instructed", "prompted", "engraved", "verbose")
    assert [v for v in VARIANTS if needs_adapter(v)] == ["engraved", "verbose"]
    assert config.evaluate.variants == VARIANTS and config.evaluate.control == "instructed"


def test_instructed_control_sees_exactly_the_engraved_prompt(config, tiny_tokenizer, project_root):
    """The control: base weights under the trained variants' prompt, stop strings and reply framing, so
    engraved - instructed is the effect of training alone."""
    from selfalign.prompts.training import assistant_prompt, load_system_prompt

    control = VariantPrompter("instructed", config, tiny_tokenizer, root=project_root)
    query = "How do I pick a ripe avocado?"
    for trained in ("engraved", "verbose"):
        other = VariantPrompter(trained, config, tiny_tokenizer, root=project_root)
        assert control.chat(query) == other.chat(query)
        assert control.generation_prompt(query) == other.generation_prompt(query)
        assert control.stop == other.stop and control.reply_prefix == other.reply_prefix
        assert control.lmeval_wrap() == other.lmeval_wrap() == ("", "")
    assert control.chat(query).full == assistant_prompt(config, tiny_tokenizer, query)
    system = load_system_prompt(config.engrave.system_prompt_file)
    assert system and system in control.chat(query).full
    # and it is not the base variant's prompt (no system prompt of ours there)
    assert system not in VariantPrompter("base", config, tiny_tokenizer, root=project_root).chat(query).full


def test_other_variants_score_raw_lmeval_contexts(config, tiny_tokenizer, project_root):
    for variant in ("base", "instructed", "engraved", "verbose"):
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
    completion = (f" {template.self_id} The user asks about the sky. I should follow rules 2 (informative).\n\n"
                  f"{template.answer_tag} Yes, on a clear day.\n{template.user_tag} thanks")
    assert prompter.cut_reply(completion) == "Yes, on a clear day."
    # a completion that never reaches the answer tag has no reply
    assert prompter.cut_reply(f" {template.self_id} The user asks. I should follow rules") == ""


def test_chat_variants_generate_from_their_chat_prompt(config, tiny_tokenizer, project_root):
    for variant in ("base", "instructed", "engraved"):
        prompter = VariantPrompter(variant, config, tiny_tokenizer, root=project_root)
        assert prompter.generation_prompt("Hi") == prompter.chat("Hi")
        engine = object()
        assert prompter.generator(engine) is engine  # no thoughts: the engine itself
        assert prompter.cut_reply("  Hello there.  ") == "Hello there."


def _plain(config):
    return config.model_copy(update={"engrave": config.engrave.model_copy(update={"template": "plain"})})


def test_every_chat_variant_follows_engrave_template_plain_base_included(config, tiny_tokenizer, project_root):
    """A base model run with ``template: plain``: no variant falls back to the chat template (base did)."""
    cfg = _plain(config)
    for variant in ("base", "instructed", "engraved", "verbose"):
        prompter = VariantPrompter(variant, cfg, tiny_tokenizer, root=project_root)
        assert prompter.chat("Hi").full.endswith("### User\nHi\n\n### Assistant\n")
        assert "<|im_start|>" not in prompter.chat("Hi").full
        assert prompter.stop == (tiny_tokenizer.eos_token, "### User")
    # base: the bare layout, nothing of ours in front of the query
    assert VariantPrompter("base", cfg, tiny_tokenizer, root=project_root).chat("Hi").full == \
        "### User\nHi\n\n### Assistant\n"


def test_a_plain_base_variant_reply_stops_at_the_next_user_header(config, tiny_tokenizer, project_root):
    prompter = VariantPrompter("base", _plain(config), tiny_tokenizer, root=project_root)
    gp = prompter.generation_prompt("How are you?")
    engine = WordEngine({"### Assistant\n": "I am fine, thanks.\n\n### User\nAnd what about you?"})
    [res] = prompter.generator(engine).generate([Request("q", gp.prefix, gp.text)],
                                                SamplingParams(max_new_tokens=64, stop=prompter.stop))
    assert res.finish == "stop" and prompter.cut_reply(res.text) == "I am fine, thanks."


class WordEngine:
    """Continues each request with a scripted text, honouring stop strings (cut before, finish "stop") and
    ``max_new_tokens`` counted in words (finish "length"), as a real engine does; records every call."""

    def __init__(self, script):
        self.script = script  # request text -> the model's continuation
        self.calls: list[tuple[list[Request], SamplingParams]] = []

    def generate(self, requests, sampling):
        self.calls.append((list(requests), sampling))
        for req in requests:
            text = next(v for k, v in self.script.items() if req.text.endswith(k))
            cuts = [text.index(s) for s in sampling.stop if s in text]
            finish = "length"
            if cuts:
                text, finish = text[: min(cuts)], "stop"
            words = text.split(" ")
            if len(words) > sampling.max_new_tokens:
                text, finish = " ".join(words[: sampling.max_new_tokens]), "length"
            yield Result(req.id, text, finish, prompt_tokens=3, completion_tokens=min(len(words), sampling.max_new_tokens))


@pytest.fixture()
def prompted(config, tiny_tokenizer, project_root):
    cfg = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"prompted_thought_tokens": 30})})
    return VariantPrompter("prompted", cfg, tiny_tokenizer, root=project_root)


def test_prompted_reply_gets_the_same_budget_whatever_the_thoughts_spent(prompted, project_root, config):
    t = load_from_config(config.self_align, project_root)[2]
    thought = f" {t.self_id} The user asks. I should follow rules 3 (helpful).\n"
    answer = " one two three four five six seven eight nine ten"
    gp = prompted.generation_prompt("Q?")
    engine = WordEngine({t.thought_tag: thought + f"\n{t.answer_tag}{answer}", t.answer_tag: answer})
    gen = prompted.generator(engine)
    assert isinstance(gen, ThoughtsFirst)
    [res] = gen.generate([Request("q", prefix=gp.prefix, text=gp.text)], SamplingParams(max_new_tokens=4, stop=prompted.stop))
    (first, thinking), (second, answering) = engine.calls
    assert thinking.max_new_tokens == 30 and answering.max_new_tokens == 4
    # phase 2 continues from exactly the text the model wrote, the answer tag included
    assert second[0].text == gp.text + thought + f"\n{t.answer_tag}" and second[0].prefix == gp.prefix
    assert prompted.cut_reply(res.text) == "one two three"  # 4 words of the reply budget (" one" opens with a space)
    assert res.finish == "length"


def test_prompted_thought_cut_by_its_budget_is_closed_and_answered(prompted, project_root, config):
    t = load_from_config(config.self_align, project_root)[2]
    long_thought = " " + " ".join(["thinking"] * 40)
    gp = prompted.generation_prompt("Q?")
    engine = WordEngine({t.thought_tag: long_thought, t.answer_tag: " Paris."})
    [res] = prompted.generator(engine).generate([Request("q", prefix=gp.prefix, text=gp.text)],
                                                SamplingParams(max_new_tokens=8, stop=prompted.stop))
    assert engine.calls[1][0][0].text.endswith(f"thinking\n\n{t.answer_tag}")
    assert prompted.cut_reply(res.text) == "Paris."


def test_prompted_thought_running_into_the_next_user_turn_has_no_reply(prompted, project_root, config):
    t = load_from_config(config.self_align, project_root)[2]
    gp = prompted.generation_prompt("Q?")
    engine = WordEngine({t.thought_tag: f" {t.self_id}\n\n{t.user_tag} next question"})
    [res] = prompted.generator(engine).generate([Request("q", prefix=gp.prefix, text=gp.text)],
                                                SamplingParams(max_new_tokens=8, stop=prompted.stop))
    assert len(engine.calls) == 1 and prompted.cut_reply(res.text) == ""
