"""Filters as small named predicates: each returns a reject *reason* (str) or ``None`` to keep.

Stages apply a list of predicates in order, write every dropped record to their rejects file with its
reason, and count reasons in their metrics (:func:`apply_filters`). No exceptions as control flow.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, TypeVar

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


# --- response filters (step 2 self_align, step 4 verbose_clone) ----------------------------------
