"""Parsers of step 1's completions: the base model's continuations of the lists that
:mod:`selfalign.prompts.red_team` opens.

Each parser re-attaches the list item the prompt opened, splits the continuation into items and drops
an item cut by the token limit (``finish == "length"``): half a task or topic is a different one. What
is malformed is returned as such (the raw chunk, or None), so the stage counts it as a reject.
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["parse_questions", "parse_self_instruct", "parse_topics"]

_PLACEHOLDER_RE = re.compile(r"^<[^<>\s]*>$")
_HEAD_RE = re.compile(r"^\s*\d+\s*\.\s*Instruction:[ \t]*([^\n]*)(.*)$", re.DOTALL)
_LABEL_RE = re.compile(r"^\s*\d+\s*\.\s*(Input|Output):(.*)$", re.DOTALL | re.IGNORECASE)
_LABEL_LINE_RE = re.compile(r"^\s*\d+\s*\.\s*(?:Instruction|Input|Output)s?\s*:", re.MULTILINE | re.IGNORECASE)


def parse_self_instruct(completion: str, first_index: int, finish: str,
                        no_input: str) -> list[tuple[str, str] | str]:
    """Split a continuation into tasks: ``(instruction, input)`` per well-formed chunk, or the raw
    chunk text (a str) when it is malformed. The opening "N. Instruction:" that ended the prompt is
    re-attached; a chunk cut by the token limit is dropped (it may be half a task).

    A chunk is "N. Instruction: <one line>" optionally followed by "M. Input: ..." (the input) or
    "M. Output: ..." (a small model often answers its own task instead of giving an input: the
    answer is dropped, the task has no input). M may differ from N (SmolLM2 often counts up), and a
    lone instruction line has no input. Anything else after the instruction line is malformed, and
    so is an input holding another "K. Output:"-style label line (two tasks run together)."""
    chunks = f"{first_index}. Instruction:{completion}".split("###")
    if finish == "length":
        chunks = chunks[:-1]
    out: list[tuple[str, str] | str] = []
    for chunk in chunks:
        if not chunk.strip():
            continue
        head = _HEAD_RE.match(chunk)
        rest = head.group(2).strip() if head else ""
        label = _LABEL_RE.match(rest) if rest else None
        if head is None or not head.group(1).strip() or (rest and label is None):
            out.append(chunk.strip())
            continue
        inp = label.group(2).strip() if label is not None and label.group(1).lower() == "input" else ""
        if _LABEL_LINE_RE.search(inp):
            out.append(chunk.strip())
            continue
        # small models garble the marker ("<noininput>"): any lone <token> is the empty input
        out.append((head.group(1).strip(), "" if inp.lower() == no_input.lower() or _PLACEHOLDER_RE.match(inp) else inp))
    return out


_NUMBERED_RE = re.compile(r"^\s*\d+\s*[.)]\s*(.*?)\s*$")


def parse_topics(completion: str, first_index: int, finish: str, max_lines: int) -> list[str | None]:
    """Topics from the first ``max_lines`` lines of a continued numbered list ("N. Topic").

    Returns one entry per non-blank line: the topic text, or None for a line that is not a list item.
    A last line cut by the token limit is dropped (a cut topic is a different topic)."""
    lines = f"{first_index}.{completion}".split("\n")
    if finish == "length":
        lines = lines[:-1]
    out: list[str | None] = []
    for line in lines[:max_lines]:
        if not line.strip():
            continue
        m = _NUMBERED_RE.match(line)
        out.append(m.group(1) if m else None)
    return out


_QUESTION_RE = re.compile(r"^\s*\d+\s*\.\s*type:\s*(.*?),\s*topic:\s*(.*?),\s*instruction:\s*(.*?)\s*$")


def parse_questions(completion: str, opener: str, finish: str,
                    pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """First question per requested (type description, topic) pair found in a continuation.

    Only lines naming one of *this prompt's new* pairs count (case-insensitive), so a line that
    repeats a seed hint is never mistaken for a new question. A line cut by the limit is dropped."""
    wanted = {(d.lower(), t.lower()): (d, t) for d, t in pairs}
    lines = (opener + completion).split("\n")
    if finish == "length":
        lines = lines[:-1]
    found: dict[tuple[str, str], str] = {}
    for line in lines:
        m = _QUESTION_RE.match(line)
        if m is None or not m.group(3):
            continue
        key = wanted.get((m.group(1).lower(), m.group(2).lower()))
        if key is not None and key not in found:
            found[key] = m.group(3)
    return found
