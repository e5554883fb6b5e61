"""The five evaluated model variants and the prompt each one sees in front of a user message.

| variant    | weights                | chat prompt (Vicuna answers, paper-style MC)                       | lm-eval tasks' context |
|------------|------------------------|--------------------------------------------------------------------|------------------------|
| base       | models/base            | ``engrave.template`` (chat or plain), no system prompt of ours     | raw (standard setup)   |
| instructed | models/base            | ``prompts.training.assistant_prompt`` (training template + system) | raw                    |
| prompted   | models/base            | the self-align preamble (``prompts.self_align.prompted_request``)  | preamble + raw prompt  |
| engraved   | base + models/engraved | ``prompts.training.assistant_prompt``                              | raw                    |
| verbose    | base + models/verbose  | ``prompts.training.assistant_prompt``                              | raw                    |

``instructed`` is the default control (``evaluate.control``): the weights engraving starts from under exactly the
prompt, stop strings and reply format the engraved and verbose models get, so engraved - instructed is the
effect of the training alone (STYLE 17: claims need a control); engraved - base mixes in the effect of the
system prompt. In lm-eval tasks it scores the same raw contexts with the same weights as ``base``.

Why the lm-eval tasks stay raw for the trained variants: that is the standard way lm-eval scores a
fine-tuned checkpoint, so our numbers are comparable with anyone's. The ``prompted`` variant has no
weights of its own, so its preamble *is* the treatment and goes in front of every context.
The paper-style MC variants and Vicuna use each variant's own chat prompt ("under the assistant
template"), as Dromedary did.

Every non-prompted variant follows ``engrave.template``: a base model run with ``template: plain`` is
evaluated, base variant included, under the ``### User`` / ``### Assistant`` layout it is trained on,
and its replies stop at its eos or at the next ``### User`` header
(:func:`selfalign.prompts.training.answer_stops`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from selfalign.config import Config

__all__ = ["TRAINING_PROMPT", "VARIANTS", "ChatPrompt", "ThoughtsFirst", "VariantPrompter", "needs_adapter"]

VARIANTS = ("base", "instructed", "prompted", "engraved", "verbose")
# the variants prompted with the engraved models' training prompt (``prompts.training.assistant_prompt``)
TRAINING_PROMPT = ("instructed", "engraved", "verbose")


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
            from selfalign.prompts.annotation import load_from_config
            from selfalign.prompts.self_align import prompted_request

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
        """Stop strings for generation: the template's end-of-answer marker (ChatML: ``<|im_end|>``) and,
        under the plain template, the next ``### User`` header."""
        if self.variant == "prompted":
            return self._stops
        from selfalign.prompts.training import answer_stops

        return answer_stops(self.tok, self.config.engrave.template)

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

    def generator(self, engine: Any) -> Any:
        """The engine this variant's replies are generated with: ``engine`` itself, or for the prompted
        variant a :class:`ThoughtsFirst` wrapper that gives the thoughts their own token budget, so a
        reply gets the same ``max_new_tokens`` as every other variant's."""
        if self.variant != "prompted":
            return engine
        return ThoughtsFirst(engine, self._template, self.config.evaluate.prompted_thought_tokens)

    def cut_reply(self, text: str) -> str:
        """The answer in a completion of :meth:`generation_prompt`: up to the variant's end of turn and,
        for the prompted variant, after its thoughts ("" when it never reached the answer tag)."""
        for s in self.stop:
            if s and s in text:
                text = text[: text.index(s)]
        if self.variant == "prompted":
            from selfalign.prompts.self_align import split_completion

            parts = split_completion(self._template, text)
            return parts[1] if parts is not None else ""
        return text.strip()

    def chat(self, query: str) -> ChatPrompt:
        """The variant's prompt for one user message, ending where the assistant's answer starts."""
        if self.variant == "prompted":
            prefix, text = self._prompted_request(self.config.self_align, query, thought=False, root=self.root)
            return ChatPrompt(prefix, text)
        from selfalign.prompts.training import assistant_prompt, split_shared_prefix, training_prompt

        if self.variant in TRAINING_PROMPT:
            full = assistant_prompt(self.config, self.tok, query)
        else:
            # base: the model's own template (engrave.template) and default persona, nothing of ours in front
            full = training_prompt(self.tok, query, system=None, template=self.config.engrave.template)
        prefix, text = split_shared_prefix(full, query)
        return ChatPrompt(prefix, text)


class ThoughtsFirst:
    """Generates a prompted reply in two phases: the internal thoughts (up to the answer tag, at most
    ``thought_tokens``), then the answer from the prompt + thoughts + answer tag, with the caller's budget.

    Why two phases: in one call, the thoughts and the answer share one budget, so the reply's length
    depended on how long the thoughts ran (a 96-token thought allowance let a prompted reply run up to
    160 tokens where the others stop at 64), and every reply paid for the longest thought. A thought
    cut by its budget is closed with the answer tag, as the model would have; one that runs into the
    next user turn has no answer. The text returned is ``thoughts + answer tag +
    answer``, which :meth:`VariantPrompter.cut_reply` reads like a one-call completion.
    """

    def __init__(self, engine: Any, template: Any, thought_tokens: int):
        self.engine = engine
        self.template = template
        self.thought_tokens = thought_tokens
        self._tag = "\n" + template.answer_tag

    def __getattr__(self, name: str) -> Any:  # tok, model_id, ... of the wrapped engine
        return getattr(self.engine, name)

    def generate(self, requests: Sequence[Any], sampling: Any) -> Iterator[Any]:
        from selfalign.generation.base import Request, Result

        # the answer tag is the only stop string of the thoughts: an engine does not say which stop string
        # it met, and a thought that runs into the next user turn is recognised by the user tag in it
        thinking = replace(sampling, max_new_tokens=self.thought_tokens, stop=(self._tag,))
        thoughts = {r.id: r for r in self.engine.generate(requests, thinking)}
        answering, opened = [], {}
        for req in requests:
            res = thoughts[req.id]
            if self.template.user_tag in res.text:
                continue  # the turn ended inside the thoughts: no answer
            # exactly the text before the tag when the tag was met (eos too); a cut thought is closed
            opened[req.id] = (res.text + "\n" if res.finish == "stop" else res.text.rstrip() + "\n\n") + \
                self.template.answer_tag
            answering.append(Request(id=req.id, prefix=req.prefix, text=req.text + opened[req.id]))
        answers = {r.id: r for r in self.engine.generate(answering, sampling)} if answering else {}
        for req in requests:
            first = thoughts[req.id]
            if req.id not in answers:
                yield first
                continue
            second = answers[req.id]
            yield Result(id=req.id, text=opened[req.id] + second.text, finish=second.finish,
                         prompt_tokens=first.prompt_tokens,
                         completion_tokens=first.completion_tokens + second.completion_tokens,
                         truncated_tokens=first.truncated_tokens)
