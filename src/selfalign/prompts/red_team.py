"""Step 1's raw-completion prompts (no chat template: the *base* model continues a list).

Every renderer returns ``(prefix, text)`` for an engine Request: the prefix is the part shared by many
requests (encoded once, KV-cached), the text what differs. Each prompt ends by opening the next list
item, so the continuation is the item the model writes; :mod:`selfalign.prompts.red_team_parse` reads
it back. The templates are files under ``principles/templates/`` (:func:`~selfalign.prompts.annotation.read_template`).
"""

from __future__ import annotations

from typing import Sequence

from selfalign.prompts.annotation import RedTeamType, SeedTask

__all__ = ["render_question_prompt", "render_question_prompts", "render_self_instruct", "render_topic_prompt"]


def render_self_instruct(header: str, examples: Sequence[SeedTask], no_input: str) -> tuple[str, str]:
    """(prefix, text) of one few-shot prompt. The header is the shared prefix (KV-cached once);
    the text lists the examples as ``###``-separated numbered instruction/input pairs and opens the
    next instruction for the model to write."""
    lines = []
    for i, ex in enumerate(examples, 1):
        lines.append(f"###\n{i}. Instruction: {ex.instruction}\n{i}. Input:\n{ex.input or no_input}\n")
    lines.append(f"###\n{len(examples) + 1}. Instruction:")
    return header.format(no_input=no_input), "".join(lines)


def render_topic_prompt(template: str, rt_type: RedTeamType, shown: Sequence[str]) -> tuple[str, str]:
    """(prefix, text): the template up to the type placeholder is the prefix (shared by every type,
    so all brainstorm prompts batch together); the text names the type and lists the shown topics
    plus the next number, so the model continues the list."""
    head, tail = template.split("{type_description}", 1)
    listed = "".join(f"{i}. {t}\n" for i, t in enumerate(shown, 1))
    return head, f"{rt_type.description}{tail}{listed}{len(shown) + 1}."


def _hint(rt_type: RedTeamType, topic: str) -> str:
    return f"type: {rt_type.description}, topic: {topic}"


def _question_parts(template: str, seeds: Sequence[RedTeamType],
                    pairs: Sequence[tuple[RedTeamType, str]]) -> tuple[str, str]:
    """(head, body) of a question prompt: the head up to the hints (with their count), the body the
    numbered hints (seed pairs 1..k, new pairs k+1..k+n), the template's middle and the seeds' questions."""
    head, tail = template.split("{hints}", 1)
    hints = [_hint(t, t.topic) for t in seeds] + [_hint(t, topic) for t, topic in pairs]
    hint_lines = "".join(f"{i}. {h}\n" for i, h in enumerate(hints, 1)).rstrip("\n")
    examples = "".join(f"{i}. {_hint(t, t.topic)}, instruction: {t.question}\n" for i, t in enumerate(seeds, 1))
    return head.format(num_hints=len(hints)), hint_lines + tail + examples


def render_question_prompt(template: str, seeds: Sequence[RedTeamType],
                           pairs: Sequence[tuple[RedTeamType, str]]) -> tuple[str, str]:
    """(prefix, text) of one question prompt: hints 1..k are seed (type, topic) pairs, k+1..k+n new
    pairs; the instruction list shows the seeds' questions and opens the first new pair's line."""
    head, body = _question_parts(template, seeds, pairs)
    return head, body + f"{len(seeds) + 1}. {_hint(*pairs[0])}, instruction:"


def render_question_prompts(template: str, seeds: Sequence[RedTeamType],
                            pairs: Sequence[tuple[RedTeamType, str]]) -> tuple[str, list[str]]:
    """Per-pair variant of :func:`render_question_prompt`: the same prompt (all hints, the seeds'
    questions) is the shared prefix, and each new pair gets its own text opening that pair's line.

    Why: a 135M model reliably writes the one line it is given the opener for and then drifts into
    invented (type, topic) pairs, so one continuation yields ~1 usable question. One short request
    per pair over a shared, cached prefix costs a few decode steps per pair instead."""
    head, body = _question_parts(template, seeds, pairs)
    texts = [f"{len(seeds) + j}. {_hint(t, topic)}, instruction:" for j, (t, topic) in enumerate(pairs, 1)]
    return head + body, texts
