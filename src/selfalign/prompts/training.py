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
should stop on it (pass it as a stop string if it is not the eos).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "PLAIN_ASSISTANT_HEADER",
    "PLAIN_USER_HEADER",
    "assistant_prompt",
    "end_of_answer",
    "has_chat_template",
    "load_system_prompt",
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
    if template == "chat" and has_chat_template(tokenizer):
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": content})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = f"{system}\n\n" if system else ""
    return f"{head}{PLAIN_USER_HEADER}\n{content}\n\n{PLAIN_ASSISTANT_HEADER}\n"


def end_of_answer(tokenizer, template: str = "chat") -> str:
    """The marker appended to (and trained after) every answer; see the convention above.

    For chat templates it is read off the template itself: what it writes right after an assistant
    message, up to the first newline (ChatML: ``<|im_end|>``)."""
    if template == "chat" and has_chat_template(tokenizer):
        probe = "\x00answer\x00"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}], tokenize=False)
        tail = text.split(probe, 1)[1].strip("\n").split("\n", 1)[0].strip()
        if tail:
            return tail
    return tokenizer.eos_token or ""


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
