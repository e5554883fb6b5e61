"""The four evaluated model variants and the prompt each one sees in front of a user message.

| variant  | weights                 | chat prompt (Vicuna answers, paper-style MC)              | lm-eval tasks' context |
|----------|-------------------------|-----------------------------------------------------------|------------------------|
| base     | models/base             | the tokenizer's own chat template, no system prompt of ours | raw (standard setup) |
| prompted | models/base             | the self-align preamble (``prompts.prompted_request``)      | preamble + raw prompt |
| engraved | base + models/engraved  | ``prompts.assistant_prompt`` (training template + system)   | raw                   |
| verbose  | base + models/verbose   | ``prompts.assistant_prompt``                                 | raw                   |

Why the lm-eval tasks stay raw for the trained variants: that is the standard way lm-eval scores a
fine-tuned checkpoint, so our numbers are comparable with anyone's. The ``prompted`` variant has no
weights of its own, so its preamble *is* the treatment and goes in front of every context.
The paper-style MC variants and Vicuna use each variant's own chat prompt ("under the assistant
template"), as Dromedary did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfalign.config import Config

__all__ = ["VARIANTS", "ChatPrompt", "VariantPrompter", "needs_adapter"]

VARIANTS = ("base", "prompted", "engraved", "verbose")


def needs_adapter(variant: str) -> bool:
    return variant in ("engraved", "verbose")


@dataclass(frozen=True)
class ChatPrompt:
    """A user turn rendered for one variant: the shared ``prefix`` (cacheable) + the per-query ``text``."""

    prefix: str
    text: str

    @property
    def full(self) -> str:
        return self.prefix + self.text


class VariantPrompter:
    """Renders a user message the way a given variant is prompted (see the table above)."""

    def __init__(self, variant: str, config: Config, tokenizer, root: str | Path = "."):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        self.variant = variant
        self.config = config
        self.tok = tokenizer
        self.root = Path(root)
        self._preamble: str | None = None
        self._stops: tuple[str, ...] = ()
        if variant == "prompted":
            from selfalign.prompts import load_from_config, prompted_request

            self._prompted_request = prompted_request
            template = load_from_config(config.self_align, self.root)[2]
            # the preamble's turns are plain text: the next user turn ends the answer
            self._stops = (template.user_tag,)
            self._preamble = prompted_request(config.self_align, "x", thought=False, root=self.root)[0]
            # the preamble ends with the user tag: a user turn is " <message>\n\n<answer tag>"
            self._answer_tag = template.answer_tag
            self._template = template

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings for generation (the chat variants stop on the template's end-of-turn token)."""
        if self.variant == "prompted":
            return self._stops
        from selfalign.prompts import end_of_answer

        template = self.config.engrave.template if self.variant != "base" else "chat"
        marker = end_of_answer(self.tok, template)
        # also when it is the eos token: engines stop on eos anyway, and answers are cut at it either way
        return (marker,) if marker else ()

    def lmeval_wrap(self) -> tuple[str, str]:
        """``(before, after)`` put around every lm-eval context: the prompted variant's preamble and
        its user-turn / answer-tag framing, so a context reads ``...User: <context>\n\nBactrian:`` and
        the choice is scored as Bactrian's reply (not glued onto the user tag as ``User:Q: ...``).
        Nothing for the other variants (standard lm-eval contexts)."""
        if self._preamble is None:
            return "", ""
        return f"{self._preamble} ", f"\n\n{self._answer_tag}"

    def lmeval_context(self, context: str) -> str:
        """The exact string scored in front of an lm-eval choice for this variant."""
        before, after = self.lmeval_wrap()
        return f"{before}{context}{after}"

    @property
    def reply_prefix(self) -> str:
        """What separates the prompt from the reply: the prompted turn ends with the bare answer tag
        ("Bactrian:"), the chat templates end with the assistant header and a newline."""
        return " " if self.variant == "prompted" else ""

    def generation_prompt(self, query: str) -> ChatPrompt:
        """The prompt a *generated* reply starts from. The prompted variant answers as step 2 does: it
        writes its internal thoughts first (the exemplars all do), then ``Bactrian:`` and the answer --
        opened directly at the answer tag, the 135M model writes a thought there instead of an answer."""
        if self.variant != "prompted":
            return self.chat(query)
        prefix, text = self._prompted_request(self.config.self_align, query, thought=True, root=self.root)
        return ChatPrompt(prefix, text)

    @property
    def extra_new_tokens(self) -> int:
        """New tokens a generated reply may spend before the answer starts (the prompted thoughts)."""
        return self.config.evaluate.prompted_thought_tokens if self.variant == "prompted" else 0

    def cut_reply(self, text: str) -> str:
        """The answer in a completion of :meth:`generation_prompt`: up to the variant's end of turn and,
        for the prompted variant, after its thoughts ("" when it never reached the answer tag)."""
        for s in self.stop:
            if s and s in text:
                text = text[: text.index(s)]
        if self.variant == "prompted":
            from selfalign.prompts import split_completion

            parts = split_completion(self._template, text)
            return parts[1] if parts is not None else ""
        return text.strip()

    def chat(self, query: str) -> ChatPrompt:
        """The variant's prompt for one user message, ending where the assistant's answer starts."""
        if self.variant == "prompted":
            prefix, text = self._prompted_request(self.config.self_align, query, thought=False, root=self.root)
            return ChatPrompt(prefix, text)
        from selfalign.prompts import assistant_prompt, split_shared_prefix, training_prompt

        if self.variant == "base":
            # the model's own template and default persona: nothing of ours in front of the query
            full = training_prompt(self.tok, query, system=None, template="chat")
        else:
            full = assistant_prompt(self.config, self.tok, query)
        prefix, text = split_shared_prefix(full, query)
        return ChatPrompt(prefix, text)
