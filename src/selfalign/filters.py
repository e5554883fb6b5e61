"""Filters as small named predicates: each returns a reject *reason* (str) or ``None`` to keep.

Stages apply a list of predicates in order, write every dropped record to their rejects file with its
reason, and count reasons in their metrics (:func:`apply_filters`). No exceptions as control flow.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Iterable, Protocol, TypeVar

T = TypeVar("T")
Predicate = Callable[[T], "str | None"]


def apply_filters(item: T, predicates: Iterable[Predicate]) -> str | None:
    """First reject reason among ``predicates`` (in order), or ``None`` if every one keeps it."""
    for pred in predicates:
        reason = pred(item)
        if reason is not None:
            return reason
    return None


def count_reasons(reasons: Iterable[str]) -> dict[str, int]:
    """Per-reason counts, most common first (for stage metrics)."""
    return dict(Counter(reasons).most_common())


# --- instruction filters (step 1, red_team) ------------------------------------------------------
# Predicates over an instruction-like record (anything with ``text`` and ``input`` attributes, e.g.
# schemas.Prompt). Factories take their knobs from params (red_team.*) so no bound lives in code.


class _HasInstruction(Protocol):
    text: str
    input: str


def instruction_length(min_words: int, max_words: int) -> Predicate:
    """Keep instructions of more than ``min_words`` and at most ``max_words`` whitespace words.

    Very short lines are usually list debris ("Write a poem."), very long ones run-on generations."""

    def check(item: _HasInstruction) -> str | None:
        n = len(item.text.split())
        if n <= min_words:
            return "too_short"
        if n > max_words:
            return "too_long"
        return None

    return check


def no_blacklisted_words(words: Iterable[str]) -> Predicate:
    """Reject when the instruction *or* its input names a blacklisted word or phrase (whole words,
    any case): tasks about images, files, audio ... that a text-only model cannot do."""
    phrases = [w.strip() for w in words if w.strip()]
    if not phrases:
        return lambda item: None
    pattern = re.compile(
        r"\b(?:" + "|".join(r"\s+".join(map(re.escape, p.split())) for p in phrases) + r")\b",
        re.IGNORECASE,
    )

    def check(item: _HasInstruction) -> str | None:
        return "blacklist" if pattern.search(item.text) or pattern.search(item.input) else None

    return check


def starts_cleanly(item: _HasInstruction) -> str | None:
    """Reject instructions that start with punctuation or a non-ASCII character (parse debris,
    other languages) or are empty."""
    text = item.text.lstrip()
    if not text:
        return "empty"
    first = text[0]
    if not first.isascii() or first in string.punctuation:
        return "bad_start"
    return None


def topic_filters(max_words: int) -> list[Predicate]:
    """Predicates over a brainstormed topic string: short, capitalised noun phrase without
    trailing punctuation (a sentence or a question is not a topic)."""

    def empty(topic: str) -> str | None:
        return "topic_empty" if not topic.strip() else None

    def too_long(topic: str) -> str | None:
        return "topic_too_long" if len(topic.split()) > max_words else None

    def not_capitalised(topic: str) -> str | None:
        first = topic.lstrip()[:1]
        return None if first.isascii() and first.isupper() else "topic_not_capitalised"

    def trailing_punct(topic: str) -> str | None:
        return "topic_punctuation" if topic.rstrip()[-1:] in set(string.punctuation) else None

    return [empty, too_long, not_capitalised, trailing_punct]


# --- response filters (step 2 self_align, step 4 verbose_clone) ----------------------------------
