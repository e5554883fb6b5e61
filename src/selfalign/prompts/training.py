"""The training template (steps 3-4: engrave, verbose_clone; also evaluation and serve).

The engraved and verbose models see exactly :func:`training_prompt` before their answer: the short
system prompt (``principles/assistant.md``, no principles, no exemplars -- their absence is the
"engraving") rendered with the tokenizer's own chat template. Base models without a chat template
fall back to a plain "### User / ### Assistant" layout (the paper's, with our persona's header).

End-of-answer convention: the answer is followed by the template's own end-of-turn marker and that
marker is trained (it is part of the loss). For ChatML (SmolLM2, Qwen ...) that is "<|im_end|>",
which is also the tokenizer's eos, so every engine stops on it without a stop string. Unlike the
paper we do not teach "### User" as the end of an answer: a real end-of-turn token cannot be
confused with text, and the Dromedary card itself advises swapping in your own end token. For the
plain template the marker is the tokenizer's eos token. :func:`end_of_answer` resolves it; engines
should stop on it (pass it as a stop string if it is not the eos). A plain-template model also stops
at the next ``### User`` header (:func:`answer_stops`): a base model that has not learned the eos yet
would otherwise write the user's next turn itself.

System prompt: rendered as the chat template's system message; a template that refuses a system role
(raises, as Gemma's and Mistral's older templates do) or silently drops it gets the system text
prepended to the first user message instead (:func:`render_chat`).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "PLAIN_ASSISTANT_HEADER",
    "PLAIN_USER_HEADER",
    "answer_stops",
    "assistant_prompt",
    "end_of_answer",
    "has_chat_template",
    "is_plain",
    "load_system_prompt",
    "render_chat",
    "split_shared_prefix",
    "training_prompt",
    "user_turn",
]

PLAIN_USER_HEADER = "### User"
PLAIN_ASSISTANT_HEADER = "### Assistant"


def load_system_prompt(path: str | Path | None) -> str | None:
    """The system prompt text (stripped), or ``None`` when no file is configured."""
    if path is None:
        return None
    return Path(path).read_text(encoding="utf-8").strip()


def user_turn(query: str, input: str = "") -> str:
    """The user message: the instruction, then (if any) a blank line and its input."""
    query, input = query.strip(), input.strip()
    return f"{query}\n\n{input}" if input else query


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def is_plain(tokenizer, template: str) -> bool:
    """True when prompts use the plain ``### User`` layout: ``template: plain``, or no chat template."""
    return template != "chat" or not has_chat_template(tokenizer)


def render_chat(tokenizer, system: str | None, turns: list[dict[str, str]],
                add_generation_prompt: bool = True) -> str:
    """``turns`` (user/assistant messages) through the tokenizer's chat template with ``system`` as its
    system message; when the template raises on a system role or drops its text, ``system`` and a blank
    line go in front of the first user message instead (the system text reaches the model either way)."""
    from jinja2 import TemplateError

    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    turns = [dict(m) for m in turns]
    if system is None:
        return render(turns)
    try:
        text = render([{"role": "system", "content": system}, *turns])
        if system in text:
            return text
    except TemplateError:
        pass
    first = next(i for i, m in enumerate(turns) if m["role"] == "user")
    turns[first]["content"] = f"{system}\n\n{turns[first]['content']}"
    return render(turns)


def training_prompt(tokenizer, query: str, input: str = "", system: str | None = None,
                    template: str = "chat") -> str:
    """The exact text an engraved/verbose model sees before its answer.

    ``template="chat"`` uses the tokenizer's chat template with ``system`` as the system message
    (text from :func:`load_system_prompt`). ``None`` sends no system message, which leaves the
    template's default -- for SmolLM2 *its own* persona -- so pipeline callers always pass ours
    (:func:`assistant_prompt` does). ``"plain"``, or a
    tokenizer without a chat template, gives ``system``, a blank line, ``### User``, the message, a
    blank line and ``### Assistant``."""
    content = user_turn(query, input)
    if not is_plain(tokenizer, template):
        return render_chat(tokenizer, system, [{"role": "user", "content": content}])
    head = f"{system}\n\n" if system else ""
    return f"{head}{PLAIN_USER_HEADER}\n{content}\n\n{PLAIN_ASSISTANT_HEADER}\n"


def end_of_answer(tokenizer, template: str = "chat") -> str:
    """The marker appended to (and trained after) every answer; see the convention above.

    For chat templates it is read off the template itself: what it writes right after an assistant
    message, up to the first newline (ChatML: ``<|im_end|>``)."""
    if not is_plain(tokenizer, template):
        probe = "\x00answer\x00"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}], tokenize=False)
        tail = text.split(probe, 1)[1].strip("\n").split("\n", 1)[0].strip()
        if tail:
            return tail
    return tokenizer.eos_token or ""


def answer_stops(tokenizer, template: str = "chat") -> tuple[str, ...]:
    """Stop strings of a model answering a :func:`training_prompt`: the end-of-answer marker (also when
    it is the eos: engines stop on eos anyway, and a reply is cut at it either way), and for the plain
    layout the next user header (``### User``), where a base model starts writing the user's turn."""
    marker = end_of_answer(tokenizer, template)
    stops = (marker,) if marker else ()
    return stops + ((PLAIN_USER_HEADER,) if is_plain(tokenizer, template) else ())


def split_shared_prefix(prompt: str, query: str, input: str = "") -> tuple[str, str]:
    """(prefix, text) of a :func:`training_prompt` for an engine Request: the prefix (system prompt
    and template up to the user's message) is identical for every query, so engines cache it."""
    cut = prompt.rindex(user_turn(query, input))
    return prompt[:cut], prompt[cut:]


def assistant_prompt(config, tokenizer, query: str, input: str = "") -> str:
    """:func:`training_prompt` with the template and system prompt named in ``config.engrave``:
    what evaluation and ``serve`` put in front of a query for the engraved and verbose models."""
    system = load_system_prompt(config.engrave.system_prompt_file)
    return training_prompt(tokenizer, query, input, system=system, template=config.engrave.template)
